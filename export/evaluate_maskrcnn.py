"""`python -m export evaluate maskrcnn`: COCO box/mask AP and the false-positive rate, as served.

Each slice takes the gateway's path: `prepare(S)` → model → boxes and masks
mapped back to original pixels (`boxes_to_original`, `mask_to_original`), and
is scored there against the VIA regions rasterized at full resolution.

- br35h-polygons/val and ruslan-kl-polygons/test: box and mask AP@0.5 and
  AP@0.5:0.95 (pycocotools), plus the share of slices with a detection at the
  serving threshold;
- sartaj-classification/Testing/no_tumor: share of slices with a detection
  ≥ the serving threshold (false-positive rate);

each on the full split and on its duplicate-free subset (export/eval_subsets.json).
The model is a training checkpoint (PyTorch) or, with --onnx, the exported
graph through ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from tqdm import tqdm

from export.datasets import AnnotatedSlice, default_data_root, load_classification_split, load_via_split
from export.error_gallery import ErrorCase, write_gallery
from export.intervals import evidence_groups, mean_interval
from export.maskrcnn_metrics import (
    MASK_THRESHOLD,
    SERVING_THRESHOLD,
    Prediction,
    box_ap50_interval,
    coco_metrics,
    false_positive_rate,
)
from gateway.preprocessing import PreparedImage, boxes_to_original, crop_and_resize, load_image_file, mask_to_original, prepare

REPO_ROOT = Path(__file__).resolve().parents[1]
DETECTION_SPLITS = ("br35h-polygons/val", "ruslan-kl-polygons/test")
NEGATIVE_SPLIT = "sartaj-classification/Testing"
DEFAULT_OUT = REPO_ROOT / "runs" / "maskrcnn" / "evaluation.json"
TARGETS = {"box_ap50": 0.90, "mask_ap50": 0.85, "no_tumor_fp_rate_max": 0.05}

if TYPE_CHECKING:
    from export.audit import Audit

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # [1,S,S] → boxes, scores, masks


def torch_runner(checkpoint: Path, device: str = "cpu") -> tuple[Runner, int]:
    from export.export_maskrcnn import load_checkpoint
    from export.maskrcnn_model import MaskRCNNExportWrapper

    model, config, _ = load_checkpoint(checkpoint)
    wrapper = MaskRCNNExportWrapper(model.to(device)).eval()

    @torch.no_grad()
    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outputs = wrapper(torch.from_numpy(image).to(device))
        return tuple(o.cpu().numpy() for o in outputs)  # type: ignore[return-value]

    return run, config.input_size


def onnx_runner(model_dir: Path, threads: int = 2) -> tuple[Runner, int]:
    from export.maskrcnn_onnx import OUTPUT_NAMES, ort_session
    from gateway.contract import load_model_spec

    spec = load_model_spec(model_dir)
    session = ort_session(spec.onnx_path, threads=threads)

    def run(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(session.run(list(OUTPUT_NAMES), {"image": image}))  # type: ignore[return-value]

    return run, spec.input_size


def predict_original(run: Runner, path: Path, size: int) -> tuple[Prediction, PreparedImage, np.ndarray]:
    """Detections of one file mapped to its original pixels, exactly as the gateway maps them;
    also the prepared input and the masks on the model grid (N×S×S)."""
    gray = load_image_file(str(path)).pixels
    prepared = prepare(gray, size)
    boxes, scores, masks = run(np.ascontiguousarray(prepared.tensor, dtype=np.float32)[None])
    full_boxes = boxes_to_original(boxes, prepared, size)
    full_masks = np.stack([mask_to_original(m[0], prepared) >= MASK_THRESHOLD for m in masks]) if len(masks) else (
        np.zeros((0, *gray.shape), bool))
    return Prediction(full_boxes, scores.astype(np.float32), full_masks), prepared, masks[:, 0]


def _detected_mask(grid_masks: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray | None:
    """Union of the served detections' masks on the model grid (None when nothing is served)."""
    served = grid_masks[scores >= threshold]
    return (served >= MASK_THRESHOLD).any(axis=0) if len(served) else None


