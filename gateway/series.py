"""DICOM files → series: header reading, grouping, slice order and the tumor summary.

Pure pydicom + numpy (no gRPC, no models), so the rules below are tested on
their own and the gateway only feeds them per-slice results.

Order. Slices are grouped by SeriesInstanceUID. Within a series every slice
must share one ImageOrientationPatient (within 1e-3) and one PixelSpacing and
size; the slices are sorted by their ImagePositionPatient projected on the
slice normal (row cosines × column cosines). When any slice lacks position or
orientation, the series is sorted by InstanceNumber (then frame) instead and
the slice distance comes from SpacingBetweenSlices, else SliceThickness.
Without either order the series is refused.

Slice distance, gaps and overlaps. The nominal distance g is the median of the
distances between neighbouring slices. Each slice stands for a slab of
thickness (min(d_before, g) + min(d_after, g)) / 2, where d are the distances
to its neighbours (g on the open side of an end slice), so:
- a regular series gives every slice the thickness g;
- a gap (a distance over 1.5 g, slices missing) adds nothing: what the missing
  slices would have shown is not guessed, the volume is a lower bound there,
  and the summary says where the gap is;
- an overlap (a distance under 0.5 g, e.g. two slices at one position) thins
  the slabs of the slices involved, so no tissue is counted twice.
Volume (mL) = Σ area_mm² × thickness_mm / 1000 over the U-Net masks; the
largest cross-section is the largest single-slice mask area (mm²).
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.errors import BrainscanError, InvalidImage, InvalidSeries
from gateway.image_header import ImageHeader, check_pixel_limit

ORIENTATION_TOLERANCE = 1e-3
SPACING_TOLERANCE = 1e-3  # relative
GAP_FACTOR = 1.5
OVERLAP_FACTOR = 0.5
NO_TUMOR = "no_tumor"

# Storage classes that are DICOM but not images to analyze (prefix match on the SOP Class UID).
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "a segmentation, registration or other derived object",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.1.3.10": "a DICOMDIR (media directory)",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "a video or other visible-light object",
}


@dataclass(frozen=True)
class SliceHeader:
    """One frame of one file, as far as ordering needs it."""

    file_index: int
    frame: int
    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, float] | None  # (row, column) mm
    rows: int
    columns: int


@dataclass(frozen=True)
class DicomFile:
    """A DICOM image file's header (no pixel data kept) and its frames."""

    index: int
    series_uid: str
    header: object  # pydicom Dataset without PixelData; the SEG copies patient/study from it
    slices: tuple[SliceHeader, ...]
    spacing_between_slices: float | None
    slice_thickness: float | None

    @property
    def multi_frame(self) -> bool:
        return len(self.slices) > 1


@dataclass(frozen=True)
class Skipped:
    index: int
    reason: str
    error: BrainscanError | None = None  # a refusal with a status (a pixel limit, undecodable data)


@dataclass(frozen=True)
class OrderedSeries:
    series_uid: str
    files: tuple[DicomFile, ...]
    slices: tuple[SliceHeader, ...]  # in anatomical order
    positions_mm: tuple[float, ...] | None  # along the normal; None when ordered by InstanceNumber
    ordered_by: str  # "position" or "instance_number"
    slice_distance_mm: float | None  # nominal distance g
    thickness_mm: tuple[float, ...] | None  # each slice's slab
    notes: tuple[str, ...]


@dataclass(frozen=True)
class SliceFinding:
    """What the per-slice analysis found, in the series' order."""

    tumor_detected: bool
    probabilities: dict[str, float]
    area_mm2: float | None  # U-Net mask area; 0 when it found nothing or did not run; None without PixelSpacing


@dataclass(frozen=True)
class SeriesSummary:
    label: str
    tumor_slices: tuple[int, ...]  # indices into the ordered slices
    largest_cross_section_mm2: float | None
    volume_ml: float | None
    notes: tuple[str, ...]


