"""Whole DICOM series: grouping, ordering, the volume summary and the DICOM SEG.

The series are real multi-slice DICOM files built here with pydicom
(tests/dicom_factory.py); the gRPC cases run against the real gateway on the
tiny random-weight models.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.dicom_series import mr_series
from brainscan import AsyncClient, Client, InvalidInput
from gateway.errors import InvalidSeries
from gateway.preprocessing import DEFAULT_MAX_REQUEST_PIXELS
from gateway.series import SliceFinding, Skipped, group_by_series, order_series, read_header, summarize
from tests.dicom_factory import dicom_bytes
from tests.test_cli_and_server import brainscan

PATIENT_NAME, PATIENT_ID = "Testpatient^Quentin", "PID-7741-XYZ"
OBLIQUE = (0.9848078, 0.0, -0.1736482, 0.0, 1.0, 0.0)  # rotated 10° about the column axis


def stack(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Head-like slices (uint16): an ellipse with a bright blob that moves from slice to slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    slices = []
    for i in range(count):
        head = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.36 * size)) ** 2 <= 1.0
        blob = (yy - (0.3 + 0.08 * i) * size) ** 2 + (xx - 0.55 * size) ** 2 <= (0.1 * size) ** 2
        image = np.where(head, 1800, 0) + np.where(blob, 1600, 0) + rng.normal(0, 40, (size, size))
        slices.append(np.clip(image, 0, 4095).astype(np.uint16))
    return np.stack(slices)


def ordered(files: list[bytes]):
    headers = [read_header(i, data, max_pixels=DEFAULT_MAX_REQUEST_PIXELS) for i, data in enumerate(files)]
    ((uid, members),) = group_by_series(headers).items()
    return order_series(uid, members)


def non_image(sop_class: str) -> bytes:
    """A DICOM object without pixel data (an SR, a presentation state)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.PatientName = generate_uid(), "SR", PATIENT_NAME
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- ordering and the summary (pure) ----------------------------------------


def test_shuffled_oblique_series_is_ordered_by_position_on_the_normal():
    positions = [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]
    files = mr_series(stack(6, 32), positions_mm=positions, orientation=OBLIQUE)
    shuffled = list(range(6))
    random.Random(3).shuffle(shuffled)
    series = ordered([files[i] for i in shuffled])
    assert [shuffled[s.file_index] for s in series.slices] == list(range(6))
    assert series.ordered_by == "position"
    assert series.positions_mm == pytest.approx(positions, abs=1e-3)
    assert series.slice_distance_mm == pytest.approx(4.0, abs=1e-3) and series.notes == ()


def test_volume_with_a_gap_is_the_known_answer_and_says_where_the_gap_is():
    series = ordered(mr_series(stack(5, 32), positions_mm=[0, 5, 10, 20, 25], spacing=(0.5, 0.5)))
    assert series.thickness_mm == pytest.approx([5.0] * 5)  # the gap adds nothing
    areas = [100.0, 200.0, 300.0, 400.0, 0.0]
    findings = [SliceFinding(a > 0, {"glioma": 0.7, "meningioma": 0.2, "no_tumor": 0.1}, a) for a in areas]
    summary = summarize(series, findings)
    assert summary.volume_ml == pytest.approx(1000.0 * 5.0 / 1000.0)
    assert summary.largest_cross_section_mm2 == 400.0
    assert summary.tumor_slices == (0, 1, 2, 3) and summary.label == "glioma"
    assert any("gap of 10 mm between slices 2 and 3" in note for note in summary.notes)


def test_overlapping_slices_are_not_counted_twice():
    series = ordered(mr_series(stack(4, 32), positions_mm=[0, 5, 5, 10]))
    assert series.thickness_mm == pytest.approx([5.0, 2.5, 2.5, 5.0])
    summary = summarize(series, [SliceFinding(True, {"pituitary": 0.9, "no_tumor": 0.1}, 100.0)] * 4)
    assert summary.volume_ml == pytest.approx(100.0 * 15.0 / 1000.0)
    assert any(note.startswith("overlap: slices 1 and 2") for note in summary.notes)