def evaluate_detection_split(run: Runner, size: int, slices: list[AnnotatedSlice], keep_free: set[Path],
                             threshold: float, desc: str, errors: list[ErrorCase] | None = None) -> dict[str, dict[str, object]]:
    """COCO AP on one split; with `errors`, also collects the slices with no detection ≥ threshold."""
    gts, preds, free = [], [], []
    for item in tqdm(slices, desc=desc, unit="img"):
        pred, prepared, grid_masks = predict_original(run, item.path, size)
        shape = prepared.original_shape
        masks = item.instance_masks(*shape)
        gts.append(np.stack(masks) if masks else np.zeros((0, *shape), bool))
        preds.append(pred)
        free.append(item.path.resolve() in keep_free)
        if errors is not None and not (pred.scores >= threshold).any():
            truth = item.union_mask(*shape).view(np.uint8)
            errors.append(ErrorCase(
                group=f"maskrcnn-missed-{desc.replace('/', '-')}", path=item.path, duplicate_free=free[-1],
                truth="tumor", prediction="nothing", score=float(pred.scores.max()) if len(pred.scores) else 0.0,
                image=prepared.tensor, true_mask=crop_and_resize(truth, prepared.crop, size, interpolation=cv2.INTER_NEAREST) > 0,
            ))
    out = {}
    groups = evidence_groups([item.path for item in slices])
    for name, chosen in (("full", [True] * len(slices)), ("duplicate_free", free)):
        g = [x for x, c in zip(gts, chosen) if c]
        p = [x for x, c in zip(preds, chosen) if c]
        row: dict[str, object] = {"images": len(g), "instances": int(sum(len(x) for x in g))}
        if g:
            row.update({k: round(v, 4) for k, v in coco_metrics(g, p).items()})
            row["box_ap50_ci95"] = box_ap50_interval(g, p, [x for x, c in zip(groups, chosen) if c])
            # Same helper as the FP rate: here "an image with a detection" is the wanted outcome.
            row["detected_at_threshold"] = round(false_positive_rate(p, threshold), 4)
        out[name] = row
    return out


def evaluate_negatives(run: Runner, size: int, paths: list[Path], keep_free: set[Path], threshold: float,
                       errors: list[ErrorCase] | None = None) -> dict[str, dict[str, object]]:
    """False-positive rate on tumor-free slices; with `errors`, also collects the flagged ones."""
    preds, free = [], []
    for path in tqdm(paths, desc="no_tumor", unit="img"):
        gray = load_image_file(str(path)).pixels
        prepared = prepare(gray, size)
        _, scores, grid_masks = run(np.ascontiguousarray(prepared.tensor, dtype=np.float32)[None])
        preds.append(Prediction(np.zeros((len(scores), 4), np.float32), scores, np.zeros((len(scores), 1, 1), bool)))
        free.append(path.resolve() in keep_free)
        if errors is not None and (detected := _detected_mask(grid_masks[:, 0], scores, threshold)) is not None:
            errors.append(ErrorCase(
                group="maskrcnn-detection-on-Testing-no_tumor", path=path, duplicate_free=free[-1],
                truth="no_tumor", prediction="tumor", score=float(scores.max()), image=prepared.tensor,
                predicted_mask=detected,
            ))
    out = {}
    groups = evidence_groups(paths)
    for name, chosen in (("full", [True] * len(paths)), ("duplicate_free", free)):
        p = [x for x, c in zip(preds, chosen) if c]
        rate = false_positive_rate(p, threshold)
        flagged = [bool((x.scores >= threshold).any()) for x in p]
        out[name] = {"images": len(p), "fp_rate": None if rate != rate else round(rate, 4),
                     "fp_rate_ci95": mean_interval(flagged, [x for x, c in zip(groups, chosen) if c]),
                     "max_score_mean": round(float(np.mean([x.scores.max() if len(x.scores) else 0.0 for x in p])), 4) if p else None}
    return out


def _new_sources(args: argparse.Namespace, run: Runner, size: int, limit: int | None) -> dict[str, object]:
    """lgg-flair/val (tumor slices >= 200 px: AP; tumor-free: detections), the sartaj-boxes validation part
    (box AP only: its targets are boxes) and the held-out head-ct half (detections)."""
    from export.datasets import LGG_MIN_TUMOR_PX, load_lgg_split
    from export.train_classifier import split_head_ct
    from export.train_unet import sartaj_boxes_validation

    lgg = load_lgg_split(args.data, "val")
    tumor = [s for s in lgg if s.tumor_px >= LGG_MIN_TUMOR_PX][:limit]
    healthy = [s.path for s in lgg if s.tumor_px == 0][:limit]
    boxed = sartaj_boxes_validation(args.data)[:limit]
    head_ct = split_head_ct(args.data, seed=20240611)[1][:limit]
    everything = {s.path.resolve() for s in tumor} | {s.path.resolve() for s in boxed} | {p.resolve() for p in healthy + head_ct}
    return {
        "lgg-flair/val": evaluate_detection_split(run, size, tumor, everything, args.threshold, "lgg-flair/val"),
        "lgg-flair/val/tumor_free": {"split": "lgg-flair/val tumor-free slices",
                                     **evaluate_negatives(run, size, healthy, everything, args.threshold)},
        "sartaj-boxes/validation": evaluate_detection_split(run, size, boxed, everything, args.threshold, "sartaj-boxes/validation"),
        "head-ct/held-out": {"split": "head-ct held-out half", **evaluate_negatives(run, size, head_ct, everything, args.threshold)},
    }


