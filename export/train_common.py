"""Pieces shared by the two Keras training commands.

TensorFlow set-up (threads, seed, determinism), on-batch augmentation,
a tqdm progress callback, the run folder (args.json, log.csv, checkpoints)
and a duplicate-aware train/validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def setup_tensorflow(threads: int, seed: int) -> None:
    """Pin thread pools (the machine is shared) and make runs repeatable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def add_common_args(parser: argparse.ArgumentParser, *, model: str, size: int, epochs: int, batch: int, lr: float) -> None:
    from export.datasets import default_data_root

    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--size", type=int, default=size, help="square input side S of the model")
    parser.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=batch, help="batch size")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW, cosine decay after warm-up)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    parser.add_argument("--seed", type=int, default=20240611, help="random seed (numpy, TF, split)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of training data held out for model selection")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / model, help="run folder: args.json, log.csv, checkpoints")
    parser.add_argument("--time-budget-min", type=float, default=0.0, help="wall-clock budget: the cosine schedule is fitted to the epochs that fit (0 = exactly --epochs)")
    parser.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke tests); 0 = all")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from the weights of a previous run's .keras checkpoint, or of a shipped model's "
                             "model.savedmodel folder (same architecture; fresh schedule)")


def load_initial_weights(model, path: Path | None) -> None:
    """Copy a previous run's weights into `model` (for a fine-tuning run).

    `path` is a `.keras` checkpoint, or a SavedModel folder written by `python -m export export --savedmodel`
    (e.g. `model_repository/unet/1/model.savedmodel`): the shipped weights, matched by variable name,
    so a model can be fine-tuned from the repository when its run folder is gone.
    """
    if path is None:
        return
    if (Path(path) / "saved_model.pb").is_file():
        model.set_weights(_savedmodel_weights(model, Path(path)))
    else:
        import keras

        model.set_weights(keras.models.load_model(path, compile=False).get_weights())
    print(f"initialized from {path}")


def _savedmodel_weights(model, path: Path) -> list[np.ndarray]:
    import tensorflow as tf

    saved = {v.name.removesuffix(":0"): v for v in tf.saved_model.load(str(path)).variables}
    missing = [w.path for w in model.weights if w.path not in saved]
    if missing:
        raise ValueError(f"{path} is not a SavedModel of this architecture: it lacks {missing[:5]} "
                         f"({len(missing)} of {len(model.weights)} weights)")
    weights = [saved[w.path].numpy() for w in model.weights]
    for w, value in zip(model.weights, weights):
        if tuple(w.shape) != value.shape:
            raise ValueError(f"{path}: weight {w.path} has shape {value.shape}, the model wants {tuple(w.shape)}")
    return weights


def oversample(indices: Sequence[int], flagged: Sequence[bool], repeat: int,
               hard: Collection[int] = (), hard_repeat: int = 0) -> np.ndarray:
    """`indices` with each one whose flag is set (a negative, say) listed `repeat` times (one epoch's draws),
    and those of them also in `hard` (negatives the model currently fires on) `hard_repeat` times more."""
    counts = [max(1, repeat) + (hard_repeat if index in hard else 0) if is_flagged else 1
              for index, is_flagged in zip(indices, flagged)]
    return np.repeat(np.asarray(indices, dtype=np.int64), counts)


def init_chain(init: str | Path | None) -> list[tuple[str, Path, dict]]:
    """(checkpoint, its run folder, that run's arguments) for a fine-tuning run's `--init`, then that run's,
    back to a run from scratch.

    Each run folder's args.json ({} when missing) names the checkpoint it started from.
    """
    chain: list[tuple[str, Path, dict]] = []
    while init and str(init) not in {c for c, _, _ in chain}:
        run_dir = Path(init).parent
        args_file = run_dir / "args.json"
        run_args = json.loads(args_file.read_text()) if args_file.is_file() else {}
        chain.append((str(init), run_dir, run_args))
        init = run_args.get("init")
    return chain


def start_run(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}, indent=2) + "\n")
    return out


