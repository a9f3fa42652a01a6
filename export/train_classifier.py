"""`brainscan train classifier`: 4-class tumor classifier, trained from scratch.

Data: sartaj-classification/Training minus every near-duplicate of an
evaluation image (see `export.audit`). Model selection uses a validation split
carved from Training by near-duplicate group; Testing is never looked at here.
Recipe: small residual SE-CNN, on-batch affine + intensity augmentation,
balanced class weights, label smoothing, AdamW with warm-up + cosine decay.

Weak tumor labels: every Sartaj no_tumor slice comes from one source while
the tumor folders are mostly figshare slices, so a model can learn "this
source = healthy" instead of "no tumor visible" (the first model called 64%
of the tumor-positive Br35H slices no_tumor). The tumor-positive slices of
the polygon sets (`br35h-polygons`, `ruslan-kl-polygons` train splits, other
sources) join training as "a tumor, type unknown": their loss is the
partial-label cross-entropy -log(1 - p(no_tumor)), so they teach tumor vs
healthy without inventing a tumor type.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from export import train_common
from export.datasets import CLASS_LABELS, load_classification_split

MODEL = "classifier"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the 4-class brain-MRI classifier (Keras, from scratch).")
    train_common.add_common_args(parser, model=MODEL, size=112, epochs=18, batch=32, lr=2e-3)
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy")
    parser.add_argument("--intensity-remap", type=float, default=0.0,
                        help="share of training images passed through a random intensity curve, "
                        "a stand-in for other MRI sequences (default 0 = off)")
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout before the classifier head")
    parser.add_argument("--widths", type=str, default="24,32,64,128", help="channels per stage, comma-separated")
    parser.add_argument("--depths", type=str, default="1,1,2,2", help="residual blocks per stage, comma-separated")
    parser.add_argument("--weak-tumor", action=argparse.BooleanOptionalAction, default=True,
                        help="add the polygon sets' tumor-positive train slices as 'tumor, type unknown'")
    return parser


WEAK_SPLITS = (("br35h-polygons", "train"), ("ruslan-kl-polygons", "train"), ("ruslan-kl-polygons", "val"))
# Group index of a weakly labeled slice; 0-3 are CLASS_LABELS.
WEAK = len(CLASS_LABELS)
WEAK_NAME = "tumor_unknown_type"


def allowed_labels(groups: np.ndarray) -> np.ndarray:
    """N×4 0/1 rows: the one true class, or every tumor class for a weak slice."""
    allowed = np.zeros((len(groups), len(CLASS_LABELS)), dtype=np.float32)
    strong = groups < WEAK
    allowed[np.nonzero(strong)[0], groups[strong]] = 1.0
    allowed[~strong] = [0.0 if name == "no_tumor" else 1.0 for name in CLASS_LABELS]
    return allowed


def partial_label_loss(label_smoothing: float):
    """-log P(label in allowed set); with one-hot rows this is the usual cross-entropy."""
    from keras import ops

    def loss(allowed, probabilities):
        p = ops.clip(probabilities, 1e-7, 1.0)
        in_set = -ops.log(ops.clip(ops.sum(allowed * p, axis=-1), 1e-7, 1.0))
        uniform = -ops.mean(ops.log(p), axis=-1)
        return (1.0 - label_smoothing) * in_set + label_smoothing * uniform

    return loss


def training_data(args: argparse.Namespace) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, groups, train indices, val indices) after the duplicate exclusion.

    groups: 0-3 = CLASS_LABELS, WEAK = tumor-positive slice of unknown type.
    """
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit
    from export.datasets import load_via_split

    audit = load_or_build_audit(args.data)
    items = [(p, label) for p, label in load_classification_split(args.data, "Training") if not audit.is_excluded_from_training(p)]
    if args.weak_tumor:
        for dataset, split in WEAK_SPLITS:
            items += [(s.path, WEAK_NAME) for s in load_via_split(args.data, dataset, split)
                      if s.regions and not audit.is_excluded_from_training(s.path)]
    if args.limit:
        rng = np.random.default_rng(args.seed)
        items = [items[i] for i in sorted(rng.choice(len(items), size=min(args.limit, len(items)), replace=False))]
    paths = [p for p, _ in items]
    names = [label for _, label in items]
    labels = np.array([WEAK if label == WEAK_NAME else CLASS_LABELS.index(label) for label in names])
    groups = duplicate_groups(compute_signatures(paths))
    train_idx, val_idx = train_common.group_split(names, groups, args.val_fraction, args.seed)
    return paths, labels, train_idx, val_idx


