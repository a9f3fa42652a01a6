"""`python -m export evaluate service`: the evaluation splits through a real gateway, scored as served.

The served answers must equal the models run directly on the same files (the
tiny random-weight repository): a parity check of serving against evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.datasets import CLASS_LABELS, default_data_root, load_classification_split, load_via_split

DATA_ROOT = default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "sartaj-classification").is_dir(),
    reason=f"shared datasets not found at {DATA_ROOT} (set BRAINSCAN_DATA to run these)",
)
LIMIT = 24


def run_service_evaluation(address: str, out: Path, *extra: str) -> dict:
    from export.evaluate_service import get_args_parser, main

    args = get_args_parser().parse_args(
        ["--server", address, "--data", str(DATA_ROOT), "--limit", str(LIMIT), "--output", str(out), *extra]
    )
    assert main(args) == 0
    return json.loads(out.read_text())


@needs_data
def test_served_labels_and_masks_match_the_models_run_directly(embedded_gateway, tiny_repository: Path, tmp_path: Path) -> None:
    from export.calibration import calibration_errors
    from export.evaluate_keras import OnnxModel, dice_and_iou
    from export.evaluate_service import spread
    from gateway.preprocessing import load_image_file, mask_to_original, prepare

    report = run_service_evaluation(embedded_gateway.address, tmp_path / "report.json", "--ungated")
    assert report["gated"] is False and report["failed"] == {}
    assert report["splits"]["br35h-polygons/val"]["sent"] == LIMIT
    # Testing, br35h val, ruslan-kl test (4 images), lgg-flair val, the held-out head-CT half
    assert report["calls"] == LIMIT + LIMIT + 4 + LIMIT + LIMIT
    assert set(report["decision"]) >= {"gate", "alone", "strong", "min_mask_fraction", "scope_threshold"}
    for key in ("lgg-flair/val", "head-ct/held-out"):
        split = report["splits"][key]["full"]
        assert split["n"] == LIMIT and 0.0 <= split["scope_flagged"] <= 1.0
        assert len(split["scope_flagged_files"]) == round(split["scope_flagged"] * LIMIT)
    assert report["splits"]["head-ct/held-out"]["full"]["tumor_slices"] == 0
    assert report["splits"]["head-ct/held-out"]["full"]["sensitivity"] is None

    # The served probabilities are the classifier's, run directly: their calibration errors agree.
    classifier = OnnxModel(tiny_repository, "classifier")
    items = spread(load_classification_split(DATA_ROOT, "Testing"), LIMIT)
    assert len({label for _, label in items}) == len(CLASS_LABELS)  # spread reaches every class
    probabilities = np.concatenate(
        [classifier.run(prepare(load_image_file(str(p)).pixels, classifier.size).tensor[None, ..., None]) for p, _ in items]
    )
    truth = np.array([CLASS_LABELS.index(name) for _, name in items])
    testing = report["splits"]["sartaj-classification/Testing"]["full"]
    for key, value in calibration_errors(probabilities, truth, CLASS_LABELS.index("no_tumor")).items():
        assert testing[key] == pytest.approx(value, abs=2e-3), key
    assert testing["n"] == LIMIT and testing["tumor_vs_no_tumor_accuracy"] is not None

    unet = OnnxModel(tiny_repository, "unet")
    slices = spread(load_via_split(DATA_ROOT, "br35h-polygons", "val"), LIMIT)
    dices = []
    for item in slices:
        gray = load_image_file(str(item.path)).pixels
        prepared = prepare(gray, unet.size)
        mask = mask_to_original(unet.run(prepared.tensor[None, ..., None])[0, ..., 0], prepared) >= 0.5
        dices.append(dice_and_iou(mask, item.union_mask(*gray.shape))[0])
    served = report["splits"]["br35h-polygons/val"]["full"]
    assert served["n"] == len(slices)
    assert served["mask_dice"] == pytest.approx(np.mean(dices), abs=2e-3)
    # Every headline share carries its 95% interval (by patient / near-duplicate group) around it.
    lgg = report["splits"]["lgg-flair/val"]["full"]
    for split, key in ((testing, "accuracy"), (testing, "sensitivity"), (testing, "specificity"), (served, "mask_dice"),
                       (lgg, "sensitivity"), (lgg, "specificity")):
        low, high = split[f"{key}_ci95"]
        assert low <= split[key] <= high and 0.0 <= low < high <= 1.0, key


@needs_data
def test_gated_evaluation_shows_nothing_where_no_tumor_was_seen(embedded_gateway, tmp_path: Path) -> None:
    report = run_service_evaluation(embedded_gateway.address, tmp_path / "report.json")
    assert report["gated"] is True
    alarms = report["splits"]["sartaj-classification/Testing/no_tumor"]["full"]
    assert alarms["n"] > 0
    assert alarms["anything_shown"] <= alarms["tumor_detected"]
    assert report["latency_ms"]["p50"] > 0


@needs_data
def test_failed_calls_are_counted_per_split_and_fail_the_run(embedded_gateway, tmp_path: Path) -> None:
    from export.evaluate_service import get_args_parser, main

    out = tmp_path / "report.json"
    args = get_args_parser().parse_args(
        ["--server", embedded_gateway.address, "--data", str(DATA_ROOT), "--limit", "4", "--timeout", "0.000001",
         "--output", str(out)]
    )
    assert main(args) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == {"DeadlineExceeded": report["calls"]}
    testing = report["splits"]["sartaj-classification/Testing"]
    assert testing["sent"] == 4 and testing["failed"] == {"DeadlineExceeded": 4} and testing["full"] == {"n": 0}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--server", "127.0.0.1:1"], "start one with `brainscan-server`"),
        (["--limit", "-1"], "--limit must be 0"),
        (["--output", "."], "is a folder"),
        (["--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)
def test_bad_arguments_are_clear_errors(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.evaluate_service import get_args_parser, main

    args = get_args_parser().parse_args(["--data", str(tmp_path), "--timeout", "2", *flags])
    assert main(args) == 2
    assert message in capsys.readouterr().err
