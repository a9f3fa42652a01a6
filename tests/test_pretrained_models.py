"""The ImageNet EfficientNet-Lite0 port, the box-supervised loss, the new data loaders, calibration
and the decision's operating point, and the Lite0 Mask R-CNN (training step, ONNX parity)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.datasets import default_data_root

DATA = default_data_root()
needs_new_data = pytest.mark.skipif(
    not (DATA / "lgg-flair").is_dir(), reason=f"lgg-flair/head-ct/sartaj-boxes not found under {DATA} (set BRAINSCAN_DATA)"
)

_TORCH_FEATURES = """
import sys, numpy as np, torch
from export.efficientnet_lite import torch_encoder
x = np.load(sys.argv[1])
with torch.no_grad():
    features = torch_encoder().eval()(torch.from_numpy(x))
np.savez(sys.argv[2], *[f.numpy() for f in features])
"""


def test_keras_port_matches_the_pytorch_encoder(tmp_path: Path) -> None:
    """Same ImageNet weights, same input: every pyramid level agrees within 1e-4 (PyTorch runs in its own
    process: TensorFlow and torch must not share one here)."""
    import keras

    from export.efficientnet_lite import FEATURE_CHANNELS, keras_encoder, port_to_keras

    x = np.random.default_rng(7).normal(0, 1, (2, 3, 96, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", _TORCH_FEATURES, str(tmp_path / "x.npy"), str(tmp_path / "t.npz")], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    inputs = keras.Input((96, 128, 3))
    model = keras.Model(inputs, keras_encoder(inputs))
    assert port_to_keras(model, with_head=False) > 0
    ours = model.predict(x.transpose(0, 2, 3, 1), verbose=0)
    with np.load(tmp_path / "t.npz") as theirs:
        for level, (mine, channels) in enumerate(zip(ours, FEATURE_CHANNELS)):
            reference = theirs[f"arr_{level}"].transpose(0, 2, 3, 1)
            assert mine.shape == reference.shape and mine.shape[-1] == channels
            assert np.abs(mine - reference).max() <= 1e-4
            assert np.abs(reference).max() > 0.1  # real activations, not an all-zero graph


def test_gray_stem_equals_the_rgb_stem_on_a_gray_image() -> None:
    """The classifier's 1-channel stem (summed RGB kernels) gives what the RGB network gives a gray copy."""
    import keras

    from export.efficientnet_lite import PIXEL_MEAN, PIXEL_STD, keras_encoder, port_to_keras
    from export.keras_models import build_unet

    unet = build_unet(64)
    rgb_in = keras.Input((64, 64, 3))
    rgb = keras.Model(rgb_in, keras_encoder(rgb_in))
    port_to_keras(rgb, with_head=False)
    gray = np.random.default_rng(1).random((1, 64, 64, 1)).astype(np.float32)
    normalized = (gray * 255.0 - PIXEL_MEAN) / PIXEL_STD
    expected = rgb.predict(np.repeat(normalized, 3, axis=-1), verbose=0)[-1]
    got = keras.Model(unet.input, unet.get_layer("b15_project_bn").output).predict(gray, verbose=0)
    assert np.abs(got - expected).max() <= 1e-4


def test_box_loss_prefers_a_mask_inside_and_aligned_with_its_box() -> None:
    from keras import ops

    from export.train_unet import box_projection_loss, inside_box_share

    box = np.zeros((1, 32, 32), np.float32)
    box[0, 8:24, 10:22] = 1.0
    inside = np.zeros_like(box)
    yy, xx = np.mgrid[:32, :32]
    inside[0] = (((yy - 15.5) / 8) ** 2 + ((xx - 15.5) / 6) ** 2 <= 1.0)  # ellipse touching all four sides
    spill = np.roll(inside, 6, axis=2)  # same shape, shifted out of the box
    small = np.zeros_like(box)
    small[0, 14:18, 14:18] = 1.0  # inside but does not span the box
    filled = box.copy()

    def loss(mask: np.ndarray) -> float:
        return float(ops.convert_to_numpy(box_projection_loss(box, np.clip(mask, 0.01, 0.99)))[0])

    assert loss(inside) < loss(spill)
    assert loss(inside) < loss(small)
    assert abs(loss(inside) - loss(filled)) < 0.05  # the projections cannot tell a tight shape from the box itself
    assert inside_box_share(inside.astype(bool), box.astype(bool))[0] == 1.0
    assert inside_box_share(spill.astype(bool), box.astype(bool))[0] < 0.8


def test_per_image_dice_weighs_a_missed_small_lesion_like_a_missed_large_one() -> None:
    """The batch Dice barely notices a missed small tumor next to a found large one; the per-image term does."""
    from keras import ops

    from export.train_unet import batch_dice_loss, per_image_dice_loss

    target = np.zeros((3, 32, 32), np.float32)
    target[0, 4:28, 4:28] = 1.0  # large tumor
    target[1, 10:13, 10:13] = 1.0  # small tumor
    is_mask = np.ones(3, np.float32)  # slice 2: a tumor-free mask target, ignored by the term
    both_found = np.clip(target, 1e-4, 0.999)
    small_missed = both_found.copy()
    small_missed[1] = 1e-4

    def loss(prob: np.ndarray) -> float:
        return float(ops.convert_to_numpy(per_image_dice_loss(target, prob, is_mask)))

    def batch_dice(prob: np.ndarray) -> float:
        return float(ops.convert_to_numpy(batch_dice_loss(target, prob, is_mask)))

    assert loss(both_found) < 0.05
    assert loss(small_missed) - loss(both_found) > 0.3  # half the tumor slices lost
    assert batch_dice(small_missed) - batch_dice(both_found) < 0.02  # 9 of 585 tumor pixels lost
    no_tumor = np.zeros_like(target)
    assert float(ops.convert_to_numpy(per_image_dice_loss(no_tumor, np.full_like(target, 0.5), is_mask))) == 0.0


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece() -> None:
    from export.calibration import calibration_errors, fit_temperature, softmax_with_temperature

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (4000, 4))
    true_p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true_p])
    overconfident = softmax_with_temperature(true_p, 0.5)  # logits doubled
    temperature = fit_temperature(overconfident, np.eye(4)[labels])
    assert 1.8 < temperature < 2.2
    before = calibration_errors(overconfident, labels, no_tumor=2)
    after = calibration_errors(softmax_with_temperature(overconfident, temperature), labels, no_tumor=2)
    assert after["ece_top_label"] < before["ece_top_label"] and after["ece_top_label"] < 0.03