def group_split(
    labels: Sequence[str], groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split that keeps every near-duplicate group on one side.

    Without it, copies of a validation slice sit in training and model
    selection rewards memorization.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    val = np.zeros(len(labels_arr), dtype=bool)
    for label in sorted(set(labels_arr.tolist())):
        members = np.nonzero(labels_arr == label)[0]
        group_ids = np.unique(groups[members])
        rng.shuffle(group_ids)
        target, taken = val_fraction * len(members), 0
        for gid in group_ids:
            if taken >= target:
                break
            chosen = members[groups[members] == gid]
            val[chosen] = True
            taken += len(chosen)
    # A group spanning two labels could straddle; pull it wholly into validation.
    for gid in np.unique(groups[val]):
        val[groups == gid] = True
    return np.nonzero(~val)[0], np.nonzero(val)[0]


def cosine_schedule(lr: float, total_steps: int, warmup_steps: int):
    """Linear warm-up then cosine decay; `total_steps` can be moved during training (see `budget_callback`)."""
    import keras
    import tensorflow as tf

    class AdjustableCosine(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak: float, warmup: int, total: int) -> None:
            self.peak, self.warmup = float(peak), float(max(1, warmup))
            self.total = tf.Variable(float(max(total, warmup + 1)), trainable=False, dtype=tf.float32)

        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            warm = self.peak * (0.05 + 0.95 * step / self.warmup)
            progress = tf.clip_by_value((step - self.warmup) / tf.maximum(1.0, self.total - self.warmup), 0.0, 1.0)
            cosine = self.peak * (0.01 + 0.99 * 0.5 * (1.0 + tf.cos(math.pi * progress)))
            return tf.where(step < self.warmup, warm, cosine)

        def get_config(self):
            return {"peak": self.peak, "warmup": self.warmup, "total": float(self.total.numpy())}

    return AdjustableCosine(lr, warmup_steps, total_steps)


def budget_callback(schedule, *, budget_minutes: float, steps_per_epoch: int, max_epochs: int):
    """Fit training into a wall-clock budget on a shared machine.

    After each epoch, estimate how many epochs still fit, stretch or shrink the
    cosine schedule so it ends then, and stop when it has. A budget of 0 keeps
    the fixed epoch count (fully deterministic runs).
    """
    import time

    import keras

    class Budget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.time()
            self.durations: list[float] = []
            self.last = self.start

        def on_epoch_end(self, epoch, logs=None):
            now = time.time()
            self.durations.append(now - self.last)
            self.last = now
            if budget_minutes <= 0:
                return
            per_epoch = float(np.mean(self.durations[-2:]))
            left = budget_minutes * 60.0 - (now - self.start)
            planned = min(max_epochs, epoch + 1 + max(0, int(left // per_epoch)))
            schedule.total.assign(float(max(planned * steps_per_epoch, schedule.warmup + 1)))
            if logs is not None:
                logs["planned_epochs"] = planned
            if epoch + 1 >= planned:
                self.model.stop_training = True

    return Budget()


def augment_batch(images, masks=None, *, rotation_deg: float = 15.0, scale: tuple[float, float] = (0.85, 1.15),
                  shift: float = 0.08, flip: bool = True, intensity: bool = True, remap: float = 0.0):
    """Random affine (flip, rotation, scale, shift) + intensity jitter on a training batch.

    Masks (if given) get the same geometry and are re-binarized; intensity
    changes (gamma, contrast, brightness, noise) touch the image only. Output
    stays in [0, 1] like the gateway's tensors. With `remap` > 0, that share
    of the images first goes through a random intensity curve (below).
    """
    import tensorflow as tf

    shape = tf.shape(images)
    n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    angle = tf.random.uniform([n], -1.0, 1.0) * (rotation_deg * math.pi / 180.0)
    zoom = tf.exp(tf.random.uniform([n], math.log(scale[0]), math.log(scale[1])))
    flip_sign = tf.where(tf.random.uniform([n]) < 0.5, -1.0, 1.0) if flip else tf.ones([n])
    tx = tf.random.uniform([n], -shift, shift) * w
    ty = tf.random.uniform([n], -shift, shift) * h
    # Output→input mapping about the image centre: p_in = A^-1 (p_out - c - t) + c.
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a0, a1 = cos * flip_sign, sin
    b0, b1 = -sin * flip_sign, cos
    ox, oy = cx + tx, cy + ty
    transforms = tf.stack(
        [a0, a1, cx - a0 * ox - a1 * oy, b0, b1, cy - b0 * ox - b1 * oy, tf.zeros([n]), tf.zeros([n])], axis=1
    )
    stacked = images if masks is None else tf.concat([images, masks], axis=-1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked, transforms=transforms, output_shape=shape[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    )
    out_images = warped[..., :1]
    if remap > 0:
        out_images = random_intensity_curve(out_images, remap)
    if intensity:
        gamma = tf.exp(tf.random.uniform([n, 1, 1, 1], math.log(0.7), math.log(1.5)))
        out_images = tf.pow(tf.clip_by_value(out_images, 1e-6, 1.0), gamma)
        contrast = tf.random.uniform([n, 1, 1, 1], 0.75, 1.3)
        mean = tf.reduce_mean(out_images, axis=[1, 2, 3], keepdims=True)
        out_images = (out_images - mean) * contrast + mean + tf.random.uniform([n, 1, 1, 1], -0.08, 0.08)
        noise = tf.random.normal(tf.shape(out_images)) * tf.random.uniform([n, 1, 1, 1], 0.0, 0.03)
        out_images = tf.clip_by_value(out_images + noise, 0.0, 1.0)
    if masks is None:
        return out_images
    return out_images, tf.cast(warped[..., 1:] >= 0.5, tf.float32)


def random_intensity_curve(images, probability: float, points: int = 6):
    """Map each picked image's intensities through a random piecewise-linear curve through (0, 0).

    The curve need not be monotonic, so tissues swap brightness the way they do
    between MRI sequences (T1, T1 with contrast, T2, FLAIR): the model has to
    rely on shape and texture more than on one sequence's contrast. Black
    background stays black.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    knots = tf.concat([tf.zeros([n, 1]), tf.random.uniform([n, points - 1])], axis=1)  # curve value at i/(points-1)
    position = tf.clip_by_value(images, 0.0, 1.0) * (points - 1)
    index = tf.minimum(tf.cast(tf.floor(position), tf.int32), points - 2)
    frac = position - tf.cast(index, tf.float32)
    flat = tf.reshape(index, [n, -1])
    low = tf.reshape(tf.gather(knots, flat, batch_dims=1), tf.shape(images))
    high = tf.reshape(tf.gather(knots, flat + 1, batch_dims=1), tf.shape(images))
    curved = low + (high - low) * frac
    picked = tf.random.uniform([n, 1, 1, 1]) < probability
    return tf.where(picked, curved, images)


def progress_callback(desc: str):
    """Keras callback drawing one tqdm bar per epoch (Keras' own bar is turned off)."""
    import keras
    from tqdm import tqdm

    class TqdmProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.bar = tqdm(total=self.params.get("steps"), desc=f"{desc} epoch {epoch + 1}/{self.params.get('epochs')}",
                            unit="batch", mininterval=5.0)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

        def on_epoch_end(self, epoch, logs=None):
            self.bar.set_postfix({k: f"{float(v):.4f}" for k, v in (logs or {}).items() if k != "learning_rate"})
            self.bar.close()

    return TqdmProgress()


def write_summary(out: Path, summary: dict, *, model, history, started: float, threads: int) -> None:
    """summary.json beside the checkpoints: run facts both Keras trainings share, plus their own."""
    import json
    import platform
    import time

    summary = {
        **summary,
        "parameters": int(model.count_params()),
        "epochs_run": len(history.history["loss"]),
        "train_wall_minutes": round((time.time() - started) / 60.0, 1),
        "host": f"{platform.node()} (CPU, {threads} TF thread(s))",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best checkpoint {out / 'best.keras'}: {json.dumps(summary)}")
