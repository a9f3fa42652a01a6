"""Mask R-CNN: targets from real annotations, one training step, ONNX export parity, config validity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from export.datasets import default_data_root, load_via_split
from export.maskrcnn_data import Augment, DetectionDataset, InstanceSet, collate, prepare_instances, to_target
from export.maskrcnn_metrics import Prediction, coco_metrics, false_positive_rate
from export.maskrcnn_model import MaskRCNNExportWrapper, build_maskrcnn, tiny_config

DATA = default_data_root()
needs_data = pytest.mark.skipif(
    not (DATA / "br35h-polygons").is_dir(), reason=f"datasets not found at {DATA} (set BRAINSCAN_DATA)"
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- targets -------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("shape", ["polygon", "ellipse"])
def test_prepare_instances_on_real_annotations(shape: str) -> None:
    item = next(s for s in load_via_split(DATA, "br35h-polygons", "train") if s.regions and s.regions[0].shape == shape)
    image, masks = prepare_instances(item, 128)
    assert image.shape == (128, 128) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert masks.dtype == np.uint8 and masks.shape[1:] == (128, 128)
    assert 1 <= len(masks) <= len(item.regions)
    target = to_target(masks)
    assert target["boxes"].shape == (len(masks), 4)
    assert torch.all(target["labels"] == 1)
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # Tight box around the mask, in torchvision's one-past-the-end convention.
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@needs_data
def test_multi_instance_slices_keep_one_instance_per_region() -> None:
    slices = [s for s in load_via_split(DATA, "br35h-polygons", "train") if len(s.regions) >= 2]
    assert slices, "br35h train has slices with 2+ tumors"
    _, masks = prepare_instances(slices[0], 160)
    assert len(masks) == len(slices[0].regions)


def test_targets_for_negative_slices_are_empty() -> None:
    target = to_target(np.zeros((0, 32, 32), np.uint8))
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 32)


def test_augment_keeps_range_binary_masks_and_drops_vanished_instances() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 64), dtype=np.float32)
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 20:40, 20:40] = 1
    masks[1, 0, 0] = 1  # one pixel in the corner: any rotation/shift wipes it
    for _ in range(5):
        out_image, out_masks = Augment(rotation_deg=20, shift=0.1)(image, masks, rng)
        assert out_image.dtype == np.float32 and 0.0 <= out_image.min() and out_image.max() <= 1.0
        assert set(np.unique(out_masks)) <= {0, 1}
        assert len(to_target(out_masks)["boxes"]) == 1


# --- model and training ---------------------------------------------------------


def _synthetic_set(n: int, size: int) -> InstanceSet:
    images = np.zeros((n, size, size), np.float32)
    masks = []
    for i in range(n):
        stack = np.zeros((i % 2, size, size), np.uint8)
        if len(stack):
            stack[0, 16:40, 20:44] = 1
            images[i][stack[0] == 1] = 0.9
        masks.append(stack)
    return InstanceSet([Path(f"synthetic-{i}") for i in range(n)], images, masks)


def test_one_training_step_gives_finite_losses_on_positive_and_negative_slices() -> None:
    torch.manual_seed(0)
    model = build_maskrcnn(tiny_config(64)).train()
    loader = torch.utils.data.DataLoader(DetectionDataset(_synthetic_set(4, 64), Augment()), batch_size=4, collate_fn=collate)
    images, targets = next(iter(loader))
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


@needs_data
def test_training_command_one_iteration(tmp_path: Path) -> None:
    from export import train_maskrcnn

    args = train_maskrcnn.get_args_parser().parse_args(
        ["--data", str(DATA), "--out", str(tmp_path), "--limit", "10", "--max-steps", "1", "--batch-size", "2",
         "--size", "96", "--no-progress", "--device", "cpu", "--negative-repeat", "3",
         "--hard-negative-repeat", "2"]
    )
    assert train_maskrcnn.main(args) == 0
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 1 and state["config"]["input_size"] == 96 and state["args"]["limit"] == 10
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,step,lr") and len(log) == 2
    row = dict(zip(log[0].split(","), log[1].split(",")))
    assert row["held_out_fp_rate"] != ""  # negatives held out by default
    assert row["hard_negatives"] != "" and 0.0 <= float(row["train_negative_fp_rate"]) <= 1.0  # mined before the epoch


def test_epoch_indices_repeat_only_negatives() -> None:
    from export.maskrcnn_data import InstanceSet
    from export.train_maskrcnn import epoch_indices

    masks = [np.ones((1, 4, 4), np.uint8), np.zeros((0, 4, 4), np.uint8), np.ones((2, 4, 4), np.uint8)]
    data = InstanceSet(paths=[Path(f"s{i}.jpg") for i in range(3)], images=np.zeros((3, 4, 4), np.float32), masks=masks)
    assert sorted(epoch_indices(data, 3)) == [0, 1, 1, 1, 2]
    assert sorted(epoch_indices(data, 2, hard={1}, hard_repeat=3)) == [0, 1, 1, 1, 1, 1, 2]
    assert sorted(epoch_indices(data, 2, hard={0}, hard_repeat=3)) == [0, 1, 1, 2]  # a tumor slice is never "hard"


def test_a_repeated_slice_gets_a_fresh_augmentation() -> None:
    from export.maskrcnn_data import Augment, DetectionDataset, InstanceSet

    rng = np.random.default_rng(0)
    data = InstanceSet(paths=[Path("a.jpg")], images=rng.random((1, 64, 64)).astype(np.float32),
                       masks=[np.zeros((0, 64, 64), np.uint8)])
    dataset = DetectionDataset(data, Augment(), seed=1, order=[0, 0])
    first, second = dataset[0][0], dataset[1][0]
    assert len(dataset) == 2 and not torch.equal(first, second)


def test_export_wrapper_contract_in_pytorch() -> None:
    model = build_maskrcnn(tiny_config(64)).eval()
    boxes, scores, masks = MaskRCNNExportWrapper(model)(torch.rand(1, 64, 64))
    assert boxes.shape[1:] == (4,) and masks.shape[1:] == (1, 64, 64) and len(scores) <= 10


# --- metrics ----------------------------------------------------------------------


def test_coco_metrics_perfect_and_empty_predictions() -> None:
    gt = np.zeros((1, 32, 32), bool)
    gt[0, 8:20, 10:24] = True
    perfect = Prediction(np.array([[10, 8, 24, 20]], np.float32), np.array([0.9], np.float32), gt.astype(np.float32))
    empty = Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 32, 32), np.float32))
    assert coco_metrics([gt], [perfect])["mask_ap50"] == pytest.approx(1.0)
    assert coco_metrics([gt], [perfect])["box_ap"] == pytest.approx(1.0)
    assert coco_metrics([gt], [empty])["box_ap50"] == 0.0
    assert false_positive_rate([perfect, empty], 0.5) == 0.5


def test_box_ap_interval_spans_what_the_patients_allow() -> None:
    """Eight patients of three slices: five found on every slice, three missed on every slice. AP50 is
    0.625; the interval over patients is wide, and a model that finds everything has [1, 1]."""
    from export.maskrcnn_metrics import box_ap50_interval

    gt = np.zeros((1, 32, 32), bool)
    gt[0, 8:20, 10:24] = True
    hit = Prediction(np.array([[10, 8, 24, 20]], np.float32), np.array([0.9], np.float32), gt.astype(np.float32))
    miss = Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 32, 32), np.float32))
    patients = [str(i // 3) for i in range(24)]
    predictions = [hit if i // 3 < 5 else miss for i in range(24)]
    assert coco_metrics([gt] * 24, predictions)["box_ap50"] == pytest.approx(0.625, abs=0.01)
    low, high = box_ap50_interval([gt] * 24, predictions, patients, resamples=100)
    assert low < 0.45 and high > 0.8
    assert box_ap50_interval([gt] * 24, [hit] * 24, patients, resamples=20) == [1.0, 1.0]
    assert box_ap50_interval([np.zeros((0, 32, 32), bool)] * 2, [miss] * 2, ["a", "b"]) is None


# --- export -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_repositories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from export.export_maskrcnn import write_tiny

    torch.set_num_threads(1)
    empty, busy = tmp_path_factory.mktemp("tiny-empty"), tmp_path_factory.mktemp("tiny-busy")
    write_tiny(empty)
    write_tiny(busy, detections=True)
    return {"empty": empty, "busy": busy}


@pytest.mark.parametrize("kind, rows", [("empty", 0), ("busy", 10)])
def test_tiny_export_runs_in_onnxruntime_with_dynamic_size(tiny_repositories: dict[str, Path], kind: str, rows: int) -> None:
    from export.maskrcnn_onnx import check_io_names, ort_session

    path = tiny_repositories[kind] / "maskrcnn" / "1" / "model.onnx"
    assert path.stat().st_size < 5 * 2**20
    session = ort_session(path, threads=1)
    check_io_names(session)
    for shape in ((1, 64, 64), (1, 72, 96)):
        boxes, scores, masks = session.run(None, {"image": np.random.default_rng(1).random(shape, dtype=np.float32)})
        assert boxes.shape == (rows, 4) and scores.shape == (rows,) and masks.shape == (rows, 1, *shape[1:])
        assert masks.dtype == np.float32


def test_tiny_config_is_a_valid_maskrcnn_contract(tiny_repositories: dict[str, Path]) -> None:
    from gateway.contract import load_model_spec, validate_role

    spec = load_model_spec(tiny_repositories["empty"] / "maskrcnn")
    validate_role(spec, "maskrcnn")
    assert spec.max_batch_size == 0 and spec.input_size == 64
    assert spec.input("image").dims == (1, -1, -1)
    assert spec.output("masks").dims == (-1, 1, -1, -1)
    assert spec.onnx_path.is_file()


def test_parity_check_catches_a_graph_that_disagrees(tiny_repositories: dict[str, Path]) -> None:
    from export.maskrcnn_onnx import ParityError, check_parity, ort_session

    torch.manual_seed(0)
    model = build_maskrcnn(tiny_config()).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] += 12.0
        model.roi_heads.box_predictor.bbox_pred.bias.add_(0.5)  # shifts every box: not what was exported
    session = ort_session(tiny_repositories["busy"] / "maskrcnn" / "1" / "model.onnx", threads=1)
    image = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    with pytest.raises(ParityError):
        check_parity(model, session, [image], threshold=0.5, max_detections=10, blank_size=64)


def test_exported_repository_config_is_valid_if_present() -> None:
    from gateway.contract import load_model_spec, validate_role

    model_dir = REPO_ROOT / "model_repository" / "maskrcnn"
    if not (model_dir / "config.pbtxt").is_file():
        pytest.skip("no exported maskrcnn in model_repository (run `python -m export export maskrcnn`)")
    spec = load_model_spec(model_dir)
    validate_role(spec, "maskrcnn")
    assert spec.onnx_path.is_file() and spec.onnx_path.stat().st_size <= 40 * 2**20


@needs_data
@pytest.mark.parametrize("kind", ["empty", "busy"])
def test_error_gallery_holds_exactly_the_misses_and_false_positives(
    tiny_repositories: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    import csv
    import json

    from export.evaluate_maskrcnn import get_args_parser, main

    errors, report = tmp_path / "errors", tmp_path / "report.json"
    args = get_args_parser().parse_args(
        ["--data", str(DATA), "--onnx", str(tiny_repositories[kind] / "maskrcnn"), "--threads", "1",
         "--limit", "5", "--out", str(report), "--errors", str(errors)]
    )
    assert main(args) == 0
    results = json.loads(report.read_text())["results"]
    with (errors / "errors.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected = {
        f"maskrcnn-missed-{key.replace('/', '-')}": round(results[key]["full"]["images"] * (1 - results[key]["full"]["detected_at_threshold"]))
        for key in ("br35h-polygons/val", "ruslan-kl-polygons/test")
    }
    expected["maskrcnn-detection-on-Testing-no_tumor"] = round(results["no_tumor"]["full"]["images"] * results["no_tumor"]["full"]["fp_rate"])
    expected = {group: count for group, count in expected.items() if count}
    assert expected, "each tiny model gets one side wrong: it never or always detects"
    assert {group: sum(row["group"] == group for row in rows) for group in expected} == expected
    assert len(rows) == sum(expected.values())
    assert all((DATA / row["path"]).is_file() for row in rows)
    assert all((errors / f"{group}.png").is_file() for group in expected)


@needs_data
def test_a_limited_run_does_not_replace_the_evaluation_the_card_reads(tiny_repositories: dict[str, Path], capsys) -> None:
    from export.evaluate_maskrcnn import DEFAULT_OUT, get_args_parser, main

    before = DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None
    args = get_args_parser().parse_args(
        ["--data", str(DATA), "--onnx", str(tiny_repositories["empty"] / "maskrcnn"), "--threads", "1", "--limit", "2"]
    )
    assert main(args) == 0
    assert '"results"' in capsys.readouterr().out
    assert (DEFAULT_OUT.stat().st_mtime_ns if DEFAULT_OUT.exists() else None) == before


def test_evaluate_maskrcnn_reports_a_missing_model_folder(tmp_path: Path, capsys) -> None:
    from export.evaluate_maskrcnn import get_args_parser, main

    args = get_args_parser().parse_args(["--data", str(tmp_path), "--onnx", str(tmp_path / "nope")])
    assert main(args) == 2
    assert "nope" in capsys.readouterr().err


# --- the ImageNet Lite0 backbone ---------------------------------------------------


def test_lite0_backbone_trains_on_mask_and_box_only_batches() -> None:
    """A mask batch trains every head; a box-only batch (sartaj-boxes) leaves the mask branch out."""
    from export.maskrcnn_model import lite0_config
    from export.train_maskrcnn import box_batch_losses

    torch.manual_seed(0)
    model = build_maskrcnn(lite0_config(64)).train()
    data = _synthetic_set(2, 64)
    images = [torch.from_numpy(im)[None] for im in data.images]
    with_masks = [to_target(m) for m in data.masks]
    losses = model(images, with_masks)
    assert "loss_mask" in losses and torch.isfinite(sum(losses.values()))
    boxes_only = [to_target(m, box_only=True) for m in data.masks]
    assert all("masks" not in t for t in boxes_only)
    losses = box_batch_losses(model, images, boxes_only)
    assert "loss_mask" not in losses and torch.isfinite(sum(losses.values()))
    assert model.roi_heads.has_mask()  # switched back on after the batch
    frozen = [p for p in model.backbone.body._conv_stem.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_lite0_export_parity_on_slices_with_zero_detections(tmp_path: Path) -> None:
    """The Lite0 graph through the real export path, on slices where nothing passes the score floor
    (the empty-batch path through the mask head, which torchvision exports tend to break)."""
    from export.export_maskrcnn import export_to_repository
    from export.maskrcnn_model import lite0_config
    from export.maskrcnn_onnx import ort_session

    torch.manual_seed(0)
    config = lite0_config(64)
    model = build_maskrcnn(config).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] -= 12.0
    images = [np.random.default_rng(5).random((64, 64), dtype=np.float32), np.full((64, 64), 0.3, np.float32)]
    facts = export_to_repository(model, config, tmp_path, images)
    assert facts["onnx_mb"] <= 40 and facts["parity"]["slices"] == 2
    session = ort_session(tmp_path / "maskrcnn" / "1" / "model.onnx", threads=1)
    for image in images:
        boxes, scores, masks = session.run(None, {"image": image[None]})
        assert boxes.shape == (0, 4) and scores.shape == (0,) and masks.shape == (0, 1, 64, 64)


def test_weights_recovered_from_an_exported_onnx_reproduce_the_network(tmp_path: Path) -> None:
    """`--init model.onnx`: every norm folded by the export is recovered, so the network computes the same."""
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    from export.maskrcnn_from_onnx import state_dict_from_onnx
    from export.maskrcnn_model import lite0_config
    from export.maskrcnn_onnx import export_onnx

    torch.manual_seed(0)
    config = lite0_config(96)
    original = build_maskrcnn(config, pretrained=False).eval()
    with torch.no_grad():  # non-trivial norms: the defaults (scale 1, shift 0) would hide a lost layer
        for module in original.modules():
            if isinstance(module, (FrozenBatchNorm2d, nn.GroupNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, FrozenBatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "model.onnx"
    image = torch.rand(1, 1, 96, 96)
    export_onnx(original, path, image[0])
    recovered = build_maskrcnn(config, pretrained=False).eval()
    recovered.load_state_dict(state_dict_from_onnx(recovered, path))

    norms = {n for n, m in original.named_modules() if isinstance(m, (FrozenBatchNorm2d, nn.GroupNorm))}
    for key, value in recovered.state_dict().items():
        if key.rsplit(".", 1)[0] not in norms:
            assert torch.equal(value, original.state_dict()[key]), key
    with torch.no_grad():
        for a, b in zip(original.backbone(image).values(), recovered.backbone(image).values()):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        pooled = torch.randn(3, config.fpn_channels, 14, 14)
        torch.testing.assert_close(original.roi_heads.mask_head(pooled), recovered.roi_heads.mask_head(pooled),
                                   atol=1e-4, rtol=1e-4)
