"""Near-duplicate audit across the shared datasets (`python -m export data audit`).

Two slices are near-duplicates when, after cropping each to its bright
bounding box (`find_brain_box`), resizing to 32×32 and z-scoring, their
Pearson correlation is ≥ 0.90. That survives re-cropping, rescaling and
contrast changes, which is how the public sets copy each other.

The audit answers two questions that keep evaluation honest:

- which evaluation images have no near-duplicate in any official training
  split (the duplicate-free subsets reported next to every full split), and
- which training images are near-duplicates of an evaluation image (training
  drops them).

The decoded signatures are cached under ~/.cache/brainscan (outside the repo);
the result is written to `export/eval_subsets.json` so evaluations are
reproducible from the repository alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from export.datasets import default_data_root, load_classification_split, load_via_split, relative_to_root
from gateway.preprocessing import crop_and_resize, find_brain_box, load_image_file

THRESHOLD = 0.90
SIGNATURE_SIDE = 32
SIGNATURE_VERSION = 1
SUBSETS_FILE = Path(__file__).with_name("eval_subsets.json")

# Evaluation splits (reported, never trained or tuned on) and the official training splits.
EVAL_SPLITS: tuple[str, ...] = (
    "br35h-polygons/val",
    "ruslan-kl-polygons/test",
    "sartaj-classification/Testing",
)
TRAIN_SPLITS: tuple[str, ...] = (
    "br35h-polygons/train",
    "ruslan-kl-polygons/train",
    "ruslan-kl-polygons/val",
    "sartaj-classification/Training",
)


def cache_dir() -> Path:
    path = Path(os.environ.get("BRAINSCAN_CACHE", Path.home() / ".cache" / "brainscan"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache .npz (or .npy for one array named `array`) under a temporary name of this process, then
    rename: two runs filling the same cache at once neither read a half-written file nor lose each other's."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        if path.suffix == ".npy":
            np.save(handle, arrays["array"])
        else:
            np.savez(handle, **arrays)
    tmp.replace(path)


def split_paths(data_root: Path, split_key: str) -> list[Path]:
    """Image paths of one split key such as "br35h-polygons/val"."""
    dataset, split = split_key.split("/", 1)
    if dataset == "sartaj-classification":
        return [path for path, _ in load_classification_split(data_root, split)]
    return [s.path for s in load_via_split(data_root, dataset, split)]


def signature(gray: np.ndarray) -> np.ndarray:
    """Unit-norm, zero-mean 32×32 vector: dot products of two signatures are correlations."""
    box = find_brain_box(gray)
    small = crop_and_resize(gray, box, SIGNATURE_SIDE, interpolation=cv2.INTER_AREA).astype(np.float64)
    vector = small.ravel() - small.mean()
    norm = np.linalg.norm(vector)
    return (vector / norm if norm > 1e-9 else vector).astype(np.float32)


def compute_signatures(paths: list[Path], *, progress: bool = True) -> np.ndarray:
    """Signatures for `paths`, memoized in a .npz keyed by path, size and mtime."""
    cache_file = cache_dir() / f"signatures-v{SIGNATURE_VERSION}.npz"
    cached: dict[str, np.ndarray] = {}
    if cache_file.is_file():
        with np.load(cache_file) as stored:
            cached = dict(zip(stored["keys"].tolist(), stored["values"]))
    keys = [_file_key(p) for p in paths]
    missing = [i for i, k in enumerate(keys) if k not in cached]
    for i in tqdm(missing, desc="signatures", unit="img", disable=not progress or not missing):
        cached[keys[i]] = signature(load_image_file(str(paths[i])).pixels)
    if missing:
        save_cache(cache_file, keys=np.array(list(cached)), values=np.stack(list(cached.values())))
    return np.stack([cached[k] for k in keys]) if keys else np.zeros((0, SIGNATURE_SIDE**2), np.float32)


def duplicate_pairs(a: np.ndarray, b: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Boolean len(a)×len(b) matrix: correlation ≥ threshold (chunked matrix products)."""
    out = np.zeros((len(a), len(b)), dtype=bool)
    for start in range(0, len(a), 1024):
        out[start : start + 1024] = (a[start : start + 1024] @ b.T) >= threshold
    return out


