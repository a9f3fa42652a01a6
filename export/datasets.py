"""Readers for the shared brain-MRI datasets (see ../shared/datasets/README.md).

Two kinds of data:

- VIA (VGG Image Annotator) JSON with tumor outlines (`br35h-polygons`,
  `ruslan-kl-polygons`): regions are `polygon`, `circle` or `ellipse`; all three
  rasterize to boolean masks on the original pixel grid.
- Folder-per-class JPEGs (`sartaj-classification`) with labels normalized to
  the classifier's label set.

Nothing here decodes images; callers use `gateway.preprocessing` for that so
training and serving read pixels the same way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLASS_LABELS: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")
VIA_DATASETS: tuple[str, ...] = ("br35h-polygons", "ruslan-kl-polygons")
CLASSIFICATION_DATASET = "sartaj-classification"
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

# Sartaj folder names → canonical labels.
_FOLDER_LABELS = {
    "glioma_tumor": "glioma",
    "glioma": "glioma",
    "meningioma_tumor": "meningioma",
    "meningioma": "meningioma",
    "no_tumor": "no_tumor",
    "notumor": "no_tumor",
    "pituitary_tumor": "pituitary",
    "pituitary": "pituitary",
}


def default_data_root() -> Path:
    """$BRAINSCAN_DATA, else `<repo>/../shared/datasets`."""
    env = os.environ.get("BRAINSCAN_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def relative_to_root(path: Path | str, data_root: Path) -> str:
    """A dataset file's POSIX path relative to the datasets root (the key of audit and error files);
    paths outside the root stay as given."""
    try:
        return Path(path).resolve().relative_to(Path(data_root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


@dataclass(frozen=True)
class Region:
    """One VIA region in original pixel coordinates.

    `shape` is "polygon" (xs, ys), "circle" (cx, cy, r → rx = ry = r) or
    "ellipse" (cx, cy, rx, ry, theta in radians as VIA writes it).
    """

    shape: str
    xs: tuple[float, ...] = ()
    ys: tuple[float, ...] = ()
    cx: float = 0.0
    cy: float = 0.0
    rx: float = 0.0
    ry: float = 0.0
    theta: float = 0.0

    @classmethod
    def from_via(cls, attributes: dict) -> Region:
        name = attributes.get("name")
        if name == "polygon" or name == "polyline":
            xs = tuple(float(v) for v in attributes["all_points_x"])
            ys = tuple(float(v) for v in attributes["all_points_y"])
            if len(xs) != len(ys) or len(xs) < 3:
                raise ValueError(f"polygon needs >= 3 matching points, got {len(xs)} x and {len(ys)} y")
            return cls(shape="polygon", xs=xs, ys=ys)
        if name == "circle":
            r = float(attributes["r"])
            return cls(shape="circle", cx=float(attributes["cx"]), cy=float(attributes["cy"]), rx=r, ry=r)
        if name == "ellipse":
            return cls(
                shape="ellipse",
                cx=float(attributes["cx"]),
                cy=float(attributes["cy"]),
                rx=float(attributes["rx"]),
                ry=float(attributes["ry"]),
                theta=float(attributes.get("theta", 0.0) or 0.0),
            )
        if name == "rect":
            x, y = float(attributes["x"]), float(attributes["y"])
            w, h = float(attributes["width"]), float(attributes["height"])
            return cls(shape="polygon", xs=(x, x + w, x + w, x), ys=(y, y, y + h, y + h))
        raise ValueError(f"unsupported VIA region shape {name!r}")

    def rasterize(self, height: int, width: int) -> np.ndarray:
        """Boolean height×width mask of the region's interior (clipped to the image)."""
        canvas = np.zeros((height, width), dtype=np.uint8)
        if self.shape == "polygon":
            points = np.round(np.stack([self.xs, self.ys], axis=1)).astype(np.int32)
            cv2.fillPoly(canvas, [points], 1)
        else:
            center = (int(round(self.cx)), int(round(self.cy)))
            axes = (max(1, int(round(self.rx))), max(1, int(round(self.ry))))
            cv2.ellipse(canvas, center, axes, math.degrees(self.theta), 0, 360, 1, thickness=-1)
        return canvas.astype(bool)

    def bounding_box(self) -> tuple[float, float, float, float]:
        """[x0, y0, x1, y1] of the region (for detectors)."""
        if self.shape == "polygon":
            return min(self.xs), min(self.ys), max(self.xs), max(self.ys)
        # Axis-aligned extent of a rotated ellipse.
        c, s = math.cos(self.theta), math.sin(self.theta)
        half_w = math.hypot(self.rx * c, self.ry * s)
        half_h = math.hypot(self.rx * s, self.ry * c)
        return self.cx - half_w, self.cy - half_h, self.cx + half_w, self.cy + half_h


