"""How the image-level scope checks (gateway/scope.py) behave on real data.

Every slice of the MRI sources in ../shared/datasets goes through the
gateway's own decode and `check_image`; the script prints, per source, the
share flagged (must be 0: these are all slices the models should judge) and
how close the nearest slice came to each threshold. Then the same on frames
that must be flagged: head CTs (for information: the image-level checks are
not meant to catch a CT; the classifier's in_scope head is), blank and
near-blank frames, and colour renderings of real MRI slices.

    python -m bench.scope_checks [--data ../shared/datasets] [--limit N]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from export.datasets import default_data_root, load_classification_split, load_head_ct, load_lgg_split, load_via_split
from gateway.preprocessing import decode_image, unit_gray_and_colour
from gateway.scope import COLOUR_FRACTION_LIMIT, MIN_DYNAMIC_RANGE, check_image, dynamic_range


def mri_sources(data_root: Path) -> dict[str, list[Path]]:
    sources: dict[str, list[Path]] = {}
    for split in ("Training", "Testing"):
        sources[f"sartaj-classification/{split}"] = [p for p, _ in load_classification_split(data_root, split)]
    for dataset, splits in (("br35h-polygons", ("train", "val")), ("ruslan-kl-polygons", ("train", "val", "test"))):
        sources[dataset] = [s.path for split in splits for s in load_via_split(data_root, dataset, split)]
    for split in ("train", "val"):
        sources[f"lgg-flair/{split}"] = [s.path for s in load_lgg_split(data_root, split)]
    return sources


def measure(frames: list[tuple[np.ndarray, float]]) -> dict[str, object]:
    """Flag counts by reason, and the extreme statistic of each check over the frames."""
    reasons: Counter[str] = Counter()
    ranges, colours = [], []
    for pixels, colour in frames:
        flag = check_image(pixels, colour)
        reasons[flag.reason if flag else "judged"] += 1
        ranges.append(dynamic_range(pixels))
        colours.append(colour)
    return {
        "n": len(frames),
        "flagged": round(1.0 - reasons["judged"] / max(1, len(frames)), 4),
        "reasons": {k: v for k, v in reasons.items() if k != "judged"},
        "min_dynamic_range": round(min(ranges), 4),
        "max_dynamic_range": round(max(ranges), 4),
        "max_colour_fraction": round(max(colours), 4),
    }


def decoded(paths: list[Path]) -> list[tuple[np.ndarray, float]]:
    out = []
    for path in paths:
        image = decode_image(path.read_bytes())
        out.append((image.pixels, image.colour_fraction))
    return out


def hostile_frames(mri: list[Path], seed: int = 0) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Frames that are not slices to judge, built from real MRI slices where there is one to start from."""
    rng = np.random.default_rng(seed)
    noise = "noise only (not all caught)"
    frames: dict[str, list[tuple[np.ndarray, float]]] = {"blank": [], noise: [], "colour": []}
    for size in (64, 256, 512):
        for level in (0.0, 0.02, 0.5, 1.0):  # black, near-black, mid-gray, white
            for sigma, kind in ((0.002, "blank"), (0.006, noise)):  # noise of half / 1.5 gray levels
                noisy = np.clip(level + rng.normal(0.0, sigma, (size, size)), 0, 1).astype(np.float32)
                frames[kind].append((noisy, 0.0))
        speck = np.zeros((size, size), np.float32)  # black with a bright mark on 0.8% of it (burned-in text)
        speck[: size // 8, : size // 16] = 1.0
        frames["blank"].append((speck, 0.0))
    for path in mri:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        for colormap in (cv2.COLORMAP_JET, cv2.COLORMAP_HOT, cv2.COLORMAP_VIRIDIS):
            frames["colour"].append(unit_gray_and_colour(cv2.applyColorMap(gray, colormap), bgr=True))
        tinted = cv2.merge([gray // 3, gray // 2, gray])  # an orange-tinted print of the slice
        frames["colour"].append(unit_gray_and_colour(tinted, bgr=True))
    return frames


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--limit", type=int, default=0, help="at most N slices per source (0 = all)")
    args = parser.parse_args()
    print(f"thresholds: colour fraction > {COLOUR_FRACTION_LIMIT}, dynamic range (p99 - p1) < {MIN_DYNAMIC_RANGE:.4f}")
    print(f"{'source':<34} {'n':>5} {'flagged':>8} {'min range':>10} {'max range':>10} {'max colour':>11}  reasons")

    def row(name: str, report: dict[str, object]) -> None:
        print(f"{name:<34} {report['n']:>5} {report['flagged']:>8.2%} {report['min_dynamic_range']:>10.4f} "
              f"{report['max_dynamic_range']:>10.4f} {report['max_colour_fraction']:>11.4f}  {report['reasons'] or ''}")

    sources = mri_sources(args.data)
    for name, paths in sources.items():
        row(name, measure(decoded(paths[: args.limit or None])))
    row("head-ct (CT: the classifier's job)", measure(decoded(load_head_ct(args.data)[: args.limit or None])))
    some_mri = sources["sartaj-classification/Testing"][::20] + sources["lgg-flair/val"][::25]
    for name, frames in hostile_frames(some_mri).items():
        row(f"{name} frames", measure(frames))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
