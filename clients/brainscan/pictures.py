"""The slice(s) of an image file as gray pixels, to draw results on (overlays, the web page).

The SDK's own small decoder (Pillow; pydicom for DICOM, an optional dependency):
the gateway decodes for analysis, this only for pictures, with the same rules a
viewer follows (modality LUT, the first VOI window, MONOCHROME1 inverted, each
frame stretched to [0, 1] unless it is 8-bit).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from brainscan.errors import InvalidInput


MAX_PIXELS = 1 << 25  # all frames together, checked from the header before decoding (the gateway's default budget)


def decode_frames(data: bytes, *, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """PNG, JPEG or DICOM bytes → one float32 H×W array in [0, 1] per frame."""
    if not data:
        raise InvalidInput("the file is empty (0 bytes)")
    try:
        return _dicom_frames(data, max_pixels) if data[128:132] == b"DICM" else [_picture(data, max_pixels)]
    except InvalidInput:
        raise
    except Exception as error:  # any decoder's complaint about the bytes means the same: nothing to draw on
        raise InvalidInput(f"cannot decode the image to draw on it: {error}") from None


def load_frames(path: str) -> list[np.ndarray]:
    with open(path, "rb") as handle:
        return decode_frames(handle.read())


def _picture(data: bytes, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        _check_pixels(image.width * image.height, max_pixels)
        if image.mode in ("I;16", "I;16B", "I", "F"):
            return _stretch(np.asarray(image, dtype=np.float32))
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _dicom_frames(data: bytes, max_pixels: int) -> list[np.ndarray]:
    try:
        import pydicom
    except ImportError:
        raise InvalidInput("drawing DICOM needs pydicom: pip install 'brainscan-client[dicom]'") from None
    dataset = pydicom.dcmread(io.BytesIO(data))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    _check_pixels(int(dataset.Rows) * int(dataset.Columns) * frames, max_pixels)
    values = dataset.pixel_array.astype(np.float32)
    if frames == 1:
        values = values[np.newaxis]
    values = values * float(dataset.get("RescaleSlope", 1) or 1) + float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = _first(dataset.get("WindowCenter")), _first(dataset.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        values = np.clip(values, center - width / 2.0, center + width / 2.0)
    invert = str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    return [_stretch(frame.max() + frame.min() - frame if invert else frame) for frame in values]


def _check_pixels(count: int, max_pixels: int) -> None:
    if count > max_pixels:
        raise InvalidInput(f"the image has {count} pixels; at most {max_pixels} are drawn")


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None  # type: ignore[index, arg-type]
    return None if value is None else float(value)  # type: ignore[arg-type]


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)