def test_without_positions_the_order_is_instance_number_and_the_distance_from_the_tags():
    files = mr_series(stack(4, 32), geometry=False, slice_thickness=3.0)
    series = ordered([files[2], files[0], files[3], files[1]])
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4]
    assert series.ordered_by == "instance_number" and series.thickness_mm == (3.0,) * 4
    no_tags = ordered(mr_series(stack(2, 32), geometry=False))
    assert no_tags.thickness_mm is None
    assert summarize(no_tags, [SliceFinding(False, {"no_tumor": 1.0}, 0.0)] * 2).volume_ml is None


def test_bad_series_are_refused_with_the_reason():
    uid = generate_uid()
    tilted = mr_series(stack(2, 32), series_uid=uid) + mr_series(stack(1, 32), series_uid=uid, orientation=OBLIQUE)
    with pytest.raises(InvalidSeries, match="ImageOrientationPatient"):
        ordered(tilted)
    spacing = mr_series(stack(2, 32), series_uid=uid) + mr_series(stack(1, 32), series_uid=uid, spacing=(0.9, 0.9))
    with pytest.raises(InvalidSeries, match="PixelSpacing"):
        ordered(spacing)
    unordered = []
    for data in mr_series(stack(2, 32), geometry=False):
        dataset = pydicom.dcmread(io.BytesIO(data))
        del dataset.InstanceNumber
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        unordered.append(buffer.getvalue())
    with pytest.raises(InvalidSeries, match="order is unknown"):
        ordered(unordered)


def test_non_images_are_skipped_with_a_reason():
    cases = {
        non_image("1.2.840.10008.5.1.4.1.1.88.33"): "structured report",
        non_image("1.2.840.10008.5.1.4.1.1.11.1"): "presentation state",
        b"not dicom at all" * 20: "not a DICOM file",
        dicom_bytes(None): "no pixel data",
    }
    for data, reason in cases.items():
        skipped = read_header(0, data, max_pixels=DEFAULT_MAX_REQUEST_PIXELS)
        assert isinstance(skipped, Skipped) and reason in skipped.reason
        assert PATIENT_NAME not in skipped.reason


# --- over gRPC: the summary against the served slices, the DICOM SEG ----------


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes], list[float]]:
    """Five slices with a gap, written in shuffled order, plus an SR in the same folder."""
    positions = [0.0, 5.0, 10.0, 20.0, 25.0]
    files = mr_series(
        stack(5), positions_mm=positions, spacing=(0.7, 0.7), patient_name=PATIENT_NAME, patient_id=PATIENT_ID
    )
    folder = tmp_path_factory.mktemp("series")
    for name, index in zip("cebad", range(5)):
        (folder / f"{name}.dcm").write_bytes(files[index])
    (folder / "report.dcm").write_bytes(non_image("1.2.840.10008.5.1.4.1.1.88.33"))
    return folder, files, positions


@pytest.fixture(scope="module")
def analyzed(embedded_gateway, series_dir):
    folder, _, _ = series_dir
    with Client(embedded_gateway.address) as client:
        return client.analyze_series(folder, gate=False, dicom_seg=True, dicom_sr=True)


def test_series_summary_matches_the_served_slices(analyzed, series_dir):
    _, files, positions = series_dir
    (series,) = analyzed.series
    assert [s.position_mm for s in series.slices] == pytest.approx(positions)
    sources = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    assert [s.sop_instance_uid for s in series.slices] == sources
    assert [Path(s.file).name for s in series.slices] == ["c.dcm", "e.dcm", "b.dcm", "a.dcm", "d.dcm"]
    areas = [s.result.segmentation_area_mm2 or 0.0 for s in series.slices]
    assert any(areas), "the tiny U-Net served no mask: the SEG round trip would prove nothing"
    for s in series.slices:  # served area in mm² = pixel count × spacing
        assert (s.result.segmentation_area_mm2 or 0.0) == pytest.approx(int(s.result.mask.sum()) * 0.49 if s.result.mask is not None else 0.0)
    assert series.volume_ml == pytest.approx(sum(a * 5.0 for a in areas) / 1000.0)
    assert series.largest_cross_section_mm2 == pytest.approx(max(areas))
    assert series.tumor_slices == tuple(i for i, s in enumerate(series.slices) if s.result.tumor_detected)
    assert any("gap of 10 mm" in note for note in series.notes)
    assert set(series.models) == {"classifier", "unet", "maskrcnn"}
    ((report, reason),) = [(s.file, s.reason) for s in analyzed.skipped]
    assert report.endswith("report.dcm") and "structured report" in reason