def read_header(index: int, data: bytes, *, max_pixels: int) -> DicomFile | Skipped:
    """Parse a file's header; anything that is not a DICOM image becomes a Skipped with its reason.

    A file that decodes to more than `max_pixels` (the per-request limit, all frames) is refused
    before one SliceHeader per frame is built: NumberOfFrames is the sender's claim.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if len(data) < 132 or data[128:132] != b"DICM":
        return Skipped(index, "not a DICOM file (no DICM preamble)")
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as exc:
        return Skipped(index, f"DICOM could not be parsed ({type(exc).__name__})")
    sop_class = str(dataset.get("SOPClassUID", "") or dataset.file_meta.get("MediaStorageSOPClassUID", ""))
    for prefix, what in _NOT_IMAGES.items():
        if sop_class.startswith(prefix):
            return Skipped(index, f"{what} ({_uid_name(sop_class)}), not an image to analyze")
    if not _has_pixel_data(data):
        return Skipped(index, f"no pixel data ({_uid_name(sop_class) or 'unknown SOP class'})")
    series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        return Skipped(index, "no SeriesInstanceUID")
    try:
        size = ImageHeader(
            "dicom",
            width=int(dataset.get("Columns", 0) or 0),
            height=int(dataset.get("Rows", 0) or 0),
            frames=int(dataset.get("NumberOfFrames", 1) or 1),
        )
        check_pixel_limit(size, max_pixels)
        slices = _slices(index, dataset)
    except InvalidImage as refused:
        return Skipped(index, str(refused), refused)
    except (TypeError, ValueError, IndexError) as exc:
        return Skipped(index, f"malformed geometry tags ({type(exc).__name__})")
    return DicomFile(
        index=index,
        series_uid=series_uid,
        header=dataset,
        slices=slices,
        spacing_between_slices=_float(dataset.get("SpacingBetweenSlices")),
        slice_thickness=_float(dataset.get("SliceThickness")),
    )


def group_by_series(files: Sequence[DicomFile]) -> dict[str, list[DicomFile]]:
    """SeriesInstanceUID → its files, in the order the series were first seen."""
    groups: dict[str, list[DicomFile]] = {}
    for file in files:
        groups.setdefault(file.series_uid, []).append(file)
    return groups


def order_series(series_uid: str, files: Sequence[DicomFile]) -> OrderedSeries:
    """Sort a series' slices (see the module docstring); raises InvalidSeries for an inconsistent series."""
    slices = [s for file in files for s in file.slices]
    if not slices:
        raise InvalidSeries("the series has no slices")
    sizes = {(s.rows, s.columns) for s in slices}
    if len(sizes) > 1:
        raise InvalidSeries(f"slices differ in size ({', '.join(f'{c}×{r}' for r, c in sorted(sizes))})")
    _check_spacing(slices)
    notes: list[str] = []
    if all(s.position is not None and s.orientation is not None for s in slices):
        normal = _normal(slices)
        positions = [float(np.dot(s.position, normal)) for s in slices]
        order = sorted(range(len(slices)), key=lambda i: (positions[i], slices[i].instance_number or 0, slices[i].frame))
        ordered = tuple(slices[i] for i in order)
        along = tuple(positions[i] for i in order)
        distance, thickness, geometry_notes = _slabs(along, files)
        return OrderedSeries(
            series_uid, tuple(files), ordered, along, "position", distance, thickness, tuple(notes + geometry_notes)
        )
    if any(s.instance_number is None for s in slices) and len(files) > 1:
        raise InvalidSeries(
            "slices lack ImagePositionPatient/ImageOrientationPatient and InstanceNumber: their order is unknown"
        )
    ordered = tuple(sorted(slices, key=lambda s: (s.instance_number or 0, s.frame)))
    notes.append("ordered by InstanceNumber (ImagePositionPatient/ImageOrientationPatient missing)")
    distance = next((f.spacing_between_slices for f in files if f.spacing_between_slices), None) or next(
        (f.slice_thickness for f in files if f.slice_thickness), None
    )
    if distance is None:
        notes.append("slice distance unknown (no SpacingBetweenSlices or SliceThickness): no volume")
        thickness = None
    else:
        notes.append(f"slice distance {distance:g} mm from the SpacingBetweenSlices/SliceThickness tags")
        thickness = tuple(distance for _ in ordered)
    return OrderedSeries(series_uid, tuple(files), ordered, None, "instance_number", distance, thickness, tuple(notes))


def summarize(series: OrderedSeries, findings: Sequence[SliceFinding]) -> SeriesSummary:
    """Series label, tumor slices, largest cross-section and volume from per-slice findings (series order)."""
    if len(findings) != len(series.slices):
        raise ValueError(f"{len(findings)} findings for {len(series.slices)} slices")
    notes = list(series.notes)
    tumor = tuple(i for i, f in enumerate(findings) if f.tumor_detected)
    label = _series_label([findings[i] for i in tumor])
    areas = [f.area_mm2 for f in findings]
    if any(a is None for a in areas):
        notes.append("no mask areas in mm² (no PixelSpacing, or the U-Net was skipped): no volume")
        return SeriesSummary(label, tumor, None, None, tuple(notes))
    largest = max(areas, default=0.0)
    volume = None if series.thickness_mm is None else sum(a * t for a, t in zip(areas, series.thickness_mm)) / 1000.0
    return SeriesSummary(label, tumor, float(largest), volume, tuple(notes))


# --- internals -------------------------------------------------------------


def _series_label(tumor_findings: Sequence[SliceFinding]) -> str:
    """no_tumor when no slice shows one, else the tumor class with the largest summed probability over them."""
    if not tumor_findings:
        return NO_TUMOR
    totals: dict[str, float] = {}
    for finding in tumor_findings:
        for label, p in finding.probabilities.items():
            if label != NO_TUMOR:
                totals[label] = totals.get(label, 0.0) + p
    return max(totals, key=totals.__getitem__)


