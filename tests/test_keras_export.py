"""Keras → ONNX export: contract names, dynamic batch, parity, config validity, a training smoke run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from export.datasets import CLASS_LABELS, default_data_root

DATA_ROOT = default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA_ROOT / "sartaj-classification").is_dir(),
    reason=f"shared datasets not found at {DATA_ROOT} (set BRAINSCAN_DATA to run these)",
)


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.export_keras import write_tiny

    repository = tmp_path_factory.mktemp("repo")
    for model in ("classifier", "unet"):
        write_tiny(repository, model)
    return repository


@pytest.mark.parametrize("model", ["classifier", "unet"])
def test_config_is_a_valid_contract(tiny_repository: Path, model: str) -> None:
    from gateway.contract import load_model_spec, validate_role

    spec = load_model_spec(tiny_repository / model)
    validate_role(spec, model)
    assert spec.max_batch_size > 0
    assert spec.input("image").dims == (64, 64, 1)
    assert spec.onnx_path.is_file() and spec.onnx_path.stat().st_size < 20 * 2**20
    if model == "classifier":
        assert spec.labels == CLASS_LABELS
        assert spec.output("probabilities").dims == (4,)
    else:
        assert spec.output("mask").dims == (64, 64, 1)
    assert "Research use only" in (tiny_repository / model / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize(("model", "outputs"), [("classifier", ["in_scope", "probabilities"]), ("unet", ["mask"])])
def test_onnx_names_and_dynamic_batch(tiny_repository: Path, model: str, outputs: list[str]) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert sorted(o.name for o in session.get_outputs()) == outputs
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        result = session.run([outputs[-1]], {"image": rng.random((batch, 64, 64, 1), dtype=np.float32)})[0]
        assert result.shape[0] == batch and result.dtype == np.float32
        if model == "classifier":
            np.testing.assert_allclose(result.sum(axis=1), 1.0, atol=1e-5)
        else:
            assert result.shape[1:] == (64, 64, 1) and 0.0 <= result.min() and result.max() <= 1.0


def test_parity_check_catches_a_mismatched_graph(tiny_repository: Path) -> None:
    import onnxruntime as ort

    from export.export_keras import ExportError, check_parity
    from export.keras_models import build_classifier

    onnx_file = tiny_repository / "classifier" / "1" / "model.onnx"
    inputs = np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32)
    exported = ort.InferenceSession(str(onnx_file)).run(["probabilities"], {"image": inputs})[0]
    other = build_classifier(64, pretrained=False)
    kernel, bias = other.get_layer("logits").get_weights()
    bias[(int(exported[0].argmax()) + 1) % len(bias)] += 1e4  # another class wins: not the exported graph
    other.get_layer("logits").set_weights([kernel, bias])
    with pytest.raises(ExportError, match="differs from Keras"):
        check_parity(other, tiny_repository / "classifier" / "1" / "model.onnx", "classifier", inputs)


def _args(module, argv: list[str]) -> argparse.Namespace:
    return module.get_args_parser().parse_args(argv)


@pytest.mark.slow
@needs_data
def test_training_smoke_then_export_with_parity(tmp_path: Path) -> None:
    """A handful of real images through the real training command, then the real export path."""
    import keras

    from export import train_classifier, train_unet
    from export.export_keras import export_model
    from gateway.contract import load_model_spec

    common = ["--data", str(DATA_ROOT), "--limit", "24", "--epochs", "1", "--size", "32", "--batch-size", "8"]
    assert train_classifier.main(_args(train_classifier, common + ["--intensity-remap", "0.5", "--out", str(tmp_path / "clf")])) == 0
    assert train_unet.main(_args(train_unet, common + ["--hard-negative-repeat", "2", "--out", str(tmp_path / "unet")])) == 0
    unet_summary = json.loads((tmp_path / "unet" / "summary.json").read_text())
    assert unet_summary["hard_negative_repeat"] == 2 and unet_summary["hard_negatives"] >= 0  # mined by the starting model
    for model, run in (("classifier", "clf"), ("unet", "unet")):
        run_dir = tmp_path / run
        assert {"args.json", "log.csv", "best.keras", "summary.json"} <= {p.name for p in run_dir.iterdir()}
        keras_model = keras.models.load_model(run_dir / "best.keras", compile=False)
        result = export_model(keras_model, tmp_path / "repo", model, data_root=DATA_ROOT, savedmodel=model == "unet")
        assert result.parity_max_abs_diff <= 1e-4
        assert load_model_spec(tmp_path / "repo" / model).input_size == 32
    # A fine-tuning run can start from the shipped SavedModel (--init), weights matched by name.
    from export.keras_models import build_unet
    from export.train_common import load_initial_weights

    savedmodel = tmp_path / "repo" / "unet" / "1" / "model.savedmodel"
    fresh = build_unet(32, pretrained=False)
    load_initial_weights(fresh, savedmodel)
    probe = np.random.default_rng(3).random((2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(fresh.predict(probe, verbose=0), keras_model.predict(probe, verbose=0), atol=1e-6)
    with pytest.raises(ValueError, match="not a SavedModel of this architecture|the model wants"):
        load_initial_weights(build_unet(32, pretrained=False, decoder=(8, 8, 8, 8)), savedmodel)


def test_metric_helpers() -> None:
    from export.evaluate_keras import classification_metrics
    from export.train_unet import dice_scores

    truth = np.array([0, 1, 2, 3, 0])
    probs = np.eye(4)[[0, 1, 2, 0, 1]]
    metrics = classification_metrics(truth, probs)
    assert metrics["accuracy"] == 0.6
    assert metrics["recall"]["glioma"] == 0.5 and metrics["recall"]["pituitary"] == 0.0
    assert metrics["tumor_vs_no_tumor_accuracy"] == 1.0
    pred = np.zeros((2, 4, 4), bool)
    pred[0, :2] = True
    truth_masks = np.zeros((2, 4, 4), bool)
    truth_masks[0, :1] = True
    np.testing.assert_allclose(dice_scores(pred, truth_masks), [2 * 4 / 12, 1.0])


def test_partial_label_loss_is_cross_entropy_for_labels_and_tumor_mass_for_weak_slices() -> None:
    from keras import ops

    from export.train_classifier import WEAK, allowed_labels, partial_label_loss

    no_tumor = CLASS_LABELS.index("no_tumor")
    allowed = allowed_labels(np.array([0, no_tumor, WEAK]))
    assert allowed[2, no_tumor] == 0.0 and allowed[2].sum() == len(CLASS_LABELS) - 1
    probs = np.array([[0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1], [0.2, 0.1, 0.6, 0.1]], np.float32)
    loss = ops.convert_to_numpy(partial_label_loss(0.0)(allowed, probs))
    np.testing.assert_allclose(loss, [-np.log(0.6), -np.log(0.7), -np.log(1 - 0.6)], rtol=1e-5)


def test_random_intensity_curve_keeps_background_black_and_can_swap_tissue_brightness() -> None:
    import tensorflow as tf

    from export.train_common import random_intensity_curve

    tf.random.set_seed(3)
    images = np.zeros((64, 8, 8, 1), np.float32)
    images[:, :4] = 0.3  # a darker tissue
    images[:, 4:6] = 0.7  # a brighter one; rows 6-7 stay background
    curved = random_intensity_curve(tf.constant(images), 1.0).numpy()
    assert curved.min() >= 0.0 and curved.max() <= 1.0
    assert np.all(curved[:, 6:] == 0.0)  # background
    dark, bright = curved[:, 0, 0, 0], curved[:, 4, 0, 0]
    assert (dark > bright).any() and (dark < bright).any()  # contrast flips in some images, not all
    untouched = random_intensity_curve(tf.constant(images), 0.0).numpy()
    assert np.array_equal(untouched, images)


@needs_data
@pytest.mark.parametrize("model", ["classifier", "unet"])
def test_error_gallery_holds_exactly_the_errors_the_metrics_count(tiny_repository: Path, model: str, tmp_path: Path) -> None:
    import csv

    import cv2

    from export.error_gallery import COLUMNS, TILE_SIDE
    from export.evaluate_keras import evaluate

    report = evaluate(model, data_root=DATA_ROOT, repository=tiny_repository, errors_dir=tmp_path)
    with (tmp_path / "errors.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    splits = report["splits"]
    if model == "classifier":
        full = splits["sartaj-classification/Testing"]["full"]
        counts = np.array(full["confusion_matrix"]["counts"])
        expected = {f"classifier-{label}-misclassified": int(counts[c].sum() - counts[c, c]) for c, label in enumerate(CLASS_LABELS)}
        assert all(row["prediction"] != row["truth"] for row in rows)
    else:
        negatives = splits["sartaj-classification/Testing/no_tumor"]["full"]
        expected = {"unet-mask-on-Testing-no_tumor": round(negatives["n"] * (1 - negatives["empty_mask_rate"]))}
        for key in ("br35h-polygons/val", "ruslan-kl-polygons/test"):
            dataset, split = key.split("/")
            stats = splits[key]["full"]
            expected[f"unet-dice-below-0.5-{dataset}-{split}"] = round(stats["n"] * stats["share_dice_below_0.5"])
    expected = {group: count for group, count in expected.items() if count}
    assert expected, "a random-weight model should get something wrong"
    assert {group: sum(row["group"] == group for row in rows) for group in expected} == expected
    assert len(rows) == sum(expected.values())
    assert all((DATA_ROOT / row["path"]).is_file() for row in rows)
    for group, count in expected.items():
        sheet = cv2.imread(str(tmp_path / f"{group}.png"))
        assert sheet.shape == (TILE_SIDE * -(-count // COLUMNS), TILE_SIDE * COLUMNS, 3)
        assert [int(row["tile"]) for row in rows if row["group"] == group] == list(range(1, count + 1))


def test_error_gallery_rerun_into_the_same_folder_leaves_no_stale_sheets(tmp_path: Path) -> None:
    from export.error_gallery import ErrorCase, write_gallery

    def case(group: str) -> ErrorCase:
        return ErrorCase(group, tmp_path / "a.jpg", False, "glioma", "meningioma", 0.7, np.zeros((32, 32), np.float32))

    (tmp_path / "notes.png").write_bytes(b"not ours")
    write_gallery([case("first"), case("second")], tmp_path, data_root=tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"first.png", "second.png", "notes.png"}
    write_gallery([case("second")], tmp_path, data_root=tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"second.png", "notes.png"}
    write_gallery([], tmp_path, data_root=tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"notes.png"}
    assert (tmp_path / "errors.csv").read_text().splitlines() == [",".join(
        ("group", "tile", "path", "duplicate_free", "truth", "prediction", "score"))]
