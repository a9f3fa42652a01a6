"""Turns what a caller has (path, bytes, numpy array, PIL image) into a request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from brainscan.errors import InvalidInput
from brainscan_proto.v1 import brainscan_pb2 as pb

ImageLike = Union[str, os.PathLike, bytes, bytearray, np.ndarray, Any]  # Any: PIL.Image.Image

_RAW_DTYPES = ("uint8", "uint16", "int16", "float32", "float64")


def build_request(
    image: ImageLike, *, segment: bool = True, detect: bool = True, gate: bool = True, image_id: str = ""
) -> pb.AnalyzeRequest:
    request = pb.AnalyzeRequest(
        options=pb.AnalyzeOptions(skip_segmentation=not segment, skip_detection=not detect, ungated=not gate),
        image_id=image_id,
    )
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise InvalidInput(f"{path} is a folder; pass image files")
        if not path.is_file():
            raise InvalidInput(f"no such image file: {path}")
        request.encoded = path.read_bytes()
        if not request.image_id:
            request.image_id = str(path)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        request.encoded = bytes(image)
    elif isinstance(image, np.ndarray):
        request.raw.CopyFrom(raw_pixels(image))
    elif _is_pil_image(image):
        request.raw.CopyFrom(raw_pixels(_pil_to_array(image)))
    else:
        raise InvalidInput(
            f"cannot analyze a {type(image).__name__}: pass a path, PNG/JPEG/DICOM bytes, a numpy array or a PIL image"
        )
    return request


def raw_pixels(array: np.ndarray) -> pb.RawPixels:
    if array.dtype.name not in _RAW_DTYPES:
        raise InvalidInput(f"array dtype {array.dtype} is not supported; use one of {list(_RAW_DTYPES)}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidInput(f"array shape {array.shape} must be H×W or H×W×C with C in 1, 3, 4")
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.RawPixels(data=little.tobytes(), shape=list(array.shape), dtype=array.dtype.name)


def _is_pil_image(image: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def _pil_to_array(image: Any) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16)
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(image)