def _slabs(
    positions: tuple[float, ...], files: Sequence[DicomFile]
) -> tuple[float | None, tuple[float, ...] | None, list[str]]:
    notes: list[str] = []
    distances = [b - a for a, b in zip(positions, positions[1:])]
    if not distances:
        nominal = next((f.spacing_between_slices for f in files if f.spacing_between_slices), None) or next(
            (f.slice_thickness for f in files if f.slice_thickness), None
        )
        if nominal is None:
            return None, None, ["one slice without SpacingBetweenSlices or SliceThickness: no volume"]
        return nominal, (nominal,), [f"one slice: its slab is {nominal:g} mm from the tags"]
    nominal = statistics.median(distances)
    if nominal <= 0:
        raise InvalidSeries("most slices share one position: not a volume (several acquisitions in one series?)")
    for i, d in enumerate(distances):
        if d > GAP_FACTOR * nominal:
            notes.append(
                f"gap of {d:g} mm between slices {i} and {i + 1} (nominal {nominal:g} mm): nothing counted inside it"
            )
        elif d < OVERLAP_FACTOR * nominal:
            notes.append(f"overlap: slices {i} and {i + 1} are {d:g} mm apart (nominal {nominal:g} mm): slabs thinned")
    before = [nominal] + distances
    after = distances + [nominal]
    thickness = tuple((min(b, nominal) + min(a, nominal)) / 2.0 for b, a in zip(before, after))
    return nominal, thickness, notes


def _normal(slices: Sequence[SliceHeader]) -> np.ndarray:
    reference = np.asarray(slices[0].orientation, dtype=np.float64)
    for s in slices[1:]:
        if np.max(np.abs(np.asarray(s.orientation) - reference)) > ORIENTATION_TOLERANCE:
            raise InvalidSeries("slices differ in ImageOrientationPatient: not one stack")
    normal = np.cross(reference[:3], reference[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise InvalidSeries("ImageOrientationPatient row and column cosines are parallel")
    return normal / length


def _check_spacing(slices: Sequence[SliceHeader]) -> None:
    spacings = [s.pixel_spacing for s in slices]
    if all(p is None for p in spacings):
        return
    if any(p is None for p in spacings):
        raise InvalidSeries("PixelSpacing is set on some slices and missing on others")
    first = np.asarray(spacings[0])
    for spacing in spacings[1:]:
        if np.max(np.abs(np.asarray(spacing) - first) / first) > SPACING_TOLERANCE:
            raise InvalidSeries("slices differ in PixelSpacing: not one stack")


def _slices(index: int, dataset) -> tuple[SliceHeader, ...]:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    shared = _first_item(dataset.get("SharedFunctionalGroupsSequence"))
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    instance_number = _int(dataset.get("InstanceNumber"))
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    top_position = _floats(dataset.get("ImagePositionPatient"), 3)
    top_orientation = _floats(dataset.get("ImageOrientationPatient"), 6)
    top_spacing = _floats(dataset.get("PixelSpacing"), 2)
    result = []
    for frame in range(frames):
        groups = [g for g in (_item(per_frame, frame), shared) if g is not None]
        position = _functional(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
        orientation = _functional(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        spacing = _functional(groups, "PixelMeasuresSequence", "PixelSpacing", 2)
        if frames > 1 and position is None:
            top = None  # one top-level position cannot place several frames
        else:
            top = top_position
        result.append(
            SliceHeader(
                file_index=index,
                frame=frame,
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                position=position or top,
                orientation=orientation or top_orientation,
                pixel_spacing=spacing or top_spacing,
                rows=rows,
                columns=columns,
            )
        )
    return tuple(result)


def _functional(groups: list, sequence: str, keyword: str, count: int) -> tuple[float, ...] | None:
    for group in groups:
        item = _first_item(group.get(sequence))
        if item is not None and (values := _floats(item.get(keyword), count)) is not None:
            return values
    return None


def _item(sequence, index: int):
    return sequence[index] if sequence is not None and index < len(sequence) else None


def _first_item(sequence):
    return _item(sequence, 0)


def _floats(value, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = tuple(float(v) for v in value)
    if len(values) != count:
        raise ValueError(f"expected {count} values, got {len(values)}")
    return values


def _float(value) -> float | None:
    try:
        number = float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None
    return number if number and number > 0 else None


def _int(value) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _has_pixel_data(data: bytes) -> bool:
    """The (7FE0,0010) Pixel Data tag, little-endian, is in the file (the header parse stopped before it)."""
    return b"\xe0\x7f\x10\x00" in data


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else ""
    return name if name and name != uid else uid
