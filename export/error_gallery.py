"""Error galleries for `python -m export evaluate --errors DIR`: what the model got wrong, to look at.

Metrics say how often a model fails; a contact sheet of the failures says why
(a scanner, a sequence or a view the training data lacks). For each group of
errors this writes `<group>.png`, the slices as the model saw them (the
prepared tensor, after brain crop and normalization) with the prediction
written on each and, for masks, the predicted mask in red and the truth in
green. `errors.csv` lists every error with its file and its tile number (#n on
the sheet, row by row), so it can be opened. " N" on a tile marks a
duplicate-free (novel) slice. Sheets from an earlier run into the same folder
are removed first, so the folder always shows one run.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from export.datasets import relative_to_root

TILE_SIDE = 128
COLUMNS = 8
CSV_FIELDS = ("group", "tile", "path", "duplicate_free", "truth", "prediction", "score")


@dataclass(frozen=True)
class ErrorCase:
    """One wrong answer. `score`: the predicted class's probability (classifier); the Dice of
    the mask with its truth (U-Net, tumor slice); the mask's highest probability (U-Net,
    tumor-free slice); the highest detection score (Mask R-CNN, 0 when there is none)."""

    group: str
    path: Path
    duplicate_free: bool
    truth: str
    prediction: str
    score: float
    image: np.ndarray  # S×S float in [0, 1]: the model's input
    predicted_mask: np.ndarray | None = None  # S×S bool on the model grid
    true_mask: np.ndarray | None = None


def render_tile(case: ErrorCase, number: int, side: int = TILE_SIDE) -> np.ndarray:
    """The model input as a side×side BGR tile: masks outlined; tile number, prediction and score on top."""
    gray = cv2.resize((np.clip(case.image, 0.0, 1.0) * 255).astype(np.uint8), (side, side), interpolation=cv2.INTER_AREA)
    tile = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    for mask, colour in ((case.true_mask, (0, 200, 0)), (case.predicted_mask, (0, 0, 255))):
        if mask is not None and mask.any():
            grid = cv2.resize(mask.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(grid, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(tile, contours, -1, colour, 1)
    caption = f"#{number} {case.prediction[:10]} {case.score:.2f}" + (" N" if case.duplicate_free else "")
    cv2.rectangle(tile, (0, 0), (side - 1, 12), (0, 0, 0), thickness=-1)
    cv2.putText(tile, caption, (2, 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def contact_sheet(tiles: list[np.ndarray], columns: int = COLUMNS) -> np.ndarray:
    """Tiles in rows of `columns`, the last row padded with black."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    blank = np.zeros_like(tiles[0])
    padded = tiles + [blank] * (-len(tiles) % columns)
    rows = [np.hstack(padded[start : start + columns]) for start in range(0, len(padded), columns)]
    return np.vstack(rows)


def write_gallery(cases: list[ErrorCase], out_dir: Path, *, data_root: Path) -> list[Path]:
    """`<group>.png` per group and `errors.csv` for all cases (paths relative to data_root);
    returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "errors.csv"
    _remove_earlier_sheets(table)
    groups: dict[str, list[ErrorCase]] = defaultdict(list)
    for case in cases:
        groups[case.group].append(case)
    written = []
    for group, members in sorted(groups.items()):
        path = out_dir / f"{group}.png"
        tiles = [render_tile(case, number) for number, case in enumerate(members, start=1)]
        if not cv2.imwrite(str(path), contact_sheet(tiles)):
            raise OSError(f"could not write {path}")
        written.append(path)
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_FIELDS)
        for group, members in sorted(groups.items()):
            for number, case in enumerate(members, start=1):
                path = relative_to_root(case.path, data_root)
                writer.writerow([group, number, path, int(case.duplicate_free), case.truth, case.prediction, f"{case.score:.4f}"])
    written.append(table)
    return written


def _remove_earlier_sheets(table: Path) -> None:
    """Delete the sheets an earlier errors.csv in this folder names (and nothing else)."""
    if not table.is_file():
        return
    with table.open(newline="") as handle:
        groups = {row["group"] for row in csv.DictReader(handle) if row.get("group")}
    for group in groups:
        sheet = table.parent / f"{Path(group).name}.png"  # .name: a CSV cannot point outside the folder
        sheet.unlink(missing_ok=True)
