"""Instance data for the Mask R-CNN detector: cached S×S slices, augmentation, targets.

Every image goes through the gateway's chain (`load_image_file` → `prepare(S)`),
and each VIA region is rasterized on the original grid and cut with the same
brain crop (`crop_and_resize`, nearest neighbour), so targets live exactly in
the grid the served model sees. Instances that vanish in the crop are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from export.audit import cache_dir, save_cache
from export.datasets import AnnotatedSlice
from export.prepared import TargetSlice
from gateway.preprocessing import crop_and_resize, load_image_file, prepare

CACHE_VERSION = 1
MIN_INSTANCE_PIXELS = 4  # smaller remnants (after crop/resize/augment) are not learnable tumors


@dataclass
class InstanceSet:
    """N prepared slices: images N×S×S float32 and, per slice, a K×S×S uint8 instance stack."""

    paths: list[Path]
    images: np.ndarray
    masks: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def masks_bool(self) -> list[np.ndarray]:
        return [m.astype(bool) for m in self.masks]

    def subset(self, keep: Sequence[int]) -> InstanceSet:
        return InstanceSet([self.paths[i] for i in keep], self.images[list(keep)], [self.masks[i] for i in keep])

    @staticmethod
    def concat(parts: Sequence[InstanceSet]) -> InstanceSet:
        size = parts[0].size if parts else 0
        images = [p.images for p in parts if len(p)]
        return InstanceSet(
            [path for p in parts for path in p.paths],
            np.concatenate(images) if images else np.zeros((0, size, size), np.float32),
            [m for p in parts for m in p.masks],
        )


def prepare_instances(item: TargetSlice, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image S×S float32, instance masks K×S×S uint8) in the served grid; empty instances dropped."""
    gray = load_image_file(str(item.path)).pixels
    prepared = prepare(gray, size)
    stack = []
    for region_mask in item.instance_masks(*gray.shape):
        cut = crop_and_resize(region_mask.astype(np.uint8), prepared.crop, size, interpolation=cv2.INTER_NEAREST)
        if int(cut.sum()) >= MIN_INSTANCE_PIXELS:
            stack.append(cut.astype(np.uint8))
    masks = np.stack(stack) if stack else np.zeros((0, size, size), np.uint8)
    return prepared.tensor.astype(np.float32), masks


def load_instances(slices: Sequence[TargetSlice], size: int, *, desc: str = "prepare") -> InstanceSet:
    """Prepared slices, memoized on disk (outside the repo) by paths, sizes, mtimes and regions."""
    cache = _cache_file(slices, size)
    paths = [s.path for s in slices]
    if cache.is_file():
        with np.load(cache) as stored:
            images, flat, counts = stored["images"], stored["masks"], stored["counts"]
        splits = np.cumsum(counts)[:-1]
        return InstanceSet(paths, images.astype(np.float32), list(np.split(flat, splits)) if len(counts) else [])
    images, masks = [], []
    for item in tqdm(slices, desc=desc, unit="img"):
        image, stack = prepare_instances(item, size)
        images.append(image)
        masks.append(stack)
    images_arr = np.stack(images) if images else np.zeros((0, size, size), np.float32)
    flat = np.concatenate(masks) if masks else np.zeros((0, size, size), np.uint8)
    counts = np.array([len(m) for m in masks], dtype=np.int64)
    save_cache(cache, images=images_arr.astype(np.float16), masks=flat, counts=counts)
    # Return what a cache hit would return (float16 round trip) so runs are reproducible.
    return InstanceSet(paths, images_arr.astype(np.float16).astype(np.float32), masks)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """K×4 float32 [x0, y0, x1, y1] with x1/y1 one past the last pixel (torchvision's convention)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return boxes


def to_target(masks: np.ndarray, *, box_only: bool = False) -> dict[str, torch.Tensor]:
    """torchvision detection target from an instance stack (works for zero instances).

    `box_only`: the stack holds filled boxes; the target keeps their extent and no masks.
    """
    if len(masks):  # augmentation can push an instance (almost) out of the frame
        masks = masks[masks.reshape(len(masks), -1).sum(axis=1) >= MIN_INSTANCE_PIXELS]
    target = {
        "boxes": torch.from_numpy(boxes_from_masks(masks)).reshape(-1, 4),
        "labels": torch.ones(len(masks), dtype=torch.int64),
    }
    if not box_only:
        target["masks"] = torch.from_numpy(np.array(masks, dtype=np.uint8, order="C"))  # copy: flips leave negative strides
    return target


@dataclass(frozen=True)
class Augment:
    """MRI-plausible augmentation: left-right flip, small affine, intensity/contrast/noise.

    No vertical flips or large rotations: slices are roughly canonically
    oriented and the gateway's brain crop already normalizes position and scale.
    """

    flip: float = 0.5
    rotation_deg: float = 12.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.06
    noise: float = 0.03

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        size = image.shape[0]
        if rng.random() < self.flip:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
        zoom = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
        matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, zoom)
        matrix[:, 2] += rng.uniform(-self.shift, self.shift, size=2) * size
        image = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
        if len(masks):
            masks = np.stack([
                cv2.warpAffine(np.ascontiguousarray(m), matrix, (size, size), flags=cv2.INTER_NEAREST, borderValue=0)
                for m in masks
            ])
        else:
            masks = np.ascontiguousarray(masks)
        image = np.power(np.clip(image, 1e-6, 1.0), np.exp(rng.uniform(*np.log(self.gamma))))
        mean = float(image.mean())
        image = (image - mean) * rng.uniform(*self.contrast) + mean + rng.uniform(-self.brightness, self.brightness)
        image = image + rng.normal(0.0, rng.uniform(0.0, self.noise), size=image.shape)
        return np.clip(image, 0.0, 1.0).astype(np.float32), masks


class DetectionDataset(torch.utils.data.Dataset):
    """(image [1, S, S], target) pairs, optionally augmented with a per-item RNG."""

    def __init__(self, data: InstanceSet, augment: Augment | None = None, seed: int = 0,
                 order: Sequence[int] | None = None, box_only: Sequence[bool] | None = None) -> None:
        self.data, self.augment, self.seed, self.epoch = data, augment, seed, 0
        self.box_only = [False] * len(data) if box_only is None else list(box_only)
        # Item k is slice order[k]; a slice listed twice gets two different augmentations.
        self.order = list(range(len(data))) if order is None else list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        item = self.order[index]
        image, masks = self.data.images[item], self.data.masks[item]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, masks = self.augment(image, masks, rng)
        return torch.from_numpy(np.ascontiguousarray(image))[None], to_target(masks, box_only=self.box_only[item])


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def _cache_file(slices: Sequence[TargetSlice], size: int) -> Path:
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{size}".encode())
    for item in slices:
        stat = item.path.stat()
        target = item.regions if isinstance(item, AnnotatedSlice) else item
        digest.update(f"{item.path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{target!r}\n".encode())
    folder = cache_dir() / "maskrcnn"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"instances-{size}-{digest.hexdigest()[:16]}.npz"