def test_dicom_seg_round_trip_references_the_sources_and_holds_the_served_masks(analyzed, embedded_gateway):
    import highdicom as hd

    (series,) = analyzed.series
    seg = hd.seg.segread(io.BytesIO(series.dicom_seg))
    sources = [s.sop_instance_uid for s in series.slices]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(sources)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sources, segment_numbers=[1])
    for index, s in enumerate(series.slices):
        served = s.result.mask if s.result.mask is not None else np.zeros(s.result.image_size, bool)
        assert np.array_equal(pixels[index, :, :, 0].astype(bool), served), f"slice {index}"
    description = seg.get_segment_description(1)
    assert description.segment_label == "tumor"
    assert description.algorithm_identification[0].AlgorithmVersion == series.models["unet"]
    assert "research use only" in seg.SeriesDescription
    assert seg.PatientID == PATIENT_ID and str(seg.PatientName) == PATIENT_NAME
    log = embedded_gateway.log()
    assert PATIENT_ID not in log and "Testpatient" not in log


def test_dicom_sr_reports_the_summary_on_the_seg_segment(analyzed):
    (series,) = analyzed.series
    sr = pydicom.dcmread(io.BytesIO(series.dicom_sr))
    seg = pydicom.dcmread(io.BytesIO(series.dicom_seg))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    values = {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
        for item in _content_items(sr)
        if item.ValueType == "NUM"
    }
    assert values["Volume"] == pytest.approx(series.volume_ml, rel=1e-6)
    assert values["Area"] == pytest.approx(series.largest_cross_section_mm2, rel=1e-6)
    references = {ref.ReferencedSOPInstanceUID for item in _content_items(sr) for ref in item.get("ReferencedSOPSequence", [])}
    assert seg.SOPInstanceUID in references
    assert sr.PatientID == PATIENT_ID and "research use only" in sr.SeriesDescription


def _content_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


@pytest.mark.parametrize("kind", ["dicom_seg", "dicom_sr"])
def test_dicom_objects_pass_dciodvfy(analyzed, tmp_path, kind):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; `make system-deps` installs it)")
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(getattr(analyzed.series[0], kind))
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = done.stdout + done.stderr
    assert {"dicom_seg": "Segmentation", "dicom_sr": "Comprehensive3DSR"}[kind] in report  # the IOD it checked
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_mixed_series_need_grouping_and_bad_series_fail_alone(embedded_gateway, tmp_path):
    good = mr_series(stack(3, 48), patient_id=PATIENT_ID)
    uid = generate_uid()
    tilted = mr_series(stack(2, 48), series_uid=uid) + mr_series(stack(1, 48), series_uid=uid, orientation=OBLIQUE)
    for index, data in enumerate(good + tilted):
        (tmp_path / f"{index}.dcm").write_bytes(data)
    with Client(embedded_gateway.address) as client:
        with pytest.raises(InvalidInput, match="more than one series.*group"):
            client.analyze_series(tmp_path, gate=False)
        analysis = client.analyze_series(tmp_path, gate=False, group_series=True)
    assert [len(s.slices) for s in analysis.series] == [3]
    ((failure),) = analysis.failed
    assert failure.series_instance_uid == uid and "ImageOrientationPatient" in str(failure.error)
    assert embedded_gateway.alive()


def test_async_client_mirrors_the_blocking_one(embedded_gateway, series_dir, analyzed):
    import asyncio

    folder, _, _ = series_dir

    async def run():
        async with AsyncClient(embedded_gateway.address) as client:
            return await client.analyze_series(folder, gate=False)

    (series,) = asyncio.run(run()).series
    (blocking,) = analyzed.series
    assert [s.sop_instance_uid for s in series.slices] == [s.sop_instance_uid for s in blocking.slices]
    assert series.volume_ml == pytest.approx(blocking.volume_ml) and series.dicom_seg is None


def test_cli_writes_one_seg_per_series(embedded_gateway, series_dir, tmp_path):
    folder, _, _ = series_dir
    out = tmp_path / "seg"
    done = brainscan(
        "analyze", str(folder), "--server", embedded_gateway.address, "--ungated", "--dicom-seg", str(out), "--dicom-sr"
    )
    assert done.returncode == 0, done.stderr
    assert "volume" in done.stdout and "report.dcm" in done.stdout + done.stderr
    assert sorted(pydicom.dcmread(p).Modality for p in out.glob("*.dcm")) == ["SEG", "SR"]