def balanced_accuracy_callback(val_x: np.ndarray, val_y: np.ndarray):
    """Adds val_balanced_accuracy to the epoch logs before checkpoints read them.

    Mean recall over the four classes and, when present, the weak group (a
    weak slice counts as right when the argmax is any tumor class).
    """
    import keras

    no_tumor = CLASS_LABELS.index("no_tumor")

    class BalancedAccuracy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(val_x, batch_size=64, verbose=0).argmax(axis=1)
            recalls = {}
            for c, name in enumerate(CLASS_LABELS):
                if (val_y == c).any():
                    recalls[name] = float((pred[val_y == c] == c).mean())
            if (val_y == WEAK).any():
                recalls[WEAK_NAME] = float((pred[val_y == WEAK] != no_tumor).mean())
            if logs is not None:
                logs["val_balanced_accuracy"] = float(np.mean(list(recalls.values())))
                logs.update({f"val_recall_{name}": value for name, value in recalls.items()})

    return BalancedAccuracy()


def main(args: argparse.Namespace) -> int:
    train_common.setup_tensorflow(args.threads, args.seed)
    import keras
    import tensorflow as tf

    from export.keras_models import build_classifier
    from export.prepared import prepared_images

    out = train_common.start_run(args)
    paths, labels, train_idx, val_idx = training_data(args)
    images = prepared_images(paths, args.size, desc="prepare Training")
    group_names = [*CLASS_LABELS, WEAK_NAME]
    counts = np.bincount(labels[train_idx], minlength=len(group_names))
    present = int((counts > 0).sum())
    class_weight = {c: float(len(train_idx) / (present * max(1, n))) for c, n in enumerate(counts)}
    print(f"train {len(train_idx)} / val {len(val_idx)} images (after dropping near-duplicates of evaluation images); "
          f"counts {dict(zip(group_names, counts.tolist()))}; weights {class_weight}")

    x_train, y_train = images[train_idx], allowed_labels(labels[train_idx])
    x_val, y_val = images[val_idx], allowed_labels(labels[val_idx])
    # Class weights as per-sample weights so they survive the tf.data pipeline.
    w_train = np.array([class_weight[c] for c in labels[train_idx]], dtype=np.float32)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train, w_train))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(lambda x, y, w: (train_common.augment_batch(x, remap=args.intensity_remap), y, w))
        .prefetch(1)
        .with_options(options)
    )
    steps = len(x_train) // args.batch_size
    model = build_classifier(
        args.size,
        widths=tuple(int(v) for v in args.widths.split(",")),
        depths=tuple(int(v) for v in args.depths.split(",")),
        dropout=args.dropout,
    )
    train_common.load_initial_weights(model, args.init)
    schedule = train_common.cosine_schedule(args.lr, steps * args.epochs, warmup_steps=steps * min(2, args.epochs))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay),
        loss=partial_label_loss(args.label_smoothing),
    )
    callbacks = [
        balanced_accuracy_callback(x_val, labels[val_idx]),
        keras.callbacks.ModelCheckpoint(out / "best.keras", monitor="val_balanced_accuracy", mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(out / "last.keras"),
        train_common.budget_callback(schedule, budget_minutes=args.time_budget_min, steps_per_epoch=steps, max_epochs=args.epochs),
        keras.callbacks.CSVLogger(out / "log.csv"),
        train_common.progress_callback("classifier"),
    ]
    started = time.time()
    history = model.fit(train_ds, validation_data=(x_val, y_val), epochs=args.epochs, callbacks=callbacks, verbose=0)
    best_epoch = int(np.argmax(history.history["val_balanced_accuracy"]))
    summary = {
        "best_epoch": best_epoch + 1,
        "val_balanced_accuracy": history.history["val_balanced_accuracy"][best_epoch],
        "val_recalls": {k[len("val_recall_"):]: history.history[k][best_epoch] for k in history.history if k.startswith("val_recall_")},
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "class_counts": dict(zip(group_names, counts.tolist())),
        "initialized_from": str(args.init) if args.init else None,
    }
    train_common.write_summary(out, summary, model=model, history=history, started=started, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
