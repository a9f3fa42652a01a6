"""What an encoded image will cost to decode, read from its header alone.

The gateway admits a request against its decoded-pixel budgets before any
pixel is decoded (a few hundred KB of PNG can inflate to gigabytes):

    PNG    IHDR: width, height, bit depth, colour type
    JPEG   SOF:  width, height, precision, components
    DICOM  Rows, Columns, NumberOfFrames, BitsAllocated, SamplesPerPixel (gateway.dicom_decode)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, replace

from gateway.errors import InvalidImage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): they carry the size.
_JPEG_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Progressive JPEGs use about ten scans; thousands of tiny ones only burn CPU.
MAX_JPEG_SCANS = 100
# PNG colour type → (samples per pixel, allowed bit depths)
_PNG_COLOUR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}


@dataclass(frozen=True)
class ImageHeader:
    """Size of what a request decodes to: frames × height × width pixels."""

    format: str  # png | jpeg | dicom | array
    width: int
    height: int
    frames: int = 1
    # A DICOM's parsed dataset (gateway.dicom_decode.ParsedDicom), so that decoding does not parse it again
    parsed: object | None = field(default=None, compare=False, repr=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    precision: int
    components: int
    marker: int  # the SOFn marker byte


def read_header(data: bytes) -> ImageHeader:
    """The decoded size of PNG, JPEG or DICOM bytes, without decoding pixels."""
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    if data[:8] == PNG_MAGIC:
        png = png_header(data)
        return ImageHeader("png", png.width, png.height)
    if data[:3] == JPEG_MAGIC:
        jpeg = jpeg_header(data)
        return ImageHeader("jpeg", jpeg.width, jpeg.height)
    if looks_like_dicom(data):
        from gateway.dicom_decode import parse_dicom

        parsed = parse_dicom(data)
        return replace(parsed.header, parsed=parsed)
    raise InvalidImage(
        f"unrecognised image format ({len(data)} bytes, starts with {data[:8].hex()}); send PNG, JPEG or DICOM"
    )


def looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def png_header(data: bytes) -> PngHeader:
    if len(data) < 33 or data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise InvalidImage(f"PNG has no valid IHDR chunk ({len(data)} bytes; truncated or corrupt?)")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        raise InvalidImage("PNG IHDR chunk fails its CRC check (corrupt file)")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour not in _PNG_COLOUR_TYPES or depth not in _PNG_COLOUR_TYPES[colour][1]:
        raise InvalidImage(f"PNG IHDR: bit depth {depth} with colour type {colour} is not a valid combination")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise InvalidImage("PNG IHDR: unknown compression, filter or interlace method")
    return PngHeader(width, height, depth, colour, interlace == 1)


def check_png_integrity(data: bytes) -> None:
    """Every chunk whole and matching its CRC, IDAT present and in one run, IEND last.

    A byte read per chunk plus a CRC (about 0.1 ms for a 512² slice). Damaged image data itself
    (too short, a bad filter byte, a broken zlib stream) is then an error in libpng, never padded;
    libpng only warns about extra data after the image, whose pixels are intact.
    """
    at, idat_seen, idat_done = 8, False, False
    while True:
        if at + 12 > len(data):
            raise InvalidImage(f"PNG data ends before its IEND chunk ({len(data)} bytes; truncated?)")
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        end = at + 8 + length
        if end + 4 > len(data):
            raise InvalidImage(f"PNG chunk runs past the end of the data ({len(data)} bytes; truncated?)")
        if zlib.crc32(data[at + 4 : end]) != struct.unpack(">I", data[end : end + 4])[0]:
            raise InvalidImage(f"PNG chunk {_chunk_name(kind)} fails its CRC check (corrupt file)")
        if kind == b"IDAT":
            if idat_done:
                raise InvalidImage("PNG IDAT chunks are not consecutive (corrupt file)")
            idat_seen = True
        elif idat_seen:
            idat_done = True
        if kind == b"IEND":
            break
        at = end + 4
    if not idat_seen:
        raise InvalidImage("PNG has no image data (IDAT chunk missing)")


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else kind.hex()


def jpeg_header(data: bytes) -> JpegHeader:
    """Walk the marker segments up to the first frame header (a few byte reads)."""
    at = 2  # after SOI
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a payload
            at += 2
            continue
        if marker in _JPEG_FRAME_MARKERS:
            if at + 10 > len(data):
                break
            precision, height, width, components = struct.unpack(">BHHB", data[at + 4 : at + 10])
            return JpegHeader(width, height, precision, components, marker)
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            break
        at += 2 + length
    raise InvalidImage(f"image bytes could not be decoded ({len(data)} bytes; truncated or corrupt?)")


def jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers: inside entropy-coded data every 0xFF is stuffed (FF 00) or a restart marker."""
    return data.count(b"\xff\xda")


def jpeg_is_complete(data: bytes) -> bool:
    """An end-of-image marker follows the last start-of-scan (FF D9 after the last FF DA can only be the end)."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan > 0 and data.rfind(b"\xff\xd9") > last_scan


def check_pixel_limit(header: ImageHeader, max_pixels: int) -> None:
    """Refuse a request that decodes to more pixels (all frames) than one request may."""
    if header.pixels > max_pixels:
        frames = f"{header.frames} frames of " if header.frames > 1 else ""
        raise InvalidImage(
            f"image decodes to {header.pixels} pixels ({frames}{header.width}×{header.height}); the per-request "
            f"decoded-pixel limit is {max_pixels} (BRAINSCAN_MAX_REQUEST_PIXELS)"
        )
