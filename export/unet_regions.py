"""Choose the U-Net's smallest served mask region (`min_component_px`) on its validation split.

The U-Net leaves small specks on healthy slices (vessels, bright bone, the
choroid plexus); dropping regions under a few dozen grid pixels removes most of
them and hardly any tumor pixels. The size is picked on the slices the U-Net's
training held out (near-duplicate groups of its sources, whole lgg-flair/train
patients), by the same score the training selects epochs with
(`export.train_unet.validation_parts`), with the regions filter applied as the
gateway applies it. Part of `python -m export export decision`, which then
collects the decision's evidence from the filtered masks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CANDIDATES = (0, 10, 20, 30, 40, 50, 60, 80, 100, 150)


def unet_validation_split(data_root: Path, run_dir: Path | None) -> tuple[list, list[str], np.ndarray]:
    """(slices, sources, is_box) the U-Net run held out; its args.json fixes the split, else the defaults."""
    from export.datasets import BoxedSlice
    from export.train_unet import get_args_parser, training_slices

    args = get_args_parser().parse_args([])
    args_file = Path(run_dir) / "args.json" if run_dir else None
    if args_file is not None and args_file.is_file():
        saved = json.loads(args_file.read_text())
        for key in ("seed", "val_fraction", "lgg_val_patients"):
            if key in saved:
                setattr(args, key, saved[key])
    args.data = data_root
    slices, sources, _, val_idx = training_slices(args)
    chosen = [slices[i] for i in val_idx]
    return chosen, [sources[i] for i in val_idx], np.array([isinstance(s, BoxedSlice) for s in chosen])


def score_sizes(probabilities: np.ndarray, truth: np.ndarray, sources: list[str], is_box: np.ndarray,
                threshold: float, candidates: tuple[int, ...] = CANDIDATES) -> dict[int, dict[str, object]]:
    """Per candidate size: the validation parts and their mean, masks filtered as the gateway filters them."""
    from export.train_unet import validation_parts
    from gateway.postprocessing import drop_small_components

    scores: dict[int, dict[str, object]] = {}
    for min_px in candidates:
        pred = np.stack([drop_small_components(p, threshold=threshold, min_px=min_px) >= threshold for p in probabilities])
        parts = validation_parts(pred, truth, sources, is_box)
        scores[min_px] = {"score": round(float(np.mean(list(parts.values()))), 4),
                          "parts": {k: round(v, 4) for k, v in parts.items()}}
    return scores


def best_size(scores: dict[int, dict[str, object]]) -> int:
    """The highest-scoring size; on a tie the smaller (drop no more than the data asks for)."""
    return max(sorted(scores), key=lambda px: (scores[px]["score"], -px))


def choose_min_component_px(repository: Path, data_root: Path, run_dir: Path | None, threads: int,
                            threshold: float) -> dict[str, object]:
    """Run the exported U-Net (ONNX Runtime, the gateway's preprocessing) on its validation split and choose."""
    from export.evaluate_keras import OnnxModel
    from export.prepared import prepared_slices

    slices, sources, is_box = unet_validation_split(data_root, run_dir)
    model = OnnxModel(repository, "unet", threads=threads)
    images, targets = prepared_slices(slices, model.size, desc="U-Net validation")
    probabilities = model.predict(list(images), batch_size=16)[..., 0]
    scores = score_sizes(probabilities, targets[..., 0] >= 0.5, sources, is_box, threshold)
    chosen = best_size(scores)
    return {"min_component_px": chosen, "grid": model.size, "mask_threshold": threshold,
            "validation_slices": len(slices), "scores": {str(px): v for px, v in scores.items()}}


def add_arguments(parser: argparse.ArgumentParser, repo_root: Path) -> None:
    parser.add_argument("--unet-run", type=Path, default=repo_root / "runs" / "unet",
                        help="the U-Net's run folder (its args.json fixes the U-Net validation split; defaults when absent)")
