"""Image-level scope checks: is this frame something the models can judge at all?

Pure numpy/OpenCV and cheap (a strided sample of at most ~128×128 pixels), so
they run on every slice before the classifier's learned scope check:

- `blank`: almost no dynamic range (1st to 99th percentile within 5 gray
  levels of 255): an empty, black, white or uniform frame, or one whose
  content (a speck, burned-in text) covers under 1% of it;
- `colour_image`: strong chroma in the decoded pixels, measured before the gray
  conversion (a photo, a screenshot, a pseudo-colour map): MRI slices are gray,
  and a JPEG's chroma noise on a gray slice stays far below the bar.

The thresholds sit well outside what real MRI slices do: `python -m
bench.scope_checks` prints each statistic's range and the flag rate on every
MRI source in ../shared/datasets (0 flags is the requirement).

Reason codes (also the classifier's `ct_or_not_mri`) are part of the API:
AnalyzeResponse.scope.reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLANK = "blank"
COLOUR_IMAGE = "colour_image"
NOT_MRI = "ct_or_not_mri"  # the classifier's in_scope head (gateway/decision.py)
REASONS = (BLANK, COLOUR_IMAGE, NOT_MRI)

# Share of sampled pixels whose channel spread (max - min over R, G, B, relative to the image's range)
# exceeds _STRONG_CHROMA; above COLOUR_FRACTION_LIMIT the frame is a colour image.
_STRONG_CHROMA = 0.15
COLOUR_FRACTION_LIMIT = 0.05
# On the unit gray scale: p99 - p1 below this is "no dynamic range". Real slices go far lower than
# one would guess: the dimmest LGG FLAIR vertex slices span 0.02-0.03 (a noise field and a small blob),
# which the models still judge after the contrast stretch, so the bar sits at 5 gray levels.
MIN_DYNAMIC_RANGE = 5.0 / 255.0
_SAMPLE_SIDE = 128


@dataclass(frozen=True)
class ScopeFlag:
    """Why a slice cannot be judged: a reason code and a sentence for a person."""

    reason: str
    detail: str


def colour_fraction(array: np.ndarray) -> float:
    """Share of pixels with strong chroma in a decoded H×W×3/4 array (0.0 for gray or 1-channel input)."""
    if array.ndim != 3 or array.shape[2] < 3:
        return 0.0
    sample = np.ascontiguousarray(_sample(array)[:, :, :3])
    a, b, c = sample[:, :, 0], sample[:, :, 1], sample[:, :, 2]
    top, bottom = np.maximum(np.maximum(a, b), c), np.minimum(np.minimum(a, b), c)
    lo, hi = float(bottom.min()), float(top.max())
    if hi - lo <= 0.0:
        return 0.0
    spread = top.astype(np.float32) - bottom.astype(np.float32)
    return float(np.count_nonzero(spread > _STRONG_CHROMA * (hi - lo)) / spread.size)


def dynamic_range(pixels: np.ndarray) -> float:
    """p99 - p1 of a unit-scale H×W slice, on a strided sample."""
    p1, p99 = np.percentile(_sample(pixels), (1.0, 99.0))
    return float(p99 - p1)


def check_image(pixels: np.ndarray, colour: float = 0.0) -> ScopeFlag | None:
    """The image-level verdict on a unit-scale slice whose decoded pixels had `colour` (colour_fraction)."""
    if colour > COLOUR_FRACTION_LIMIT:
        return ScopeFlag(
            COLOUR_IMAGE,
            f"{colour:.0%} of the pixels are strongly coloured: a photo or a colour rendering, not a gray MRI slice",
        )
    spread = dynamic_range(pixels)
    if spread < MIN_DYNAMIC_RANGE:
        return ScopeFlag(
            BLANK,
            f"the frame is blank or almost uniform (99% of its pixels within {spread * 255:.0f} of 255 gray levels)",
        )
    return None


def _sample(array: np.ndarray) -> np.ndarray:
    step = max(1, -(-max(array.shape[:2]) // _SAMPLE_SIDE))
    return array[::step, ::step]
