"""`brainscan train unet`: binary tumor-mask U-Net, trained from scratch.

Positives: br35h-polygons/train, ruslan-kl-polygons/train and /val (VIA
polygons, circles and ellipses rasterized); negatives: the tumor-free Sartaj
Training slices, so the model learns to return an empty mask. Every
near-duplicate of an evaluation image is dropped (see `export.audit`). Model
selection uses a validation split carved by near-duplicate group.
Loss: binary cross-entropy + batch soft Dice.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from export import train_common
from export.datasets import AnnotatedSlice, load_via_split, negative_slices

MODEL = "unet"
POSITIVE_SPLITS = (("br35h-polygons", "train"), ("ruslan-kl-polygons", "train"), ("ruslan-kl-polygons", "val"))
THRESHOLD = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the tumor-segmentation U-Net (Keras, from scratch).")
    train_common.add_common_args(parser, model=MODEL, size=112, epochs=16, batch=16, lr=3e-3)
    parser.add_argument("--base-filters", type=int, default=8, help="filters of the first U-Net level (doubles per level)")
    parser.add_argument("--levels", type=int, default=4, help="number of down-sampling levels")
    parser.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft-Dice term next to BCE")
    parser.add_argument("--negative-repeat", type=int, default=1, help="times each tumor-free training slice is drawn per epoch")
    return parser


def training_slices(args: argparse.Namespace) -> tuple[list[AnnotatedSlice], np.ndarray, np.ndarray]:
    """(slices, train indices, val indices): positives then negatives, duplicates of evaluation images dropped."""
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit

    audit = load_or_build_audit(args.data)
    slices = [s for d, split in POSITIVE_SPLITS for s in load_via_split(args.data, d, split)]
    slices += negative_slices(args.data, "Training")
    slices = [s for s in slices if not audit.is_excluded_from_training(s.path)]
    if args.limit:
        rng = np.random.default_rng(args.seed)
        slices = [slices[i] for i in sorted(rng.choice(len(slices), size=min(args.limit, len(slices)), replace=False))]
    kinds = ["positive" if s.regions else "negative" for s in slices]
    groups = duplicate_groups(compute_signatures([s.path for s in slices]))
    train_idx, val_idx = train_common.group_split(kinds, groups, args.val_fraction, args.seed)
    return slices, train_idx, val_idx


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean masks; an empty prediction on an empty truth scores 1."""
    axes = tuple(range(1, pred.ndim))
    inter = (pred & truth).sum(axis=axes)
    total = pred.sum(axis=axes) + truth.sum(axis=axes)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def bce_dice_loss(dice_weight: float):
    import keras
    from keras import ops

    bce = keras.losses.BinaryCrossentropy()

    def loss(y_true, y_pred):
        # Batch-level soft Dice: defined on all-negative images, whose per-image Dice would be 0/0.
        inter = ops.sum(y_true * y_pred)
        dice = 1.0 - (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)
        return bce(y_true, y_pred) + dice_weight * dice

    return loss


def segmentation_callback(val_x: np.ndarray, val_y: np.ndarray):
    """Adds val_dice (tumor slices), val_empty_rate (tumor-free slices) and val_score (their mean) to the logs."""
    import keras

    positive = val_y.reshape(len(val_y), -1).any(axis=1)

    class SegmentationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pred = self.model.predict(val_x, batch_size=32, verbose=0) >= THRESHOLD
            dice = dice_scores(pred, val_y >= 0.5)
            dice_pos = float(dice[positive].mean()) if positive.any() else 1.0
            empty = float((~pred[~positive].reshape((~positive).sum(), -1).any(axis=1)).mean()) if (~positive).any() else 1.0
            if logs is not None:
                logs.update(val_dice=dice_pos, val_empty_rate=empty, val_score=(dice_pos + empty) / 2.0)

    return SegmentationMetrics()


def main(args: argparse.Namespace) -> int:
    train_common.setup_tensorflow(args.threads, args.seed)
    import keras
    import tensorflow as tf

    from export.keras_models import build_unet
    from export.prepared import prepared_slices

    out = train_common.start_run(args)
    slices, train_idx, val_idx = training_slices(args)
    images, masks = prepared_slices(slices, args.size, desc="prepare slices")
    n_pos = sum(1 for i in train_idx if slices[i].regions)
    print(f"train {len(train_idx)} ({n_pos} tumor, {len(train_idx) - n_pos} tumor-free) / val {len(val_idx)} slices "
          "(after dropping near-duplicates of evaluation images)")

    # Negatives repeated: healthy anatomy is what the model must learn to leave empty.
    train_idx_epoch = train_common.oversample_negatives(
        train_idx, [not slices[i].regions for i in train_idx], args.negative_repeat)
    x_train, y_train = images[train_idx_epoch], masks[train_idx_epoch]
    x_val, y_val = images[val_idx], masks[val_idx]
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(lambda x, y: train_common.augment_batch(x, y))
        .prefetch(1)
        .with_options(options)
    )
    steps = len(x_train) // args.batch_size
    model = build_unet(args.size, base=args.base_filters, levels=args.levels)
    train_common.load_initial_weights(model, args.init)
    schedule = train_common.cosine_schedule(args.lr, steps * args.epochs, warmup_steps=steps * min(2, args.epochs))
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay),
        loss=bce_dice_loss(args.dice_weight),
    )
    callbacks = [
        segmentation_callback(x_val, y_val),
        keras.callbacks.ModelCheckpoint(out / "best.keras", monitor="val_score", mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(out / "last.keras"),
        train_common.budget_callback(schedule, budget_minutes=args.time_budget_min, steps_per_epoch=steps, max_epochs=args.epochs),
        keras.callbacks.CSVLogger(out / "log.csv"),
        train_common.progress_callback("unet"),
    ]
    started = time.time()
    history = model.fit(train_ds, validation_data=(x_val, y_val), epochs=args.epochs, callbacks=callbacks, verbose=0)
    best = int(np.argmax(history.history["val_score"]))
    summary = {
        "best_epoch": best + 1,
        **{k: history.history[k][best] for k in ("val_score", "val_dice", "val_empty_rate", "val_loss")},
        "train_slices": int(len(train_idx)),
        "train_tumor_slices": int(n_pos),
        "negative_repeat": args.negative_repeat,
        "initialized_from": str(args.init) if args.init else None,
        "val_slices": int(len(val_idx)),
    }
    train_common.write_summary(out, summary, model=model, history=history, started=started, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
