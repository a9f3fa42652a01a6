"""Whole DICOM series: the files to send, and the typed per-series answer.

    analysis = client.analyze_series("study/series_dir/", dicom_seg=True)
    for series in analysis.series:
        print(series.label, series.volume_ml, len(series.slices))

Research use only. Not a medical device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from brainscan.errors import BrainscanError, InvalidInput, from_status
from brainscan.results import AnalysisResult, result_from_response
from brainscan_proto.v1 import brainscan_pb2 as pb

PathLike = str | os.PathLike


@dataclass(frozen=True)
class SeriesSlice:
    file: str
    frame: int
    sop_instance_uid: str
    position_mm: float | None  # along the slice normal; None when ordered by InstanceNumber
    thickness_mm: float | None  # the slab this slice stands for in the volume
    result: AnalysisResult


@dataclass(frozen=True)
class SeriesResult:
    series_instance_uid: str
    label: str
    slices: tuple[SeriesSlice, ...]  # in anatomical order
    tumor_slices: tuple[int, ...]  # indices into slices
    largest_cross_section_mm2: float | None
    volume_ml: float | None
    slice_distance_mm: float | None
    ordered_by: str  # "position" or "instance_number"
    notes: tuple[str, ...]  # gaps, overlaps, fallbacks
    models: dict[str, str]
    dicom_seg: bytes | None = field(default=None, repr=False)
    dicom_sr: bytes | None = field(default=None, repr=False)  # TID 1500 measurement report

    def to_json_dict(self) -> dict[str, object]:
        """The CLI's --json line for a series: the summary and per-slice results, without masks."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "label": self.label,
            "slices": len(self.slices),
            "tumor_slices": list(self.tumor_slices),
            "largest_cross_section_mm2": _round(self.largest_cross_section_mm2),
            "volume_ml": _round(self.volume_ml, 4),
            "slice_distance_mm": _round(self.slice_distance_mm, 4),
            "ordered_by": self.ordered_by,
            "notes": list(self.notes),
            "models": dict(self.models),
            "per_slice": [
                {"file": s.file, "frame": s.frame, "position_mm": _round(s.position_mm, 4), **s.result.to_json_dict()}
                for s in self.slices
            ],
        }


@dataclass(frozen=True)
class SkippedFile:
    file: str
    reason: str


@dataclass(frozen=True)
class SeriesFailure:
    """A series that could not be analyzed (not one stack, no order, …)."""

    series_instance_uid: str
    error: BrainscanError


@dataclass(frozen=True)
class SeriesAnalysis:
    series: tuple[SeriesResult, ...]
    skipped: tuple[SkippedFile, ...]  # files that are not images to analyze, with why
    failed: tuple[SeriesFailure, ...]
    disclaimer: str = ""


def series_files(paths_or_folder: PathLike | Iterable[PathLike]) -> tuple[list[Path], list[SkippedFile]]:
    """The DICOM files to send (folders walked, in name order) and the files left out here, with why."""
    roots = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    paths: list[Path] = []
    for root in map(Path, roots):
        if root.is_dir():
            paths.extend(p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("."))
        elif root.is_file():
            paths.append(root)
        else:
            raise InvalidInput(f"no such file or folder: {root}")
    send, skipped = [], []
    for path in paths:
        with path.open("rb") as handle:
            head = handle.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            skipped.append(SkippedFile(str(path), "not a DICOM file (no DICM preamble)"))
        else:
            send.append(path)
    if not send:
        raise InvalidInput(f"no DICOM files among {len(paths)} file(s) in {', '.join(map(str, roots))}")
    return send, skipped


def series_requests(
    paths: list[Path], *, segment: bool, detect: bool, gate: bool, group_series: bool, dicom_seg: bool, dicom_sr: bool
) -> Iterator[pb.AnalyzeSeriesRequest]:
    """One message per file, read as it is sent; the first carries the options."""
    options = pb.SeriesOptions(
        analysis=pb.AnalyzeOptions(skip_segmentation=not segment, skip_detection=not detect, ungated=not gate),
        group_series=group_series,
        dicom_seg=dicom_seg,
        dicom_sr=dicom_sr,
    )
    for index, path in enumerate(paths):
        request = pb.AnalyzeSeriesRequest(dicom=path.read_bytes(), file_id=str(path))
        if index == 0:
            request.options.CopyFrom(options)
        yield request


def series_from_response(response: pb.AnalyzeSeriesResponse, local_skips: list[SkippedFile]) -> SeriesAnalysis:
    series, failed = [], []
    for result in response.series:
        if result.HasField("error"):
            failed.append(SeriesFailure(result.series_instance_uid, from_status(result.error.code, result.error.message)))
            continue
        series.append(
            SeriesResult(
                series_instance_uid=result.series_instance_uid,
                label=result.label,
                slices=tuple(
                    SeriesSlice(
                        file=s.file_id,
                        frame=s.frame,
                        sop_instance_uid=s.sop_instance_uid,
                        position_mm=s.position_mm if s.HasField("position_mm") else None,
                        thickness_mm=s.thickness_mm or None,
                        result=result_from_response(s.result),
                    )
                    for s in result.slices
                ),
                tumor_slices=tuple(result.tumor_slices),
                largest_cross_section_mm2=_optional(result, "largest_cross_section_mm2"),
                volume_ml=_optional(result, "volume_ml"),
                slice_distance_mm=_optional(result, "slice_distance_mm"),
                ordered_by=result.ordered_by,
                notes=tuple(result.notes),
                models=dict(result.model_versions),
                dicom_seg=result.dicom_seg or None,
                dicom_sr=result.dicom_sr or None,
            )
        )
    skipped = local_skips + [SkippedFile(s.file_id, s.reason) for s in response.skipped]
    return SeriesAnalysis(tuple(series), tuple(skipped), tuple(failed), response.disclaimer)


def _optional(message, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)