@dataclass(frozen=True)
class AnnotatedSlice:
    """An image file with its tumor regions (empty for a negative slice)."""

    path: Path
    regions: tuple[Region, ...]

    def instance_masks(self, height: int, width: int) -> list[np.ndarray]:
        return [region.rasterize(height, width) for region in self.regions]

    def union_mask(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        for region in self.regions:
            mask |= region.rasterize(height, width)
        return mask


def load_via_split(data_root: Path, dataset: str, split: str) -> list[AnnotatedSlice]:
    """All slices of `<data_root>/<dataset>/<split>/annotations_<split>.json`, sorted by file name."""
    if dataset not in VIA_DATASETS:
        raise ValueError(f"unknown VIA dataset {dataset!r}; expected one of {VIA_DATASETS}")
    folder = Path(data_root) / dataset / split
    annotation_file = folder / f"annotations_{split}.json"
    if not annotation_file.is_file():
        raise FileNotFoundError(f"annotation file {annotation_file} not found")
    entries = json.loads(annotation_file.read_text())
    slices = []
    for entry in entries.values():
        path = folder / entry["filename"]
        if not path.is_file():
            raise FileNotFoundError(f"{annotation_file}: image {path} is missing")
        raw_regions = entry.get("regions", [])
        if isinstance(raw_regions, dict):  # older VIA exports key regions by index
            raw_regions = list(raw_regions.values())
        regions = tuple(Region.from_via(r["shape_attributes"]) for r in raw_regions)
        slices.append(AnnotatedSlice(path=path, regions=regions))
    slices.sort(key=lambda s: s.path.name)
    return slices


def load_classification_split(data_root: Path, split: str) -> list[tuple[Path, str]]:
    """(path, label) for every image of `sartaj-classification/<split>`, labels in CLASS_LABELS."""
    folder = Path(data_root) / CLASSIFICATION_DATASET / split
    if not folder.is_dir():
        raise FileNotFoundError(f"classification split {folder} not found")
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = _FOLDER_LABELS.get(class_dir.name.lower())
        if label is None:
            raise ValueError(f"{class_dir}: unknown class folder; expected one of {sorted(_FOLDER_LABELS)}")
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in _IMAGE_SUFFIXES:
                items.append((path, label))
    return items


def negative_slices(data_root: Path, split: str = "Training") -> list[AnnotatedSlice]:
    """Tumor-free slices (Sartaj no_tumor) as AnnotatedSlice with no regions, for segmenter negatives."""
    return [
        AnnotatedSlice(path=path, regions=())
        for path, label in load_classification_split(data_root, split)
        if label == "no_tumor"
    ]


# --- Sources added for generalization: lgg-flair, head-ct, sartaj-boxes ---------------------------

LGG_DATASET = "lgg-flair"
HEAD_CT_DATASET = "head-ct"
SARTAJ_BOXES_FILE = Path("sartaj-boxes") / "boxes_training.json"
# An LGG slice counts as a tumor slice at this many mask pixels; 1..MIN-1 are left out of tumor/no-tumor scoring.
LGG_MIN_TUMOR_PX = 200


@dataclass(frozen=True)
class MaskedSlice:
    """An image with a binary mask file (white = tumor), e.g. one LGG FLAIR slice."""

    path: Path
    mask_path: Path
    patient: str
    tumor_px: int

    def read_mask(self) -> np.ndarray:
        mask = cv2.imread(str(self.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"cannot read mask {self.mask_path}")
        return mask >= 128

    def union_mask(self, height: int, width: int) -> np.ndarray:
        mask = self.read_mask()
        if mask.shape != (height, width):
            raise ValueError(f"{self.mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}")
        return mask

    def instance_masks(self, height: int, width: int) -> list[np.ndarray]:
        """One instance per connected component of the mask (8-connectivity)."""
        count, labels = cv2.connectedComponents(self.union_mask(height, width).astype(np.uint8), connectivity=8)
        return [labels == i for i in range(1, count)]


@dataclass(frozen=True)
class BoxedSlice:
    """An image with one tumor box and no mask (sartaj-boxes): a target for box-supervised losses only."""

    path: Path
    box: tuple[float, float, float, float]

    def union_mask(self, height: int, width: int) -> np.ndarray:
        """The box filled in on the image grid: what a box loss compares projections with, never a mask label."""
        canvas = np.zeros((height, width), dtype=bool)
        x0, y0, x1, y1 = self.box
        canvas[max(0, int(np.floor(y0))):min(height, int(np.ceil(y1))), max(0, int(np.floor(x0))):min(width, int(np.ceil(x1)))] = True
        return canvas

    def instance_masks(self, height: int, width: int) -> list[np.ndarray]:
        """The filled box as the one 'instance': detectors read only its extent (a box target), never its pixels."""
        return [self.union_mask(height, width)]


def load_lgg_split(data_root: Path, split: str) -> list[MaskedSlice]:
    """Every slice of `lgg-flair/<split>` listed in `slices.csv`, in patient/slice order."""
    import csv

    folder = Path(data_root) / LGG_DATASET
    index = folder / "slices.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found")
    slices = []
    with index.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] != split:
                continue
            slices.append((row["patient"], int(row["slice"]), MaskedSlice(
                path=folder / row["image"], mask_path=folder / row["mask"], patient=row["patient"], tumor_px=int(row["tumor_px"]))))
    if not slices:
        raise ValueError(f"{index} lists no slices for split {split!r}")
    return [s for _, _, s in sorted(slices, key=lambda t: (t[0], t[1]))]


def load_head_ct(data_root: Path) -> list[Path]:
    """All head-CT slices (`normal/` and `hemorrhage/`); none shows a brain tumor."""
    folder = Path(data_root) / HEAD_CT_DATASET
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)


def load_sartaj_boxes(data_root: Path) -> dict[Path, tuple[float, float, float, float]]:
    """Image path → tumor box [x0, y0, x1, y1] (original pixels) for the boxed Sartaj Training slices."""
    file = Path(data_root) / SARTAJ_BOXES_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    boxes = {}
    for key, entry in json.loads(file.read_text()).items():
        x0, y0, x1, y1 = (float(v) for v in entry["box"])
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"{file}: {key} has an empty box {entry['box']}")
        boxes[Path(data_root) / key] = (x0, y0, x1, y1)
    return boxes