def test_decision_operating_point_is_chosen_from_the_evidence() -> None:
    """A classifier that fires on healthy slices of one source, where only the U-Net tells them apart."""
    from export.calibrate_decision import Evidence, choose

    rng = np.random.default_rng(2)
    n = 400
    tumor = rng.random(n) < 0.5
    sources = np.where(np.arange(n) % 2 == 0, "a", "b")
    p = np.where(tumor, rng.uniform(0.6, 1.0, n), np.where(sources == "a", rng.uniform(0.5, 0.85, n), rng.uniform(0.0, 0.3, n)))
    mask_fraction = np.where(tumor, rng.uniform(0.01, 0.05, n), 0.0)
    evidence = Evidence(sources=sources, tumor=tumor, p_tumor=p, in_scope=rng.uniform(0.9, 1.0, n),
                        mask_fraction=mask_fraction, max_instance_score=np.zeros(n))
    report = choose(evidence, detection_threshold=0.5)
    params = {k: float(v) for k, v in report["parameters"].items()}
    assert params["decision_strong"] >= 0.85  # the classifier alone is not trusted where it overlaps
    assert params["decision_gate"] <= 0.6 and params["decision_min_mask_fraction"] <= 0.01
    combined = report["validation"]["combined_rule"]
    assert combined["mean_balanced_accuracy"] > report["validation"]["classifier_alone"]["mean_balanced_accuracy"]
    assert report["validation"]["scope_flagged_share"] <= 0.005


def test_the_unet_region_minimum_drops_healthy_specks_and_keeps_small_tumors() -> None:
    """Hand-built validation masks: tumor-free slices with specks of 6-12 px, tumor slices with a
    20-px lesion next to a 4-px speck. The size chosen drops every speck and keeps every lesion."""
    from export.unet_regions import best_size, score_sizes

    probabilities, truth = [], []
    for i in range(12):
        p = np.zeros((48, 48), np.float32)
        t = np.zeros((48, 48), bool)
        if i % 2:  # tumor slice
            t[10:14, 10:15] = True
            p[10:14, 10:15] = 0.9
            p[40:42, 40:42] = 0.8
        else:
            side = 2 + i % 3  # specks of 2×3, 3×3 and 4×3 px
            p[30:30 + side, 5:8] = 0.7
        probabilities.append(p)
        truth.append(t)
    sources = ["lgg-flair"] * 12
    scores = score_sizes(np.stack(probabilities), np.stack(truth), sources, np.zeros(12, bool), threshold=0.5,
                         candidates=(0, 5, 13, 21, 40))
    assert scores[0]["parts"]["lgg-flair_empty"] == 0.0
    chosen = best_size(scores)
    assert chosen == 13  # 5 keeps the 9- and 12-px specks; 21 drops the 20-px lesion too
    assert scores[13]["parts"] == {"lgg-flair_dice": 1.0, "lgg-flair_empty": 1.0}
    assert best_size({0: {"score": 0.9}, 10: {"score": 0.9}, 20: {"score": 0.8}}) == 0  # a tie keeps more


@needs_new_data
def test_new_source_loaders_on_real_files() -> None:
    from export.datasets import LGG_MIN_TUMOR_PX, BoxedSlice, load_head_ct, load_lgg_split, load_sartaj_boxes
    from gateway.preprocessing import load_image_file

    train, val = load_lgg_split(DATA, "train"), load_lgg_split(DATA, "val")
    assert len(train) == 2346 and len(val) == 490
    assert not {s.patient for s in train} & {s.patient for s in val}  # split by patient
    tumor = next(s for s in val if s.tumor_px >= LGG_MIN_TUMOR_PX)
    gray = load_image_file(str(tumor.path)).pixels
    mask = tumor.union_mask(*gray.shape)
    assert int(mask.sum()) == pytest.approx(tumor.tumor_px, rel=0.02)
    assert len(tumor.instance_masks(*gray.shape)) >= 1
    assert not next(s for s in val if s.tumor_px == 0).union_mask(*gray.shape).any()
    ct = load_head_ct(DATA)
    assert len(ct) == 139
    boxes = load_sartaj_boxes(DATA)
    assert len(boxes) == 2263 and all(p.is_file() for p in list(boxes)[:20])
    path, box = next(iter(boxes.items()))
    image = load_image_file(str(path)).pixels
    filled = BoxedSlice(path, box).union_mask(*image.shape)
    assert filled.any() and filled.sum() == pytest.approx((box[2] - box[0]) * (box[3] - box[1]), rel=0.1)


@needs_new_data
def test_head_ct_halves_are_disjoint_and_stable() -> None:
    from export.train_classifier import split_head_ct

    first, held_out = split_head_ct(DATA, seed=20240611)
    assert not set(first) & set(held_out) and len(first) + len(held_out) == 139
    assert split_head_ct(DATA, seed=20240611)[1] == held_out
