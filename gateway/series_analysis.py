"""A call's DICOM files → analyzed series: the domain side of AnalyzeSeries.

Files are analyzed as they arrive, a few at a time. Each file is admitted
through the gateway's one admission limit (gateway.admission) before it is
decoded: one in-flight slot and its decoded pixels (all frames, from its
header), held until its last frame is analyzed, exactly as an Analyze or
AnalyzeStream request. A file refused (over the per-request limit, checked
as its header is read; no room in the budget across requests in flight by
the call's deadline) is skipped with that reason and the call goes on. A call keeps only headers and
compact masks, never a whole series of pixels. Once the last file is in,
the slices are grouped and ordered (gateway.series), summarized, and turned
into a DICOM SEG on request (gateway.dicom_seg).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from importlib import metadata

import cv2
import numpy as np

from gateway.admission import Admission
from gateway.dicom_seg import measurement_report_bytes, segmentation_bytes
from gateway.errors import BrainscanError, InvalidImage, InvalidSeries, Overloaded, RequestTooLarge
from gateway.pipeline import Analysis, AnalysisOptions, Pipeline, frame_step
from gateway.request_clock import Stopwatch
from gateway.series import (
    DicomFile,
    OrderedSeries,
    SeriesSummary,
    SliceFinding,
    SliceHeader,
    Skipped,
    group_by_series,
    order_series,
    read_header,
    summarize,
)

MAX_FILES = 4096  # per call; a series larger than this is split by the caller
FILES_AT_ONCE = 8  # files decoded and analyzed concurrently within one call


@dataclass(frozen=True)
class AnalyzedSlice:
    header: SliceHeader
    analysis: Analysis
    thickness_mm: float | None
    position_mm: float | None


@dataclass(frozen=True)
class SeriesOutcome:
    series_uid: str
    error: BrainscanError | None = None
    ordered_by: str = ""
    slice_distance_mm: float | None = None
    slices: tuple[AnalyzedSlice, ...] = ()
    summary: SeriesSummary | None = None
    dicom_seg: bytes | None = None
    dicom_sr: bytes | None = None


class SeriesAnalyzer:
    """Collects one call's files (`add`), then answers for every series in them (`finish`)."""

    def __init__(
        self,
        pipeline: Pipeline,
        options: AnalysisOptions,
        *,
        group_series: bool,
        dicom_seg: bool,
        dicom_sr: bool = False,
        admission: Admission,
        deadline: float | None,
    ) -> None:
        self.pipeline, self.options = pipeline, options
        self.group_series, self.dicom_seg, self.dicom_sr = group_series, dicom_seg or dicom_sr, dicom_sr
        self._admission = admission  # the gateway's one limit, shared with Analyze and KServe
        self._deadline = deadline  # the call's (gateway.request_clock)
        self._files: list[DicomFile] = []
        self._skipped: list[Skipped] = []
        self._analyses: dict[tuple[int, int], Analysis] = {}
        self._tasks: list[asyncio.Task] = []
        self._room = asyncio.Semaphore(FILES_AT_ONCE)
        self._count = 0

    async def add(self, data: bytes, stopwatch: Stopwatch) -> int:
        """Take the next file, `stopwatch` started as it arrived; returns its index (the order of arrival)."""
        index = self._count
        self._count += 1
        if self._count > MAX_FILES:
            raise RequestTooLarge(f"more than {MAX_FILES} files in one AnalyzeSeries call; send the series in parts")
        await self._room.acquire()  # bounds the bytes held: at most FILES_AT_ONCE files wait or run
        try:
            header = await asyncio.to_thread(read_header, index, data, max_pixels=self._admission.max_request_pixels)
            if isinstance(header, Skipped):
                self._skipped.append(header)
                self._room.release()
                return index
            self._check_one_series(header)
        except BaseException:
            self._room.release()
            raise
        self._files.append(header)
        self._tasks.append(asyncio.ensure_future(self._analyze_file(header, data, stopwatch)))
        return index

    async def finish(self) -> tuple[list[SeriesOutcome], list[Skipped]]:
        try:
            await asyncio.gather(*self._tasks)
        except BaseException:
            for task in self._tasks:
                task.cancel()
            raise
        skipped_files = {s.index for s in self._skipped}
        files = [f for f in self._files if f.index not in skipped_files]
        outcomes = []
        for series_uid, members in group_by_series(files).items():
            try:
                ordered = order_series(series_uid, members)
            except InvalidSeries as error:
                outcomes.append(SeriesOutcome(series_uid, error=error))
                continue
            outcomes.append(await self._outcome(ordered))
        return outcomes, sorted(self._skipped, key=lambda s: s.index)

    def _check_one_series(self, header: DicomFile) -> None:
        if self.group_series or not self._files or header.series_uid == self._files[0].series_uid:
            return
        raise InvalidSeries(
            "the files belong to more than one series (SeriesInstanceUID differs); "
            "ask for grouping (group_series, `--group-series`) to get one result per series"
        )

    async def _analyze_file(self, file: DicomFile, data: bytes, stopwatch: Stopwatch) -> None:
        try:
            async with self._admission.admit_image(data, self._deadline) as header:
                frames = await self.pipeline.decode_frames(data, header, stopwatch)
                if len(frames) != len(file.slices):
                    self._skipped.append(
                        Skipped(file.index, f"{len(frames)} frames decoded, {len(file.slices)} in the header")
                    )
                    return
                for frame, decoded in enumerate(frames):
                    self._analyses[(file.index, frame)] = await self.pipeline.run(
                        frame_step(decoded), self.options, deadline=self._deadline, stopwatch=stopwatch.fork()
                    )
        except (InvalidImage, Overloaded) as error:  # refused at admission, or undecodable
            self._skipped.append(Skipped(file.index, str(error), error))
        finally:
            self._room.release()

    async def _outcome(self, ordered: OrderedSeries) -> SeriesOutcome:
        thickness = ordered.thickness_mm or (None,) * len(ordered.slices)
        positions = ordered.positions_mm or (None,) * len(ordered.slices)
        slices = tuple(
            AnalyzedSlice(s, self._analyses[(s.file_index, s.frame)], t, p)
            for s, t, p in zip(ordered.slices, thickness, positions)
        )
        summary = summarize(ordered, [self._finding(s) for s in slices])
        notes = list(summary.notes)
        seg = sr = None
        if self.dicom_seg:
            try:
                seg = await asyncio.to_thread(self._segmentation, ordered, slices)
                if self.dicom_sr:
                    sr = await asyncio.to_thread(self._report, ordered, seg, summary)
            except InvalidSeries as error:
                notes.append(f"no DICOM {'SEG' if seg is None else 'SR'}: {error}")
            except (AttributeError, ValueError, TypeError) as error:  # highdicom: a source lacks what it needs
                notes.append(
                    f"no DICOM {'SEG' if seg is None else 'SR'}: the source headers do not make a valid one "
                    f"({type(error).__name__}: {error})"
                )
        summary = SeriesSummary(
            summary.label, summary.tumor_slices, summary.largest_cross_section_mm2, summary.volume_ml, tuple(notes)
        )
        return SeriesOutcome(
            ordered.series_uid,
            ordered_by=ordered.ordered_by,
            slice_distance_mm=ordered.slice_distance_mm,
            slices=slices,
            summary=summary,
            dicom_seg=seg,
            dicom_sr=sr,
        )

    def _finding(self, analyzed: AnalyzedSlice) -> SliceFinding:
        analysis = analyzed.analysis
        if not self.options.segment or analyzed.header.pixel_spacing is None:
            area = None
        else:  # the U-Net found nothing, or the gate kept it from running: no tumor pixels
            area = 0.0 if analysis.segmentation is None else analysis.segmentation.area_mm2
        return SliceFinding(analysis.tumor_detected, analysis.probabilities, area)

    def _segmentation(self, ordered: OrderedSeries, slices: tuple[AnalyzedSlice, ...]) -> bytes:
        if not self.options.segment:
            raise InvalidSeries("the U-Net was skipped")
        if len(ordered.files) > 1 and any(f.multi_frame for f in ordered.files):
            raise InvalidSeries("the series spans several files of which some are multi-frame")
        if ordered.files[0].multi_frame:  # the SEG's frames follow the source's frame order
            slices = tuple(sorted(slices, key=lambda s: s.header.frame))
            headers = [ordered.files[0].header]
        else:
            by_index = {f.index: f.header for f in ordered.files}
            headers = [by_index[s.header.file_index] for s in slices]
        masks = np.stack([served_mask(s.analysis) for s in slices])
        return segmentation_bytes(
            headers,
            masks,
            unet_version=self.pipeline.backend.specs["unet"].version,
            software_version=_software_version(),
            slice_distance_mm=ordered.slice_distance_mm,
        )


    def _report(self, ordered: OrderedSeries, seg: bytes, summary: SeriesSummary) -> bytes:
        return measurement_report_bytes(
            seg,
            [f.header for f in ordered.files],
            volume_ml=summary.volume_ml,
            largest_cross_section_mm2=summary.largest_cross_section_mm2,
            unet_version=self.pipeline.backend.specs["unet"].version,
            software_version=_software_version(),
        )


def served_mask(analysis: Analysis) -> np.ndarray:
    """The U-Net mask exactly as served (its PNG cut-out), back on the full H×W canvas."""
    canvas = np.zeros((analysis.image_height, analysis.image_width), dtype=bool)
    if analysis.segmentation is not None:
        region = analysis.segmentation.mask
        patch = cv2.imdecode(np.frombuffer(region.png, dtype=np.uint8), cv2.IMREAD_GRAYSCALE) > 127
        canvas[region.top : region.top + region.height, region.left : region.left + region.width] = patch
    return canvas


def _software_version() -> str:
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("brainscan")
    return "unknown"
