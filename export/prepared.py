"""Decode + `prepare()` each image once and cache the model-ready arrays.

Training epochs then are pure compute. Every array comes from exactly the
serving chain (`load_image_file` → `prepare(size)`), so what the model is
trained on is what the gateway feeds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from export.audit import cache_dir, save_cache
from export.datasets import AnnotatedSlice, BoxedSlice, MaskedSlice

# Anything with a `.path` and a `.union_mask(height, width)` target.
TargetSlice = AnnotatedSlice | MaskedSlice | BoxedSlice
from gateway.preprocessing import crop_and_resize, load_image_file, prepare


def model_input(path: Path | str, size: int) -> np.ndarray:
    """The exact tensor the gateway feeds a model: size×size×1 float32 in [0, 1]."""
    return prepare(load_image_file(str(path)).pixels, size).tensor[..., None]


def prepared_images(paths: Sequence[Path], size: int, *, desc: str = "prepare") -> np.ndarray:
    """N×size×size×1 float32, memoized on disk by (paths, size)."""
    cache = _cache_file("images", paths, size)
    if cache.is_file():
        return np.load(cache)
    images = np.stack([model_input(p, size) for p in tqdm(paths, desc=desc, unit="img")])
    save_cache(cache, array=images)
    return images


def prepared_slices(slices: Sequence[TargetSlice], size: int, *, desc: str = "prepare") -> tuple[np.ndarray, np.ndarray]:
    """(images N×S×S×1, targets N×S×S×1) with targets (masks, or boxes filled in) cut from the image's brain crop."""
    kinds = "-".join(sorted({type(s).__name__ for s in slices}))
    cache = _cache_file(f"slices-{kinds}" if kinds != "AnnotatedSlice" else "slices", [s.path for s in slices], size)
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["images"], stored["masks"]
    images, masks = [], []
    for item in tqdm(slices, desc=desc, unit="img"):
        image, mask = prepared_slice(item, size)
        images.append(image)
        masks.append(mask)
    images_arr, masks_arr = np.stack(images), np.stack(masks)
    save_cache(cache, images=images_arr, masks=masks_arr)
    return images_arr, masks_arr


def prepared_slice(item: TargetSlice, size: int) -> tuple[np.ndarray, np.ndarray]:
    gray = load_image_file(str(item.path)).pixels
    prepared = prepare(gray, size)
    full = item.union_mask(*gray.shape).astype(np.float32)
    # Linear resize then threshold: area-faithful for small tumors, still binary.
    mask = crop_and_resize(full, prepared.crop, size, interpolation=cv2.INTER_LINEAR) >= 0.5
    return prepared.tensor[..., None], mask.astype(np.float32)[..., None]


def _cache_file(kind: str, paths: Sequence[Path], size: int) -> Path:
    digest = hashlib.sha1()
    for p in paths:
        stat = Path(p).stat()
        digest.update(f"{Path(p).resolve()}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
    folder = cache_dir() / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".npy" if kind == "images" else ".npz"
    return folder / f"{kind}-{size}-{digest.hexdigest()[:16]}{suffix}"
