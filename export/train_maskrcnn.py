"""`python -m export train maskrcnn`: train the tumor detector (CPU or GPU).

Backbone: ImageNet EfficientNet-Lite0 + FPN (`--backbone lite0`, default) or
the earlier from-scratch ResNet/GroupNorm trunk (`--backbone resnet_gn`).
Data: br35h-polygons/train + ruslan-kl-polygons/train (one instance per VIA
region), lgg-flair/train (one instance per connected component of the FLAIR
mask; whole patients held out), sartaj-boxes (boxes only: those batches train
the RPN and box head, the mask branch is switched off for them, so a box is
never a mask label), and negatives: Sartaj `Training/no_tumor`, tumor-free LGG
slices, the training half of head-ct. Near-duplicates of any evaluation image
are dropped (export/eval_subsets.json). Model selection: ruslan-kl-polygons/val
and the held-out LGG patients, with the false-positive rate on held-out
negatives; no evaluation split is looked at here. Each epoch draws
`--epoch-slices` slices (all when 0); batches hold one kind (masks or boxes).

Writes to --out: args.json, log.csv (one row per epoch), last.pt and best.pt
(checkpoints carry the model config and these arguments).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import time
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.datasets import (
    LGG_MIN_TUMOR_PX,
    AnnotatedSlice,
    BoxedSlice,
    default_data_root,
    load_lgg_split,
    load_sartaj_boxes,
    load_via_split,
    negative_slices,
)
from export.maskrcnn_data import Augment, DetectionDataset, InstanceSet, collate, load_instances
from export.maskrcnn_metrics import SERVING_THRESHOLD, Prediction, coco_metrics, false_positive_rate
from export.maskrcnn_model import MaskRCNNConfig, build_maskrcnn, count_parameters, lite0_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SPLITS = (("br35h-polygons", "train"), ("ruslan-kl-polygons", "train"))
SELECTION_SPLIT = ("ruslan-kl-polygons", "val")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the Mask R-CNN tumor detector.")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "maskrcnn", help="run folder: args.json, log.csv, last.pt, best.pt")
    parser.add_argument("--size", type=int, default=MaskRCNNConfig.input_size, help="square input side S (the config's input_size)")
    parser.add_argument("--backbone", choices=("lite0", "resnet_gn"), default="lite0",
                        help="lite0: ImageNet EfficientNet-Lite0 + FPN; resnet_gn: the from-scratch GroupNorm ResNet trunk")
    parser.add_argument("--boxes", action=argparse.BooleanOptionalAction, default=True, help="train on the sartaj-boxes slices (box losses only)")
    parser.add_argument("--lgg", action=argparse.BooleanOptionalAction, default=True, help="train on lgg-flair/train masks and negatives")
    parser.add_argument("--lgg-val-patients", type=int, default=12, help="lgg-flair/train patients held out for selection")
    parser.add_argument("--epoch-slices", type=int, default=1600, help="slices drawn per epoch (0 = every slice once)")
    parser.add_argument("--trunk-width", type=int, default=MaskRCNNConfig.trunk_width, help="ResNet stem width (stages double it)")
    parser.add_argument("--fpn-channels", type=int, default=MaskRCNNConfig.fpn_channels, help="FPN output channels")
    parser.add_argument("--epochs", type=int, default=200, help="maximum epochs (a --time-budget may stop earlier)")
    parser.add_argument("--time-budget-min", type=float, default=0.0, help="wall-clock budget; the LR schedule follows elapsed time so the run ends annealed (0 = epochs only)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on norms/biases)")
    parser.add_argument("--warmup-steps", type=int, default=200, help="linear warm-up steps")
    parser.add_argument("--negatives", type=float, default=1.0, help="fraction of the available no_tumor slices to train on")
    parser.add_argument("--negative-repeat", type=int, default=1, help="times each negative slice is drawn per epoch")
    parser.add_argument("--hard-negative-repeat", type=int, default=0,
                        help="extra draws per epoch for each training negative on which the model, re-scored before "
                        "every epoch, has a detection >= --hard-negative-score (0 = off)")
    parser.add_argument("--hard-negative-score", type=float, default=0.3,
                        help="detection score that makes a training negative hard (default 0.3)")
    parser.add_argument("--val-negatives", type=float, default=0.15,
                        help="share of the no_tumor slices held out (by near-duplicate group) to measure the false-positive rate")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from a checkpoint's weights, or from a shipped model.onnx "
                             "(export/maskrcnn_from_onnx.py); fresh optimizer and schedule")
    parser.add_argument("--seed", type=int, default=20240611, help="random seed")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU host is shared)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests); 0 = no limit")
    parser.add_argument("--limit", type=int, default=0, help="use only this many training slices (smoke tests); 0 = all")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_negatives(data_root: Path, val_fraction: float, seed: int) -> tuple[list[AnnotatedSlice], list[AnnotatedSlice]]:
    """(train, held-out) no_tumor slices, near-duplicate groups kept on one side."""
    from export.audit import compute_signatures, duplicate_groups, load_or_build_audit
    from export.train_common import group_split

    audit = load_or_build_audit(data_root)
    negative = [s for s in negative_slices(data_root, "Training") if not audit.is_excluded_from_training(s.path)]
    if val_fraction <= 0:
        return negative, []
    groups = duplicate_groups(compute_signatures([s.path for s in negative], progress=False))
    train_idx, val_idx = group_split(["no_tumor"] * len(negative), groups, val_fraction, seed)
    return [negative[i] for i in train_idx], [negative[i] for i in val_idx]


def training_data(args: argparse.Namespace, negative: list[AnnotatedSlice]) -> tuple[InstanceSet, list[bool]]:
    """(prepared training slices, per slice: True for a box-only target)."""
    from export.audit import load_or_build_audit
    from export.train_classifier import split_head_ct

    audit = load_or_build_audit(args.data)
    rng = np.random.default_rng(args.seed)
    negative = [negative[i] for i in sorted(rng.permutation(len(negative))[: int(round(args.negatives * len(negative)))])]
    slices: list = [s for dataset, split in TRAIN_SPLITS for s in load_via_split(args.data, dataset, split)]
    if args.boxes:
        from export.train_unet import sartaj_boxes_validation

        held_out = {s.path for s in sartaj_boxes_validation(args.data)}  # evaluated, never trained on
        slices += [BoxedSlice(path=p, box=b) for p, b in sorted(load_sartaj_boxes(args.data).items()) if p not in held_out]
    slices = [s for s in slices if not audit.is_excluded_from_training(s.path)] + negative
    if args.lgg:
        slices += lgg_training_split(args)[0]
        slices += [AnnotatedSlice(path=p, regions=()) for p in split_head_ct(args.data, args.seed)[0]]
    if args.limit:
        slices = [slices[i] for i in sorted(rng.permutation(len(slices))[: args.limit])]
    return load_instances(slices, args.size, desc="prepare train"), [isinstance(s, BoxedSlice) for s in slices]


def lgg_training_split(args: argparse.Namespace) -> tuple[list, list]:
    """(training, held-out) lgg-flair/train slices: whole patients held out (the classifier's split)."""
    from export.train_classifier import lgg_patients_split

    lgg = [s for s in load_lgg_split(args.data, "train") if s.tumor_px == 0 or s.tumor_px >= LGG_MIN_TUMOR_PX]
    val_patients = lgg_patients_split([s.patient for s in lgg], args.lgg_val_patients, args.seed)
    return [s for s in lgg if s.patient not in val_patients], [s for s in lgg if s.patient in val_patients]


def homogeneous_batches(order: list[int], box_only: list[bool], batch_size: int, epoch_slices: int,
                        seed: int, epoch: int) -> list[list[int]]:
    """Batches of dataset positions, each all box targets or all mask targets, shuffled; `epoch_slices` drawn."""
    rng = np.random.default_rng((seed, epoch))
    positions = rng.permutation(len(order))
    if epoch_slices:
        positions = positions[:epoch_slices]
    batches = []
    for kind in (True, False):
        chosen = [int(p) for p in positions if box_only[order[p]] == kind]
        batches += [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def selection_data(args: argparse.Namespace) -> tuple[InstanceSet, list]:
    """(ruslan-kl val + held-out LGG tumor slices, held-out LGG tumor-free slices)."""
    from export.audit import load_or_build_audit

    audit = load_or_build_audit(args.data)
    slices: list = [s for s in load_via_split(args.data, *SELECTION_SPLIT) if not audit.is_excluded_from_training(s.path)]
    lgg_negative: list = []
    if args.lgg:
        held_out = lgg_training_split(args)[1]
        slices += [s for s in held_out if s.tumor_px]
        lgg_negative = [s for s in held_out if not s.tumor_px]
    return load_instances(slices, args.size, desc="prepare selection"), lgg_negative


def epoch_indices(data: InstanceSet, negative_repeat: int, hard: Collection[int] = (), hard_repeat: int = 0) -> list[int]:
    """Every slice once, negatives `negative_repeat` times (more healthy anatomy per epoch), and the
    negatives in `hard` `hard_repeat` times more."""
    from export.train_common import oversample

    negative = [len(m) == 0 for m in data.masks]
    return oversample(range(len(data)), negative, negative_repeat, hard, hard_repeat).tolist()


def mine_hard_negatives(model: torch.nn.Module, data: InstanceSet, device: torch.device,
                        score: float) -> tuple[set[int], float]:
    """Indices of the training negatives on which the model has a detection >= `score`, and the
    share of training negatives flagged at the serving threshold."""
    negative = [i for i, m in enumerate(data.masks) if len(m) == 0]
    predictions = predict_grid(model, data.images[negative], device)
    top = [float(p.scores.max()) if len(p.scores) else 0.0 for p in predictions]
    hard = {i for i, s in zip(negative, top) if s >= score}
    return hard, false_positive_rate(predictions, SERVING_THRESHOLD)


@torch.no_grad()
def predict_grid(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> list[Prediction]:
    """Detections on the S×S grid for N×S×S prepared images, one image at a time (as served)."""
    model.eval()
    out = []
    for image in images:
        det = model([torch.from_numpy(np.ascontiguousarray(image))[None].to(device)])[0]
        out.append(Prediction(det["boxes"].cpu().numpy(), det["scores"].cpu().numpy(), det["masks"][:, 0].cpu().numpy()))
    return out


def box_batch_losses(model: torch.nn.Module, images: list, targets: list) -> dict:
    """Losses of a box-only batch: the mask branch is switched off, so only the RPN and box head learn."""
    heads = model.roi_heads
    mask_pool, heads.mask_roi_pool = heads.mask_roi_pool, None
    try:
        return model(images, targets)
    finally:
        heads.mask_roi_pool = mask_pool


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up, then cosine to 1% of the peak over `progress` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def initial_weights(model: torch.nn.Module, path: Path, device: torch.device) -> dict:
    """--init: a training checkpoint (.pt) or a shipped model.onnx (a fresh clone has no runs/)."""
    if path.suffix == ".onnx":
        from export.maskrcnn_from_onnx import state_dict_from_onnx

        return state_dict_from_onnx(model, path)
    return torch.load(path, map_location=device, weights_only=False)["model"]


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: MaskRCNNConfig,
                    args: argparse.Namespace, epoch: int, step: int, metrics: dict) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def main(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"datasets folder {args.data} not found; pass --data or set BRAINSCAN_DATA")
        return 2
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}, indent=2) + "\n")

    if args.backbone == "lite0":
        config = lite0_config(args.size)
    else:
        config = MaskRCNNConfig(input_size=args.size, trunk_width=args.trunk_width, fpn_channels=args.fpn_channels)
    train_negatives, held_out_negatives = split_negatives(args.data, args.val_negatives, args.seed)
    train, box_only = training_data(args, train_negatives)
    selection, lgg_negatives = selection_data(args)
    held_out_negatives = held_out_negatives + lgg_negatives
    held_out = load_instances(held_out_negatives, args.size, desc="prepare held-out negatives") if held_out_negatives else None
    positives = sum(1 for m in train.masks if len(m))
    print(f"train: {len(train)} slices ({sum(box_only)} box-only, {positives} with tumors, {len(train) - positives} negatives x{args.negative_repeat}, "
          f"{sum(len(m) for m in train.masks)} instances); selection: {len(selection)} slices, "
          f"{len(held_out_negatives)} held-out negatives; S={args.size}")

    model = build_maskrcnn(config).to(device)
    if args.init:
        model.load_state_dict(initial_weights(model, Path(args.init), device))
        print(f"initialized from {args.init}")
    print(f"model: {count_parameters(model) / 1e6:.2f} M parameters; device {device}, threads {args.threads}")
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    dataset = DetectionDataset(train, Augment(), seed=args.seed, order=epoch_indices(train, args.negative_repeat), box_only=box_only)

    def epoch_loader(epoch: int) -> torch.utils.data.DataLoader:
        batches = homogeneous_batches(dataset.order, box_only, args.batch_size, args.epoch_slices, args.seed, epoch)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=args.workers)

    steps_per_epoch = max(1, len(epoch_loader(0)))
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    start_epoch, step, best, elapsed_before = 0, 0, -1.0, 0.0
    if args.resume:
        state = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state.get("metrics", {}).get("best_mask_ap50", -1.0)
        elapsed_before = state.get("metrics", {}).get("elapsed_s", 0.0)

    budget_s = args.time_budget_min * 60.0
    started = time.time() - elapsed_before
    log_path = out / "log.csv"
    fields = ["epoch", "step", "lr", "elapsed_s", "loss", "loss_classifier", "loss_box_reg", "loss_mask",
              "loss_objectness", "loss_rpn_box_reg", "sel_box_ap50", "sel_mask_ap50", "sel_mask_ap", "held_out_fp_rate",
              "hard_negatives", "train_negative_fp_rate"]
    if not log_path.is_file() or not args.resume:
        with log_path.open("w", newline="") as handle:
            csv.DictWriter(handle, fields).writeheader()

    def progress() -> float:
        by_steps = step / max(1, total_steps)
        by_time = (time.time() - started) / budget_s if budget_s else 0.0
        return max(by_steps, by_time)

    done = False
    for epoch in range(start_epoch, args.epochs):
        dataset.epoch = epoch
        mined: dict[str, float | int] = {}
        if args.hard_negative_repeat > 0:
            hard, train_fp = mine_hard_negatives(model, train, device, args.hard_negative_score)
            dataset.order = epoch_indices(train, args.negative_repeat, hard, args.hard_negative_repeat)
            mined = {"hard_negatives": len(hard), "train_negative_fp_rate": round(train_fp, 4)}
            print(f"epoch {epoch + 1}: {len(hard)} hard negatives drawn {args.hard_negative_repeat}x more; "
                  f"training negatives flagged at the serving threshold: {train_fp:.3f}", flush=True)
        model.train()
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(epoch_loader(epoch), desc=f"epoch {epoch + 1}", unit="batch", disable=args.no_progress, mininterval=10.0)
        for images, targets in bar:
            factor = lr_factor(progress(), step, args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * factor
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, enabled=scaler.is_enabled()):
                losses = box_batch_losses(model, images, targets) if "masks" not in targets[0] else model(images, targets)
                loss = sum(losses.values())
            if not torch.isfinite(loss):
                print(f"non-finite loss at step {step}: {({k: float(v) for k, v in losses.items()})}; skipping batch")
                optimizer.zero_grad(set_to_none=True)
                step += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            count += 1
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", lr=f"{args.lr * factor:.2e}", refresh=False)
            if progress() >= 1.0:
                done = True
                break
        bar.close()
        selection_metrics = coco_metrics(selection.masks_bool(), predict_grid(model, selection.images, device)) if len(selection) else {}
        row = {
            "epoch": epoch + 1, "step": step, "lr": args.lr * lr_factor(progress(), step, args.warmup_steps),
            "elapsed_s": round(time.time() - started, 1),
            **{k: round(v / max(1, count), 5) for k, v in sums.items()},
            "sel_box_ap50": selection_metrics.get("box_ap50"), "sel_mask_ap50": selection_metrics.get("mask_ap50"),
            "sel_mask_ap": selection_metrics.get("mask_ap"),
            **mined,
            "held_out_fp_rate": (round(false_positive_rate(predict_grid(model, held_out.images, device), SERVING_THRESHOLD), 4)
                                 if held_out is not None else None),
        }
        with log_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fields).writerow({k: row.get(k) for k in fields})
        print(json.dumps(row), flush=True)
        score = selection_metrics.get("mask_ap50", 0.0)
        score = -1.0 if score != score else score  # NaN → worst
        if row["held_out_fp_rate"] is not None:
            score -= row["held_out_fp_rate"]  # a healthy slice flagged costs as much as a tumor missed
        metrics = {"elapsed_s": row["elapsed_s"], "selection": selection_metrics, "best_mask_ap50": max(best, score),
                   "held_out_fp_rate": row["held_out_fp_rate"]}
        save_checkpoint(out / "last.pt", model, optimizer, config, args, epoch, step, metrics)
        if score >= best:
            best = score
            save_checkpoint(out / "best.pt", model, optimizer, config, args, epoch, step, metrics)
        if done or step >= total_steps:
            break
    print(f"done: {step} steps in {time.time() - started:.0f} s; checkpoints in {out} (best selection mask AP50 {best:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
