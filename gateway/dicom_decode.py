"""DICOM bytes → frames on the unit scale, with every header value a client controls checked first.

Accepted transfer syntaxes: Implicit and Explicit VR Little Endian, Explicit VR
Big Endian, RLE Lossless, and JPEG Baseline / Extended with 8-bit samples
(decoded by the same strict decoder as a plain JPEG upload: a damaged frame is
refused, never padded). Others, Deflated included (a zip bomb: pydicom inflates the
whole file), are refused from the file meta before the dataset is parsed.

Header values are read from the raw bytes, so a malformed one is named in an
`InvalidImage` instead of surfacing as a pydicom exception or a warning that
quotes the value; no value is ever written to the log (DICOM headers hold patient data).
"""

from __future__ import annotations

import io
import logging
import math
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from gateway.errors import InvalidImage
from gateway.image_header import ImageHeader

ACCEPTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (8-bit)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (8-bit samples only)",
}
_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_KNOWN_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
# Physical spacing outside this range (mm) is a header mistake, not a scanner.
_SPACING_RANGE_MM = (1e-4, 1e3)


@dataclass(frozen=True)
class ParsedDicom:
    """A parsed dataset whose image attributes have been validated."""

    dataset: object  # pydicom.Dataset
    header: ImageHeader
    transfer_syntax: str
    bits_allocated: int


def transfer_syntax_name(uid: str) -> str:
    return ACCEPTED_TRANSFER_SYNTAXES.get(uid) or _KNOWN_SYNTAX_NAMES.get(uid) or uid


def accepted_syntaxes_text() -> str:
    return ", ".join(ACCEPTED_TRANSFER_SYNTAXES.values())


