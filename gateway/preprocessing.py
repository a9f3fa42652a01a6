"""Image preprocessing shared by training, evaluation and serving.

Pure numpy/OpenCV, no gRPC: `export/` imports this module so train and serve
can never drift. The chain is

    decode_image / to_unit_gray  ->  find_brain_box  ->  prepare(size)
                                                          (crop, resize, normalize)

and `PreparedImage` remembers the crop so that masks and boxes predicted on
the model grid map back to the original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from gateway.errors import InvalidImage
from gateway.scope import colour_fraction
from gateway.image_header import (
    MAX_JPEG_SCANS,
    ImageHeader,
    check_pixel_limit,
    check_png_integrity,
    jpeg_header,
    jpeg_is_complete,
    jpeg_scans,
    read_header,
)

# Decoding guards; the server's configurable limits sit on top of these.
MIN_SIDE = 16
DEFAULT_MAX_SIDE = 8192
DEFAULT_MAX_REQUEST_PIXELS = 1 << 25  # decoded pixels per request, all frames: 32 Mi (128 frames of 512×512)

# Pixels brighter than this (on the unit scale, after a light blur) count as
# head rather than background when looking for the brain's outline.
_FOREGROUND_THRESHOLD = 45.0 / 255.0
_CROP_MARGIN = 0.02
_NORMALIZE_PERCENTILES = (0.5, 99.5)

_UNIT_SCALE = np.arange(256, dtype=np.float32) / 255.0  # uint8 value → unit scale
_SUPPORTED_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32, np.float64))


@dataclass(frozen=True)
class DecodedImage:
    """A slice on the unit scale: float32 H×W in [0, 1]."""

    pixels: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing, DICOM only
    source_format: str = "array"
    colour_fraction: float = 0.0  # share of strongly coloured pixels before the gray conversion (gateway.scope)


@dataclass(frozen=True)
class CropBox:
    """Half-open pixel box [x0, x1) × [y0, y1) in the original image."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class PreparedImage:
    """A model-ready square tensor plus what is needed to map results back."""

    tensor: np.ndarray  # float32 size×size in [0, 1]
    crop: CropBox
    original_shape: tuple[int, int]  # (height, width)

    @property
    def size(self) -> int:
        return int(self.tensor.shape[0])


def decode_image(
    data: bytes,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    header: ImageHeader | None = None,
) -> DecodedImage:
    """Decode PNG, JPEG (8-bit, gray/RGB) or DICOM bytes to the unit scale.

    Sizes are checked from the header before any pixel is decoded; damaged data is refused, never padded.
    `header`: the one `read_header` already gave (the gateway's admission), so the format is not sniffed
    and a DICOM not parsed a second time.
    """
    return _decode(data, header, max_side=max_side, max_pixels=max_pixels, all_frames=False)[0]


def decode_frames(
    data: bytes,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    header: ImageHeader | None = None,
) -> list[DecodedImage]:
    """Like decode_image, but a multi-frame DICOM gives one image per frame (`max_pixels` counts them all)."""
    return _decode(data, header, max_side=max_side, max_pixels=max_pixels, all_frames=True)


def to_unit_gray(array: np.ndarray, *, max_side: int = DEFAULT_MAX_SIDE, bgr: bool = False) -> np.ndarray:
    """Any supported numpy image (H×W, H×W×1/3/4; uint8, uint16, float) → float32 H×W in [0, 1].

    Colour arrays are RGB(A), or BGR(A) with `bgr` (OpenCV's decoders).
    """
    return unit_gray_and_colour(array, max_side=max_side, bgr=bgr)[0]