def targets_report(results: dict) -> dict[str, object]:
    br35h = results["br35h-polygons/val"]
    report = {}
    for subset in ("full", "duplicate_free"):
        row = br35h[subset]
        report[f"br35h_val_{subset}_box_ap50>=0.90"] = bool(row.get("box_ap50", 0) >= TARGETS["box_ap50"])
        report[f"br35h_val_{subset}_mask_ap50>=0.85"] = bool(row.get("mask_ap50", 0) >= TARGETS["mask_ap50"])
    fp = results["no_tumor"]["full"]["fp_rate"]
    report["no_tumor_fp_rate<=0.05"] = bool(fp is not None and fp <= TARGETS["no_tumor_fp_rate_max"])
    if "lgg-flair/val" in results:
        report["lgg_val_box_ap50>=0.80"] = bool(results["lgg-flair/val"]["full"].get("box_ap50", 0) >= 0.80)
        healthy = results["lgg-flair/val/tumor_free"]["full"]["fp_rate"]
        report["lgg_val_tumor_free_without_instance>=0.95"] = bool(healthy is not None and 1.0 - healthy >= 0.95)
        report["sartaj_boxes_validation_box_ap50>=0.85"] = bool(results["sartaj-boxes/validation"]["full"].get("box_ap50", 0) >= 0.85)
        ct = results["head-ct/held-out"]["full"]["fp_rate"]
        report["head_ct_fp_rate<=0.05"] = bool(ct is not None and ct <= TARGETS["no_tumor_fp_rate_max"])
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="COCO box/mask AP and the no_tumor false-positive rate of the Mask R-CNN.")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate a training checkpoint (PyTorch) instead of the ONNX file")
    parser.add_argument("--onnx", type=Path, default=REPO_ROOT / "model_repository" / "maskrcnn", help="exported model folder evaluated through ONNX Runtime (default: the committed model_repository/maskrcnn)")
    parser.add_argument("--threshold", type=float, default=SERVING_THRESHOLD, help=f"serving score threshold (false-positive rate, detected share; default {SERVING_THRESHOLD})")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (checkpoints only)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N slices of each split (smoke tests); 0 = all")
    parser.add_argument("--output", "--out", dest="out", type=Path, default=None,
                        help=f"where to write the metrics JSON (default {DEFAULT_OUT.relative_to(REPO_ROOT)}, which "
                        "`python -m export export maskrcnn` puts in the model card; with --limit, only where given)")
    parser.add_argument("--errors", type=Path, default=None, metavar="DIR",
                        help="also write an error gallery to DIR: a contact sheet per kind of error and errors.csv")
    return parser


def main(args: argparse.Namespace) -> int:
    from export.audit import load_or_build_audit
    from export.cli_checks import DATA_HINT, argument_problem, fail
    from gateway.errors import BrainscanError

    prog = "python -m export evaluate maskrcnn"
    if problem := argument_problem(data=args.data, output=args.out, errors_dir=args.errors, limit=args.limit):
        return fail(prog, problem)
    # A smoke run (--limit) must not replace the full evaluation the model card is built from.
    out = args.out if args.out is not None or args.limit else DEFAULT_OUT
    torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        try:
            run, size = onnx_runner(args.onnx, args.threads)
        except BrainscanError as error:  # no model folder, or a config that does not match its file
            return fail(prog, str(error))
        onnx_folder = Path(args.onnx).resolve()
        source = f"onnx:{onnx_folder.relative_to(REPO_ROOT) if onnx_folder.is_relative_to(REPO_ROOT) else onnx_folder}"
    else:
        if not Path(args.checkpoint).is_file():
            return fail(prog, f"checkpoint {args.checkpoint} not found; run `python -m export train maskrcnn` first")
        run, size = torch_runner(args.checkpoint, args.device)
        source = f"checkpoint:{args.checkpoint}"
    try:
        return _evaluate(args, run, size, source, out, load_or_build_audit(args.data))
    except FileNotFoundError as error:
        return fail(prog, f"{error}; {DATA_HINT}")


def _evaluate(args: argparse.Namespace, run: Runner, size: int, source: str, out: Path | None, audit: Audit) -> int:
    """Every split through `run`; prints the JSON and writes it to `out` (when given)."""
    limit = args.limit or None
    errors: list[ErrorCase] | None = None if args.errors is None else []
    started = time.time()
    results: dict[str, object] = {}
    for key in DETECTION_SPLITS:
        dataset, split = key.split("/")
        slices = load_via_split(args.data, dataset, split)[:limit]
        free = {p.resolve() for p in audit.duplicate_free_paths(key)}
        results[key] = evaluate_detection_split(run, size, slices, free, args.threshold, key, errors)
    negatives = [p for p, label in load_classification_split(args.data, "Testing") if label == "no_tumor"][:limit]
    free = {p.resolve() for p in audit.duplicate_free_paths(NEGATIVE_SPLIT)}
    results["no_tumor"] = {"split": f"{NEGATIVE_SPLIT}/no_tumor", **evaluate_negatives(run, size, negatives, free, args.threshold, errors)}
    results.update(_new_sources(args, run, size, limit))
    if errors is not None:
        written = write_gallery(errors, args.errors, data_root=args.data)
        print(f"{len(errors)} errors: {', '.join(str(path) for path in written)}", file=sys.stderr)
    payload = {
        "model": source,
        "input_size": size,
        "serving_threshold": args.threshold,
        "grid": "original pixels (predictions mapped back through the gateway's crop)",
        "results": results,
        "targets": targets_report(results),
        "seconds": round(time.time() - started, 1),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