def duplicate_groups(signatures: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Connected components of the near-duplicate graph (an int group id per row).

    Used to split train/validation by group so a slice and its copy never sit
    on both sides.
    """
    adjacency = duplicate_pairs(signatures, signatures, threshold)
    parent = np.arange(len(signatures))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adjacency, k=1))):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[rj] = ri
    return np.array([find(i) for i in range(len(signatures))])


@dataclass
class Audit:
    """Result of the audit, with paths relative to the data root."""

    data_root: Path
    duplicate_free: dict[str, frozenset[str]]
    excluded_training: frozenset[str]
    summary: dict[str, object] = field(default_factory=dict)

    def is_duplicate_free(self, split_key: str, path: Path | str) -> bool:
        return relative_to_root(path, self.data_root) in self.duplicate_free[split_key]

    def duplicate_free_paths(self, split_key: str) -> set[Path]:
        return {self.data_root / rel for rel in self.duplicate_free[split_key]}

    def is_excluded_from_training(self, path: Path | str) -> bool:
        """True for a training image that is a near-duplicate of some evaluation image."""
        return relative_to_root(path, self.data_root) in self.excluded_training

    def to_json(self) -> dict[str, object]:
        return {
            "threshold": THRESHOLD,
            "signature": f"find_brain_box crop, {SIGNATURE_SIDE}x{SIGNATURE_SIDE} INTER_AREA, z-score, corr",
            "version": SIGNATURE_VERSION,
            "duplicate_free": {k: sorted(v) for k, v in self.duplicate_free.items()},
            "excluded_training": sorted(self.excluded_training),
            "summary": self.summary,
        }

    @classmethod
    def from_json(cls, data_root: Path, payload: dict) -> Audit:
        return cls(
            data_root=Path(data_root),
            duplicate_free={k: frozenset(v) for k, v in payload["duplicate_free"].items()},
            excluded_training=frozenset(payload["excluded_training"]),
            summary=payload.get("summary", {}),
        )


def build_audit(data_root: Path, *, progress: bool = True) -> Audit:
    data_root = Path(data_root)
    paths = {key: split_paths(data_root, key) for key in EVAL_SPLITS + TRAIN_SPLITS}
    everything = [p for key in paths for p in paths[key]]
    signatures = compute_signatures(everything, progress=progress)
    offsets, start = {}, 0
    for key in paths:
        offsets[key] = (start, start + len(paths[key]))
        start += len(paths[key])

    def sig(key: str) -> np.ndarray:
        return signatures[offsets[key][0] : offsets[key][1]]

    def rel(p: Path) -> str:
        return p.relative_to(data_root).as_posix()

    train_sig = np.concatenate([sig(k) for k in TRAIN_SPLITS])
    eval_sig = np.concatenate([sig(k) for k in EVAL_SPLITS])
    summary: dict[str, object] = {"images": {k: len(v) for k, v in paths.items()}}

    duplicate_free: dict[str, frozenset[str]] = {}
    cross: dict[str, dict[str, int]] = {}
    for key in EVAL_SPLITS:
        has_dup = duplicate_pairs(sig(key), train_sig).any(axis=1)
        duplicate_free[key] = frozenset(rel(p) for p, d in zip(paths[key], has_dup) if not d)
        cross[key] = {
            "duplicate_free": int((~has_dup).sum()),
            **{f"dup_of_{t}": int(duplicate_pairs(sig(key), sig(t)).any(axis=1).sum()) for t in TRAIN_SPLITS},
        }
        if key.startswith("sartaj"):
            per_class = Counter(p.parent.name for p, d in zip(paths[key], has_dup) if d)
            cross[key]["dup_by_class"] = dict(sorted(per_class.items()))  # type: ignore[assignment]
    summary["evaluation_vs_training"] = cross

    excluded: set[str] = set()
    excluded_by_split: dict[str, int] = {}
    for key in TRAIN_SPLITS:
        hit = duplicate_pairs(sig(key), eval_sig).any(axis=1)
        excluded |= {rel(p) for p, h in zip(paths[key], hit) if h}
        excluded_by_split[key] = int(hit.sum())
    summary["training_excluded"] = excluded_by_split

    within: dict[str, int] = {}
    for key in paths:
        s = sig(key)
        pairs = np.triu(duplicate_pairs(s, s), k=1)
        within[key] = int((pairs | pairs.T).any(axis=1).sum())  
    summary["within_split_images_with_duplicate"] = within
    return Audit(data_root=data_root, duplicate_free=duplicate_free, excluded_training=frozenset(excluded), summary=summary)


def load_or_build_audit(data_root: Path, *, rebuild: bool = False, subsets_file: Path = SUBSETS_FILE) -> Audit:
    """The committed audit (export/eval_subsets.json) if present, else build it and write it."""
    data_root = Path(data_root)
    if subsets_file.is_file() and not rebuild:
        payload = json.loads(subsets_file.read_text())
        if payload.get("version") == SIGNATURE_VERSION and payload.get("threshold") == THRESHOLD:
            return Audit.from_json(data_root, payload)
    audit = build_audit(data_root)
    subsets_file.write_text(json.dumps(audit.to_json(), indent=1) + "\n")
    return audit


def _file_key(path: Path) -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha1(raw.encode()).hexdigest()


# --- CLI -------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Find near-duplicate slices within and across the datasets.")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--out", type=Path, default=SUBSETS_FILE, help="where to write the duplicate-free subsets JSON")
    parser.add_argument("--reuse", action="store_true", help="print the summary of an existing JSON instead of recomputing")
    return parser


def main(args: argparse.Namespace) -> int:
    if not Path(args.data).is_dir():
        print(f"datasets folder {args.data} not found; pass --data or set BRAINSCAN_DATA")
        return 2
    audit = load_or_build_audit(args.data, rebuild=not args.reuse, subsets_file=args.out)
    summary = audit.summary
    print(f"near-duplicate = brain-box crop, {SIGNATURE_SIDE}x{SIGNATURE_SIDE}, z-score, correlation >= {THRESHOLD}")
    print("images per split:", json.dumps(summary.get("images", {})))
    print("within-split (images with a near-duplicate in the same split):")
    for key, count in summary.get("within_split_images_with_duplicate", {}).items():
        print(f"  {key:36s} {count}")
    print("evaluation splits vs all training splits:")
    for key, row in summary.get("evaluation_vs_training", {}).items():
        total = summary["images"][key]
        print(f"  {key:36s} duplicate-free {row['duplicate_free']}/{total}  " + json.dumps({k: v for k, v in row.items() if k != 'duplicate_free'}))
    print("training images dropped (near-duplicate of an evaluation image):")
    for key, count in summary.get("training_excluded", {}).items():
        print(f"  {key:36s} {count}")
    print(f"duplicate-free evaluation subsets and the training exclusion list written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