def unit_gray_and_colour(
    array: np.ndarray, *, max_side: int = DEFAULT_MAX_SIDE, bgr: bool = False
) -> tuple[np.ndarray, float]:
    """to_unit_gray, and the input's colour_fraction (gateway.scope), measured before the gray conversion."""
    colour = 0.0
    if not isinstance(array, np.ndarray):
        raise InvalidImage(f"expected a numpy array, got {type(array).__name__}")
    source_dtype = array.dtype
    if array.ndim in (2, 3):
        check_size(array.shape[:2], max_side)  # before any conversion allocates
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] == 1:
            array = array[:, :, 0]
        elif source_dtype in _SUPPORTED_DTYPES and (channel := _gray_channel(array)) is not None:
            # Most colour JPEG slices are gray saved as colour: any channel is the luminance
            # (to 1 ulp of the formula below), at half the cost of converting all three.
            array = channel
        elif source_dtype in _SUPPORTED_DTYPES:
            colour = colour_fraction(array)  # only here: a gray slice saved as colour has none
            # Luminance 0.299 R + 0.587 G + 0.114 B in float32 (OpenCV: ~4x faster than a numpy matmul).
            samples = np.ascontiguousarray(array[:, :, :3], dtype=np.float32)
            array = cv2.cvtColor(samples, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    if array.ndim != 2:
        raise InvalidImage(
            f"image array must be H×W or H×W×C with C in (1, 3, 4); got shape {tuple(array.shape)}"
        )
    if source_dtype not in _SUPPORTED_DTYPES:
        raise InvalidImage(
            f"image dtype {source_dtype} is not supported; use uint8, uint16, int16, float32 or float64"
        )
    return _rescale_to_unit(array, source_dtype=source_dtype), colour


def find_brain_box(gray: np.ndarray) -> CropBox:
    """Box around the head: the extreme points of the largest bright contour.

    Falls back to the whole image when nothing stands out from the background.
    """
    height, width = gray.shape
    blurred = cv2.GaussianBlur(gray, (5, 5), 0)
    foreground = (blurred > _FOREGROUND_THRESHOLD).astype(np.uint8)
    foreground = cv2.erode(foreground, None, iterations=2)
    foreground = cv2.dilate(foreground, None, iterations=2)
    contours, _ = cv2.findContours(foreground, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return CropBox(0, 0, width, height)
    largest = max(contours, key=cv2.contourArea)
    x, y, w, h = cv2.boundingRect(largest)
    if w * h < 0.05 * width * height:
        return CropBox(0, 0, width, height)
    margin_x, margin_y = int(round(_CROP_MARGIN * w)), int(round(_CROP_MARGIN * h))
    return CropBox(
        max(0, x - margin_x),
        max(0, y - margin_y),
        min(width, x + w + margin_x),
        min(height, y + h + margin_y),
    )


def crop_and_resize(
    array: np.ndarray, crop: CropBox, size: int, *, interpolation: int = cv2.INTER_AREA
) -> np.ndarray:
    """Cut `crop` out of `array` and resize it to size×size (also used for training masks)."""
    patch = array[crop.y0 : crop.y1, crop.x0 : crop.x1]
    return cv2.resize(patch, (size, size), interpolation=interpolation)


def normalize(patch: np.ndarray) -> np.ndarray:
    """Robust contrast stretch to [0, 1]; makes scanners and exports with different contrast comparable."""
    lo, hi = _percentiles(patch, _NORMALIZE_PERCENTILES)
    if hi - lo < 1e-6:
        return np.zeros_like(patch, dtype=np.float32)
    out = np.subtract(patch, np.float32(lo), dtype=np.float32)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def prepare(gray: np.ndarray, size: int, *, crop: CropBox | None = None) -> PreparedImage:
    """Brain crop → resize to size×size → normalize. Pass `crop` to reuse one found earlier."""
    crop = crop or find_brain_box(gray)
    resized = crop_and_resize(gray, crop, size)
    return PreparedImage(tensor=normalize(resized), crop=crop, original_shape=gray.shape[:2])


def mask_in_crop(mask: np.ndarray, prepared: PreparedImage) -> np.ndarray:
    """Map a size×size (float or bool) mask from the model grid to the brain crop's pixels."""
    crop = prepared.crop
    return cv2.resize(mask.astype(np.float32, copy=False), (crop.width, crop.height), interpolation=cv2.INTER_LINEAR)


def mask_to_original(mask: np.ndarray, prepared: PreparedImage) -> np.ndarray:
    """Map a size×size (float or bool) mask from the model grid to original pixels (zero outside the crop)."""
    crop = prepared.crop
    full = np.zeros(prepared.original_shape, dtype=np.float32)
    full[crop.y0 : crop.y1, crop.x0 : crop.x1] = mask_in_crop(mask, prepared)
    return full


def boxes_to_original(boxes: np.ndarray, prepared: PreparedImage, grid_size: int) -> np.ndarray:
    """Map N×4 [x0, y0, x1, y1] boxes on a grid_size×grid_size grid to original pixels."""
    crop = prepared.crop
    scale = np.array(
        [crop.width / grid_size, crop.height / grid_size] * 2, dtype=np.float32
    )
    offset = np.array([crop.x0, crop.y0] * 2, dtype=np.float32)
    mapped = boxes.astype(np.float32).reshape(-1, 4) * scale + offset
    height, width = prepared.original_shape
    mapped[:, 0::2] = np.clip(mapped[:, 0::2], 0, width)
    mapped[:, 1::2] = np.clip(mapped[:, 1::2], 0, height)
    return mapped


def load_image_file(path: str) -> DecodedImage:
    """Read an image file from disk (training and evaluation use this too)."""
    with open(path, "rb") as handle:
        return decode_image(handle.read())


# --- internals -------------------------------------------------------------


def check_size(shape: tuple[int, ...], max_side: int) -> None:
    """Each side between MIN_SIDE and max_side."""
    height, width = shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InvalidImage(
            f"image is {width}×{height} pixels; each side must be at least {MIN_SIDE}"
        )
    if max(height, width) > max_side:
        raise InvalidImage(
            f"image is {width}×{height} pixels; each side must be at most {max_side}"
        )


def _percentiles(values: np.ndarray, percents: tuple[float, ...]) -> np.ndarray:
    """np.percentile's default (linear) percentiles, from one partial sort of only the ranks needed: half the time."""
    flat = values.reshape(-1)
    position = np.asarray(percents, dtype=np.float64) / 100.0 * (flat.size - 1)
    below = np.floor(position).astype(np.intp)
    above = np.minimum(below + 1, flat.size - 1)
    ranked = np.partition(flat, np.unique(np.concatenate([below, above])))
    low, high = ranked[below].astype(np.float64), ranked[above].astype(np.float64)
    return low + (high - low) * (position - below)


def _gray_channel(array: np.ndarray) -> np.ndarray | None:
    """One channel (contiguous) of an H×W×C array whose first three channels are identical, else None.

    Compared one channel at a time: a wide (16-bit RGBA) image never has a three-channel copy beside it.
    """
    array = np.ascontiguousarray(array)
    green = cv2.extractChannel(array, 1)
    for other in (0, 2):
        if cv2.countNonZero(cv2.absdiff(cv2.extractChannel(array, other), green)):
            return None
    return green


def _rescale_to_unit(array: np.ndarray, *, source_dtype: np.dtype) -> np.ndarray:
    if array.dtype == np.uint8:
        return cv2.LUT(np.ascontiguousarray(array), _UNIT_SCALE)  # the same values as array / 255.0, one pass
    if source_dtype == np.uint8:  # luminance of uint8 colour, already float
        return array.astype(np.float32) / 255.0
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise InvalidImage("image contains NaN or infinite values")
    if source_dtype in (np.float32, np.float64) and values.min() >= 0.0 and values.max() <= 1.0:
        return values
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return np.zeros_like(values)
    values -= lo  # in place: the same float32 arithmetic as (values - lo) / (hi - lo), without two temporaries
    values /= hi - lo
    return values


def _decode(
    data: bytes, header: ImageHeader | None, *, max_side: int, max_pixels: int, all_frames: bool
) -> list[DecodedImage]:
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    if header is None:
        header = read_header(data)  # PNG, JPEG or DICOM (parsed here); anything else is refused
    if header.format not in ("png", "jpeg", "dicom"):
        raise ValueError(f"a {header.format!r} header does not describe encoded bytes")
    check_size((header.height, header.width), max_side)
    if header.format == "dicom":
        return _decode_dicom(header, max_side=max_side, max_pixels=max_pixels, all_frames=all_frames)
    check_pixel_limit(header, max_pixels)
    # The samples are passed straight on, so unit_gray_and_colour can free them as soon as it has the gray channel.
    pixels, colour = unit_gray_and_colour(
        _decode_png_samples(data) if header.format == "png" else decode_jpeg_samples(data, where="JPEG"),
        max_side=max_side,
        bgr=True,
    )
    return [DecodedImage(pixels=pixels, source_format=header.format, colour_fraction=colour)]


def _decode_png_samples(data: bytes) -> np.ndarray:
    check_png_integrity(data)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise InvalidImage(f"image bytes could not be decoded ({len(data)} bytes; truncated or corrupt?)")
    return decoded


def decode_jpeg_samples(data: bytes, *, where: str, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """8-bit JPEG → H×W (one component) or H×W×3 BGR uint8, refused on any libjpeg-turbo warning.

    libjpeg (and so OpenCV and Pillow) pads a damaged or cut-off scan with gray and only warns, on
    stderr; simplejpeg's strict mode turns every such warning into an error.
    """
    import simplejpeg

    header = jpeg_header(data)
    if expected_size is not None and (header.width, header.height) != expected_size:
        raise InvalidImage(
            f"{where}: the JPEG data is {header.width}×{header.height} but the DICOM header says "
            f"{expected_size[0]}×{expected_size[1]} (Columns × Rows)"
        )
    if header.precision != 8 or header.marker in (0xC3, 0xC7, 0xCB, 0xCF):
        raise InvalidImage(f"{where}: {header.precision}-bit or lossless JPEG is not supported; 8-bit JPEG only")
    if header.components not in (1, 3):
        raise InvalidImage(f"{where}: JPEG with {header.components} components is not supported (gray or RGB only)")
    if (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise InvalidImage(f"{where}: JPEG has {scans} scans; at most {MAX_JPEG_SCANS} are accepted")
    if not jpeg_is_complete(data):
        raise InvalidImage(f"{where} data ends before its end-of-image marker ({len(data)} bytes; truncated?)")
    try:
        samples = simplejpeg.decode_jpeg(data, colorspace="GRAY" if header.components == 1 else "BGR", strict=True)
    except ValueError as exc:  # libjpeg-turbo's own message: about the data's structure, never its content
        raise InvalidImage(f"{where} data is damaged ({exc}); refused rather than analysed with gaps") from None
    return samples[:, :, 0] if samples.shape[2] == 1 else samples


def _decode_dicom(header: ImageHeader, *, max_side: int, max_pixels: int, all_frames: bool) -> list[DecodedImage]:
    from gateway.dicom_decode import ParsedDicom, decode_dicom, pixel_spacing_mm

    parsed = header.parsed
    if not isinstance(parsed, ParsedDicom):
        raise ValueError("a DICOM header without its parsed dataset (gateway.image_header.read_header)")
    if header.frames > 1 and not all_frames:
        raise InvalidImage(
            f"multi-frame DICOM ({header.frames} frames): send it through AnalyzeStream, which answers once per frame"
        )
    check_pixel_limit(header, max_pixels)
    spacing = pixel_spacing_mm(parsed.dataset)
    frames = decode_dicom(parsed)
    decoded = []
    for frame in frames:
        pixels, colour = unit_gray_and_colour(frame, max_side=max_side)
        decoded.append(DecodedImage(pixels=pixels, pixel_spacing_mm=spacing, source_format="dicom", colour_fraction=colour))
    return decoded
