"""`brainscan train classifier`: 4-class tumor classifier, trained from scratch.

Data: sartaj-classification/Training minus every near-duplicate of an
evaluation image (see `export.audit`). Model selection uses a validation split
carved from Training by near-duplicate group; Testing is never looked at here.
Recipe: small residual SE-CNN, on-batch affine + intensity augmentation,
balanced class weights, label smoothing, AdamW with warm-up + cosine decay.
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
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout before the classifier head")
    parser.add_argument("--widths", type=str, default="24,32,64,128", help="channels per stage, comma-separated")
    parser.add_argument("--depths", type=str, default="1,1,2,2", help="residual blocks per stage, comma-separated")
    return parser


def training_data(args: argparse.Namespace) -> tuple[list[Path], np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, train indices, val indices) after the duplicate exclusion."""
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit

    audit = load_or_build_audit(args.data)
    items = [(p, label) for p, label in load_classification_split(args.data, "Training") if not audit.is_excluded_from_training(p)]
    if args.limit:
        rng = np.random.default_rng(args.seed)
        items = [items[i] for i in sorted(rng.choice(len(items), size=min(args.limit, len(items)), replace=False))]
    paths = [p for p, _ in items]
    labels = np.array([CLASS_LABELS.index(label) for _, label in items])
    groups = duplicate_groups(compute_signatures(paths))
    train_idx, val_idx = train_common.group_split([CLASS_LABELS[i] for i in labels], groups, args.val_fraction, args.seed)
    return paths, labels, train_idx, val_idx


def balanced_accuracy_callback(val_x: np.ndarray, val_y: np.ndarray):
    """Adds val_balanced_accuracy (mean per-class recall) to the epoch logs before checkpoints read them."""
    import keras

    class BalancedAccuracy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(val_x, batch_size=64, verbose=0).argmax(axis=1)
            recalls = [float((pred[val_y == c] == c).mean()) for c in range(len(CLASS_LABELS)) if (val_y == c).any()]
            if logs is not None:
                logs["val_balanced_accuracy"] = float(np.mean(recalls))
                for c, name in enumerate(CLASS_LABELS):
                    if (val_y == c).any():
                        logs[f"val_recall_{name}"] = float((pred[val_y == c] == c).mean())

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
    counts = np.bincount(labels[train_idx], minlength=len(CLASS_LABELS))
    class_weight = {c: float(len(train_idx) / (len(CLASS_LABELS) * max(1, n))) for c, n in enumerate(counts)}
    print(f"train {len(train_idx)} / val {len(val_idx)} images (after dropping near-duplicates of evaluation images); "
          f"class counts {dict(zip(CLASS_LABELS, counts.tolist()))}; class weights {class_weight}")

    x_train, y_train = images[train_idx], keras.utils.to_categorical(labels[train_idx], len(CLASS_LABELS))
    x_val, y_val = images[val_idx], keras.utils.to_categorical(labels[val_idx], len(CLASS_LABELS))
    # Class weights as per-sample weights so they survive the tf.data pipeline.
    w_train = np.array([class_weight[c] for c in labels[train_idx]], dtype=np.float32)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train, w_train))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(lambda x, y, w: (train_common.augment_batch(x), y, w))
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
    schedule = train_common.cosine_schedule(args.lr, steps * args.epochs, warmup_steps=steps * min(2, args.epochs))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
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
        "val_accuracy": history.history["val_accuracy"][best_epoch],
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "class_counts": dict(zip(CLASS_LABELS, counts.tolist())),
    }
    train_common.write_summary(out, summary, model=model, history=history, started=started, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