def parse_dicom(data: bytes) -> ParsedDicom:
    """Check the transfer syntax from the file meta, parse, and validate the image attributes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    syntax = _transfer_syntax(data)
    if syntax not in ACCEPTED_TRANSFER_SYNTAXES:
        raise InvalidImage(
            f"DICOM transfer syntax {transfer_syntax_name(syntax)} is not supported; accepted: {accepted_syntaxes_text()}"
        )
    try:
        _install_warning_hook()
        dataset = pydicom.dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError, struct.error) as exc:
        raise InvalidImage(f"DICOM could not be parsed: {type(exc).__name__}") from None
    if "PixelData" not in dataset:
        raise InvalidImage("DICOM has no pixel data (PixelData element missing)")
    rows, columns = _required_int(dataset, "Rows"), _required_int(dataset, "Columns")
    frames = _integer_string(dataset, "NumberOfFrames", default=1)
    if frames < 1:
        raise InvalidImage("DICOM NumberOfFrames must be a positive integer")
    if _optional_int(dataset, "SamplesPerPixel", default=1) != 1:
        raise InvalidImage("DICOM must be grayscale (SamplesPerPixel 1)")
    bits = _required_int(dataset, "BitsAllocated")
    if bits not in (8, 16):
        raise InvalidImage(f"DICOM BitsAllocated {bits} is not supported; use 8 or 16")
    if _optional_int(dataset, "PixelRepresentation", default=0) not in (0, 1):
        raise InvalidImage("DICOM PixelRepresentation must be 0 (unsigned) or 1 (signed)")
    if syntax in _NATIVE_SYNTAXES:
        needed = rows * columns * frames * (bits // 8)
        stored = len(dataset.PixelData)
        if stored < needed:
            raise InvalidImage(
                f"DICOM PixelData holds {stored} bytes; Rows × Columns × NumberOfFrames × BitsAllocated/8 needs {needed}"
            )
    header = ImageHeader("dicom", width=columns, height=rows, frames=frames)
    return ParsedDicom(dataset=dataset, header=header, transfer_syntax=syntax, bits_allocated=bits)


def decode_dicom(parsed: ParsedDicom) -> np.ndarray:
    """Frames × rows × columns float32 after the modality LUT and the VOI window, MONOCHROME1 inverted."""
    dataset = parsed.dataset
    frames = _stored_frames(parsed)
    values = frames.astype(np.float32)
    del frames
    # Modality LUT, then VOI window, as a viewer would show the slice.
    slope = _single_decimal(dataset, "RescaleSlope", default=1.0)
    intercept = _single_decimal(dataset, "RescaleIntercept", default=0.0)
    if slope <= 0.0:
        raise InvalidImage("DICOM RescaleSlope must be a positive number")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked just below
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    if not np.isfinite(values).all():
        raise InvalidImage("DICOM RescaleSlope/RescaleIntercept take the pixel values out of floating-point range")
    center, width = _window(dataset)
    if center is not None and width is not None:
        np.clip(values, center - width / 2.0, center + width / 2.0, out=values)
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        for frame in values:
            np.subtract(frame.max() + frame.min(), frame, out=frame)
    return values


def pixel_spacing_mm(dataset: object) -> tuple[float, float] | None:
    """(row, column) spacing from PixelSpacing: two finite numbers in a plausible range, or an error."""
    values = _decimal_strings(dataset, "PixelSpacing")
    if values is None:
        return None
    if len(values) != 2:
        raise InvalidImage(f"DICOM PixelSpacing must hold 2 values (row, column spacing in mm); it holds {len(values)}")
    low, high = _SPACING_RANGE_MM
    if not all(math.isfinite(v) and low <= v <= high for v in values):
        raise InvalidImage(f"DICOM PixelSpacing values must be between {low} and {high:g} mm")
    return values[0], values[1]


# --- pixel data ------------------------------------------------------------


def _stored_frames(parsed: ParsedDicom) -> np.ndarray:
    dataset, header = parsed.dataset, parsed.header
    if parsed.transfer_syntax in _JPEG_SYNTAXES:
        return np.stack(list(_jpeg_frames(parsed)))
    syntax_name = transfer_syntax_name(parsed.transfer_syntax)
    try:
        with _pixel_warnings() as caught:
            pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for corrupt pixel data
        raise InvalidImage(
            f"DICOM pixel data could not be decoded (transfer syntax {syntax_name}, {type(exc).__name__}; damaged?)"
        ) from None
    if caught:
        raise InvalidImage(f"DICOM pixel data is damaged (the {syntax_name} decoder warned: {', '.join(caught)})")
    return pixels.reshape(header.frames, header.height, header.width)


def _jpeg_frames(parsed: ParsedDicom) -> Iterator[np.ndarray]:
    from pydicom.encaps import generate_frames

    from gateway.preprocessing import decode_jpeg_samples

    header = parsed.header
    where = f"DICOM frame (transfer syntax {transfer_syntax_name(parsed.transfer_syntax)})"
    if parsed.bits_allocated != 8:
        raise InvalidImage(f"{where}: BitsAllocated must be 8 (8-bit JPEG samples only)")
    count = 0
    try:
        for count, fragment in enumerate(generate_frames(parsed.dataset.PixelData, number_of_frames=header.frames), 1):
            if count > header.frames:
                break
            frame = decode_jpeg_samples(bytes(fragment), expected_size=(header.width, header.height), where=where)
            if frame.ndim != 2:
                raise InvalidImage(f"{where}: not grayscale (SamplesPerPixel 1 needs one JPEG component)")
            yield frame
    except (ValueError, struct.error):
        raise InvalidImage(f"{where}: encapsulated pixel data is malformed (fragments or offset table)") from None
    if count < header.frames:
        raise InvalidImage(f"{where}: {count} JPEG frames; NumberOfFrames says {header.frames}")


class _PixelWarnings(threading.local):
    caught: list[str] | None = None


_pixel_warning_sink = _PixelWarnings()


@contextmanager
def _pixel_warnings() -> Iterator[list[str]]:
    """Collect the categories of the warnings this thread raises while decoding pixels."""
    _install_warning_hook()
    _pixel_warning_sink.caught = caught = []
    try:
        yield caught
    finally:
        _pixel_warning_sink.caught = None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (warnings API)
    """Warnings this thread raises while decoding pixels are collected (the decode is refused); other pydicom
    warnings are logged by category only, since their text quotes header values; the rest go on as before."""
    caught = _pixel_warning_sink.caught
    if caught is not None:
        caught.append(category.__name__)
    elif "pydicom" in filename:
        _log.warning("pydicom %s (text withheld: it may quote DICOM header values)", category.__name__)
    else:
        _previous_show_warning(message, category, filename, lineno, file, line)


_previous_show_warning = warnings.showwarning


def _install_warning_hook() -> None:
    """(Re)install the hook; logging.captureWarnings may have replaced it since."""
    global _previous_show_warning
    if warnings.showwarning is not _show_warning:
        _previous_show_warning = warnings.showwarning
        warnings.showwarning = _show_warning


class _WithholdText(logging.Filter):
    """pydicom logs each warning's text too (misc.warn_and_log), values included: keep the level, drop the text."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = "pydicom warning (text withheld: it may quote DICOM header values)", None
        return True


_log = logging.getLogger("brainscan.dicom")
_withhold_text = _WithholdText()


def withhold_dicom_values_from_logs() -> None:
    """pydicom's warnings and log records lose their text (it quotes header values) wherever pydicom is
    used in this process (series grouping too); called at import and by configure_logging."""
    _install_warning_hook()
    logging.getLogger("pydicom").addFilter(_withhold_text)  # a no-op when already there


withhold_dicom_values_from_logs()
# pydicom's warnings would otherwise show once per call site, hiding damage in every later request.
warnings.filterwarnings("always", module=r"pydicom(\.|$)")


# --- header values ---------------------------------------------------------


def _transfer_syntax(data: bytes) -> str:
    """TransferSyntaxUID (0002,0010) from the file meta group, which is always Explicit VR Little Endian."""
    at = 132
    while at + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, at)
        if group != 0x0002:
            break
        vr = data[at + 4 : at + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if at + 12 > len(data):
                break
            length, start = struct.unpack_from("<I", data, at + 8)[0], at + 12
        else:
            length, start = struct.unpack_from("<H", data, at + 6)[0], at + 8
        if element == 0x0010:
            return data[start : start + length].rstrip(b"\x00 ").decode("ascii", errors="replace")
        at = start + length
    raise InvalidImage("DICOM file meta has no TransferSyntaxUID (0002,0010)")


def _raw_text(dataset: object, keyword: str) -> str | None:
    from pydicom.tag import Tag

    element = dataset.get_item(Tag(keyword))  # type: ignore[attr-defined]
    if element is None:
        return None
    value = element.value
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _decimal_strings(dataset: object, keyword: str) -> list[float] | None:
    """A DS/IS element's values as floats; absent or empty → None; not numbers → InvalidImage naming it."""
    text = _raw_text(dataset, keyword)
    if text is None or not text.strip(" \x00"):
        return None
    try:
        return [float(part.strip(" \x00")) for part in text.split("\\")]
    except ValueError:
        raise InvalidImage(f"DICOM {keyword} is not a decimal number (or list of them)") from None


def _single_decimal(dataset: object, keyword: str, *, default: float) -> float:
    values = _decimal_strings(dataset, keyword)
    if values is None:
        return default
    if len(values) != 1 or not math.isfinite(values[0]):
        raise InvalidImage(f"DICOM {keyword} must be one finite number")
    return values[0]


def _integer_string(dataset: object, keyword: str, *, default: int) -> int:
    value = _single_decimal(dataset, keyword, default=float(default))
    if value != int(value):
        raise InvalidImage(f"DICOM {keyword} must be an integer")
    return int(value)


def _window(dataset: object) -> tuple[float | None, float | None]:
    """The first VOI window (center, width); a malformed or non-positive one is ignored, as viewers do."""
    try:
        centers, widths = _decimal_strings(dataset, "WindowCenter"), _decimal_strings(dataset, "WindowWidth")
    except InvalidImage:
        return None, None
    if not centers or not widths:
        return None, None
    center, width = centers[0], widths[0]
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        return None, None
    return center, width


def _optional_int(dataset: object, keyword: str, *, default: int) -> int:
    if keyword not in dataset:  # type: ignore[operator]
        return default
    return _required_int(dataset, keyword)


def _required_int(dataset: object, keyword: str) -> int:
    try:
        value = dataset.get(keyword)  # type: ignore[attr-defined]
    except Exception:  # pydicom's conversion of a malformed binary value
        raise InvalidImage(f"DICOM {keyword} is malformed") from None
    if value is None or value == "":
        raise InvalidImage(f"DICOM {keyword} is missing")
    if not isinstance(value, int):
        raise InvalidImage(f"DICOM {keyword} must be one integer")
    return int(value)
