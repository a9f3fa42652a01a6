"""`python -m export evaluate classifier|unet`: metrics from the committed ONNX file.

Runs `model_repository/<model>/1/model.onnx` in ONNX Runtime on tensors made
by the gateway's own preprocessing (`load_image_file` → `prepare(S)`, S read
from config.pbtxt), on every evaluation split in full and on its
duplicate-free subset (`export/eval_subsets.json`), and prints JSON. The
model card embeds exactly this JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from export.datasets import CLASS_LABELS, default_data_root, load_classification_split, load_via_split, relative_to_root
from export.error_gallery import ErrorCase, write_gallery
from export.intervals import evidence_groups, mean_interval
from gateway.config import GatewayConfig
from gateway.pipeline import unet_min_component_px
from gateway.postprocessing import drop_small_components
from gateway.preprocessing import PreparedImage, crop_and_resize, load_image_file, mask_to_original, prepare

REPO_ROOT = Path(__file__).resolve().parents[1]
MASK_THRESHOLD = 0.5
CLASSIFIER_SPLIT = "sartaj-classification/Testing"
HEAD_CT_SPLIT = "head-ct/held-out"  # the half of head-ct the trainings never see (by near-duplicate group)
SARTAJ_BOXES_SPLIT = "sartaj-boxes/validation"  # the U-Net training's held-out part, by near-duplicate group
SPLIT_SEED = 20240611  # the trainings' default seed, which fixes the head-ct halves
SYNTHETIC_SPLIT, SYNTHETIC_FRAMES, SYNTHETIC_SEED = "synthetic non-MRI frames", 400, 7  # no training uses seed 7
SEGMENTATION_SPLITS = ("br35h-polygons/val", "ruslan-kl-polygons/test")
TARGETS = {
    "classifier": {
        "Testing full accuracy >= 0.85": ("sartaj-classification/Testing", "full", "accuracy", 0.85),
        "Testing full glioma recall >= 0.60": ("sartaj-classification/Testing", "full", "recall.glioma", 0.60),
        "Testing duplicate-free accuracy >= 0.70": ("sartaj-classification/Testing", "duplicate_free", "accuracy", 0.70),
        "Testing sensitivity >= 0.95": ("sartaj-classification/Testing", "full", "sensitivity", 0.95),
        "Testing specificity >= 0.95": ("sartaj-classification/Testing", "full", "specificity", 0.95),
        "lgg-flair/val sensitivity >= 0.95": ("lgg-flair/val", "full", "sensitivity", 0.95),
        "lgg-flair/val specificity >= 0.95": ("lgg-flair/val", "full", "specificity", 0.95),
        "head-ct held-out specificity >= 0.95": ("head-ct/held-out", "full", "specificity", 0.95),
        "br35h val tumor slices found >= 0.98": ("br35h-polygons/val", "full", "sensitivity", 0.98),
    },
    "unet": {
        "br35h val full mean Dice >= 0.80": ("br35h-polygons/val", "full", "dice", 0.80),
        "br35h val duplicate-free mean Dice >= 0.80": ("br35h-polygons/val", "duplicate_free", "dice", 0.80),
        "Testing no_tumor empty-mask share >= 0.95": ("sartaj-classification/Testing/no_tumor", "full", "empty_mask_rate", 0.95),
        "lgg-flair/val tumor slices mean Dice >= 0.75": ("lgg-flair/val", "full", "dice", 0.75),
        "lgg-flair/val tumor-free empty-mask share >= 0.95": ("lgg-flair/val", "full", "empty_mask_rate", 0.95),
        "head-ct held-out empty-mask share >= 0.95": ("head-ct/held-out", "full", "empty_mask_rate", 0.95),
        "sartaj-boxes validation mask >= 50% inside the box >= 0.85": ("sartaj-boxes/validation", "full", "inside_box_half_rate", 0.85),
    },
}


class OnnxModel:
    """An ONNX Runtime session plus the contract read from config.pbtxt."""

    def __init__(self, repository: Path, model: str, *, threads: int = 1) -> None:
        import onnxruntime as ort

        from gateway.contract import load_model_spec

        self.spec = load_model_spec(Path(repository) / model)
        self.size = self.spec.input_size
        self.output_name = self.spec.outputs[0].name
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.spec.onnx_path), options, providers=["CPUExecutionProvider"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {"image": batch.astype(np.float32)})[0]

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.spec.outputs]
        return dict(zip(names, self.session.run(names, {"image": batch.astype(np.float32)})))

    def predict(self, tensors: Iterable[np.ndarray], batch_size: int) -> np.ndarray:
        return self.predict_all(tensors, batch_size)[self.output_name]

    def predict_all(self, tensors: Iterable[np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        """Every output over `tensors`, run `batch_size` at a time."""
        outputs: list[dict[str, np.ndarray]] = []
        pending: list[np.ndarray] = []
        for tensor in tensors:
            pending.append(tensor)
            if len(pending) == batch_size:
                outputs.append(self.run_all(np.stack(pending)))
                pending = []
        if pending:
            outputs.append(self.run_all(np.stack(pending)))
        return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}

    def parameter(self, key: str, default: float) -> float:
        return float(self.spec.parameters.get(key, default))


def classification_metrics(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, object]:
    """Metrics of the argmax class, and of tumor vs no_tumor at p(tumor) = 1 - p(no_tumor) >= 0.5."""
    no_tumor = CLASS_LABELS.index("no_tumor")
    return label_metrics(truth, probabilities.argmax(axis=1), (1.0 - probabilities[:, no_tumor]) >= 0.5)


def label_metrics(truth: np.ndarray, pred: np.ndarray, tumor_pred: np.ndarray) -> dict[str, object]:
    """Accuracy, per-class recall and confusion of predicted class indices (CLASS_LABELS order),
    plus the accuracy of the tumor vs no_tumor decision `tumor_pred`."""
    confusion = np.zeros((len(CLASS_LABELS), len(CLASS_LABELS)), dtype=int)
    np.add.at(confusion, (truth, pred), 1)
    recall = {
        label: round(float(confusion[c, c] / confusion[c].sum()), 4) if confusion[c].sum() else None
        for c, label in enumerate(CLASS_LABELS)
    }
    present = [r for r in recall.values() if r is not None]
    tumor_true = truth != CLASS_LABELS.index("no_tumor")
    return {
        "n": int(len(truth)),
        "accuracy": round(float((pred == truth).mean()), 4),
        "balanced_accuracy": round(float(np.mean(present)), 4),
        "recall": recall,
        "tumor_vs_no_tumor_accuracy": round(float((tumor_pred == tumor_true).mean()), 4),
        "confusion_matrix": {"rows_true_cols_pred": list(CLASS_LABELS), "counts": confusion.tolist()},
    }


def evaluate_classifier(
    model: OnnxModel, data_root: Path, duplicate_free: set[str], batch_size: int, errors: list[ErrorCase] | None = None
) -> dict[str, object]:
    """Sartaj Testing (4 classes) and, per source, tumor vs no tumor, calibration and scope flags.

    The tumor decision here is the classifier's alone (p(tumor) >= `decision_alone` and in scope);
    `python -m export evaluate service` scores the served decision with the U-Net and Mask R-CNN evidence.
    With `errors`, also collects every misclassified Testing slice.
    """
    items = load_classification_split(data_root, "Testing")
    outputs = _classify(model, [p for p, _ in items], batch_size, "classifier Testing")
    probabilities = outputs["probabilities"]
    truth = np.array([CLASS_LABELS.index(label) for _, label in items])
    keep = np.array([relative_to_root(p, data_root) in duplicate_free for p, _ in items])
    if errors is not None:
        for index in np.flatnonzero(probabilities.argmax(axis=1) != truth):
            path, label = items[index]
            predicted = int(probabilities[index].argmax())
            errors.append(
                ErrorCase(
                    group=f"classifier-{label}-misclassified",
                    path=path,
                    duplicate_free=bool(keep[index]),
                    truth=label,
                    prediction=CLASS_LABELS[predicted],
                    score=float(probabilities[index, predicted]),
                    image=_tensor(path, model.size)[..., 0],
                )
            )
    results: dict[str, object] = {
        CLASSIFIER_SPLIT: {
            "full": {**classification_metrics(truth, probabilities), **_tumor_report(model, outputs, truth)},
            "duplicate_free": {**classification_metrics(truth[keep], probabilities[keep]),
                               **_tumor_report(model, _rows(outputs, keep), truth[keep])},
        }
    }
    for key, (paths, split_truth) in _tumor_sources(data_root).items():
        split_outputs = _classify(model, paths, batch_size, f"classifier {key}")
        results[key] = {"full": _tumor_report(model, split_outputs, split_truth)}
    results[SYNTHETIC_SPLIT] = {"full": _synthetic_report(model, batch_size)}
    return results


def _synthetic_report(model: OnnxModel, batch_size: int) -> dict[str, object]:
    """The scope check on made-up non-MRI frames (every kind the training draws, from another seed than any
    training's): the share judged out of scope must be high. Same generator as training, so optimistic for
    real non-brain images; the head-ct half is the real test."""
    from export.train_classifier import synthetic_out_of_scope

    frames = synthetic_out_of_scope(SYNTHETIC_FRAMES, model.size, seed=SYNTHETIC_SEED)
    outputs = model.predict_all(iter(frames), batch_size)
    return _tumor_report(model, outputs, np.full(len(frames), NO_TUMOR))


GLIOMA, NO_TUMOR, UNKNOWN_TUMOR = CLASS_LABELS.index("glioma"), CLASS_LABELS.index("no_tumor"), -1


def _tumor_sources(data_root: Path) -> dict[str, tuple[list[Path], np.ndarray]]:
    """Evaluation splits beyond Sartaj Testing: paths and truth (class index, or -1 = tumor of unknown type)."""
    from export.datasets import LGG_MIN_TUMOR_PX, load_lgg_split
    from export.train_classifier import split_head_ct

    lgg = [s for s in load_lgg_split(data_root, "val") if s.tumor_px == 0 or s.tumor_px >= LGG_MIN_TUMOR_PX]
    head_ct = split_head_ct(data_root, seed=SPLIT_SEED)[1]
    br35h = [s.path for s in load_via_split(data_root, "br35h-polygons", "val")]
    return {
        "lgg-flair/val": ([s.path for s in lgg], np.array([GLIOMA if s.tumor_px else NO_TUMOR for s in lgg])),
        HEAD_CT_SPLIT: (head_ct, np.full(len(head_ct), NO_TUMOR)),
        "br35h-polygons/val": (br35h, np.full(len(br35h), UNKNOWN_TUMOR)),
    }


def _classify(model: OnnxModel, paths: Sequence[Path], batch_size: int, desc: str) -> dict[str, np.ndarray]:
    tensors = (_tensor(p, model.size) for p in paths)
    return model.predict_all(tqdm(tensors, total=len(paths), desc=desc, unit="img"), batch_size)


def _rows(outputs: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[keep] for name, values in outputs.items()}


def _tumor_report(model: OnnxModel, outputs: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, object]:
    """Sensitivity / specificity of the classifier's own decision, glioma share on tumor slices, ECE, scope flags."""
    from export.calibration import calibration_errors

    probabilities = outputs["probabilities"]
    in_scope = outputs.get("in_scope", np.ones((len(truth), 1), np.float32))[:, 0]
    judged = in_scope >= model.parameter("scope_threshold", 0.5)
    tumor = judged & ((1.0 - probabilities[:, NO_TUMOR]) >= model.parameter("decision_alone", 0.5))
    positive = truth != NO_TUMOR

    def share(values: np.ndarray) -> float | None:
        return round(float(values.mean()), 4) if len(values) else None

    report: dict[str, object] = {
        "n": int(len(truth)),
        "tumor_slices": int(positive.sum()),
        "sensitivity": share(tumor[positive]),
        "specificity": share(~tumor[~positive]),
        "scope_flagged": share(~judged),
        **calibration_errors(probabilities, truth, NO_TUMOR),
    }
    if (truth == GLIOMA).any() and set(truth[positive].tolist()) == {GLIOMA}:  # every tumor a glioma (LGG)
        report["glioma_share_of_tumor_slices"] = share(probabilities[truth == GLIOMA].argmax(axis=1) == GLIOMA)
    return report


def dice_and_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two bool masks of one shape; both 1.0 when both masks are empty."""
    inter, union, total = int((pred & truth).sum()), int((pred | truth).sum()), int(pred.sum()) + int(truth.sum())
    return (1.0 if total == 0 else 2.0 * inter / total), (1.0 if union == 0 else inter / union)


def segmentation_metrics(dice: Sequence[float], iou: Sequence[float], groups: Sequence[str] | None = None) -> dict[str, object]:
    """Mean Dice/IoU per slice; the Dice's 95% interval resamples `groups` (patients, near-duplicate groups)."""
    dice_arr, iou_arr = np.asarray(dice, dtype=float), np.asarray(iou, dtype=float)
    return {
        "n": int(len(dice_arr)),
        "dice": round(float(dice_arr.mean()), 4) if len(dice_arr) else None,
        "dice_ci95": mean_interval(dice_arr, groups),
        "iou": round(float(iou_arr.mean()), 4) if len(iou_arr) else None,
        "median_dice": round(float(np.median(dice_arr)), 4) if len(dice_arr) else None,
        "share_dice_below_0.5": round(float((dice_arr < 0.5).mean()), 4) if len(dice_arr) else None,
    }


def evaluate_unet(
    model: OnnxModel,
    data_root: Path,
    duplicate_free: dict[str, set[str]],
    batch_size: int,
    errors: list[ErrorCase] | None = None,
) -> dict[str, object]:
    """Dice/IoU and the empty-mask share; with `errors`, also collects tumor slices with
    Dice < 0.5 and tumor-free slices with a mask into it."""
    results: dict[str, object] = {}
    for key in SEGMENTATION_SPLITS:
        dataset, split = key.split("/")
        slices = load_via_split(data_root, dataset, split)
        dice, iou, keep = [], [], []
        for item in tqdm(slices, desc=f"unet {key}", unit="img"):
            # Scored on the original pixel grid, where the gateway reports masks.
            output = _unet_output(model, item.path)
            prepared, prob, pred = output.prepared, output.probability, output.mask
            truth = item.union_mask(*output.shape)
            slice_dice, slice_iou = dice_and_iou(pred, truth)
            dice.append(slice_dice)
            iou.append(slice_iou)
            keep.append(relative_to_root(item.path, data_root) in duplicate_free[key])
            if errors is not None and dice[-1] < 0.5:
                grid_truth = crop_and_resize(truth.view(np.uint8), prepared.crop, model.size, interpolation=cv2.INTER_NEAREST)
                errors.append(
                    ErrorCase(
                        group=f"unet-dice-below-0.5-{dataset}-{split}",
                        path=item.path,
                        duplicate_free=keep[-1],
                        truth="tumor",
                        prediction="mask" if pred.any() else "empty",
                        score=float(dice[-1]),
                        image=prepared.tensor,
                        predicted_mask=prob >= MASK_THRESHOLD,
                        true_mask=grid_truth > 0,
                    )
                )
        keep_arr = np.array(keep)
        groups = np.array(evidence_groups([item.path for item in slices]))
        results[key] = {
            "full": segmentation_metrics(dice, iou, groups),
            "duplicate_free": segmentation_metrics(np.array(dice)[keep_arr], np.array(iou)[keep_arr], groups[keep_arr]),
        }
    negatives = [p for p, label in load_classification_split(data_root, "Testing") if label == "no_tumor"]
    empty_list = []
    for path in tqdm(negatives, desc="unet Testing/no_tumor", unit="img"):
        output = _unet_output(model, path)
        prepared, prob = output.prepared, output.probability
        # Same rule as the gateway (postprocessing.segmentation_from_unet): empty when no original pixel passes.
        empty_list.append(not output.mask.any())
        if errors is not None and not empty_list[-1]:
            errors.append(
                ErrorCase(
                    group="unet-mask-on-Testing-no_tumor",
                    path=path,
                    duplicate_free=relative_to_root(path, data_root) in duplicate_free[CLASSIFIER_SPLIT],
                    truth="no_tumor",
                    prediction="mask",
                    score=float(prob.max()),
                    image=prepared.tensor,
                    predicted_mask=prob >= MASK_THRESHOLD,
                )
            )
    empty = np.array(empty_list)
    keep_neg = np.array([relative_to_root(p, data_root) in duplicate_free[CLASSIFIER_SPLIT] for p in negatives])

    def empty_stats(mask: np.ndarray) -> dict[str, object]:
        return {"n": int(mask.sum()), "empty_mask_rate": round(float(empty[mask].mean()), 4) if mask.any() else None}

    results[f"{CLASSIFIER_SPLIT}/no_tumor"] = {
        "full": empty_stats(np.ones(len(negatives), dtype=bool)),
        "duplicate_free": empty_stats(keep_neg),
    }
    results.update(_unet_new_sources(model, data_root))
    return results


@dataclass(frozen=True)
class UnetOutput:
    prepared: PreparedImage  # what the model saw
    probability: np.ndarray  # on the model's grid, regions under the U-Net's min_component_px dropped (as served)
    mask: np.ndarray  # on the original pixel grid, as served
    shape: tuple[int, int]  # the image's (height, width)


def _unet_output(model: OnnxModel, path: Path) -> UnetOutput:
    gray = load_image_file(str(path)).pixels
    prepared = prepare(gray, model.size)
    prob = drop_small_components(model.run(prepared.tensor[None, ..., None])[0, ..., 0], threshold=MASK_THRESHOLD,
                                 min_px=unet_min_component_px(model.spec, GatewayConfig()))
    return UnetOutput(prepared, prob, mask_to_original(prob, prepared) >= MASK_THRESHOLD, gray.shape)


def _unet_new_sources(model: OnnxModel, data_root: Path) -> dict[str, object]:
    """lgg-flair/val (Dice on tumor slices, empty share on tumor-free ones), the held-out head-ct half and the
    sartaj-boxes validation part (share of slices whose mask lies at least half inside the tumor box)."""
    from export import train_unet
    from export.datasets import LGG_MIN_TUMOR_PX, load_lgg_split
    from export.train_classifier import split_head_ct
    from export.train_unet import inside_box_share

    results: dict[str, object] = {}
    dice, iou, empty, tumor_patients, free_patients = [], [], [], [], []
    volumes: dict[str, list[int]] = {}  # patient -> [intersection, predicted, true] pixels over every slice
    for item in tqdm(load_lgg_split(data_root, "val"), desc="unet lgg-flair/val", unit="img"):
        output = _unet_output(model, item.path)
        pred, shape = output.mask, output.shape
        truth = item.union_mask(*shape)
        counts = volumes.setdefault(item.patient, [0, 0, 0])
        counts[0] += int((pred & truth).sum())
        counts[1] += int(pred.sum())
        counts[2] += int(truth.sum())
        if item.tumor_px >= LGG_MIN_TUMOR_PX:
            d, i = dice_and_iou(pred, truth)
            dice.append(d)
            iou.append(i)
            tumor_patients.append(item.patient)
        elif item.tumor_px == 0:
            empty.append(not pred.any())
            free_patients.append(item.patient)
    patient_dice = [2 * inter / (p + t) if p + t else 1.0 for inter, p, t in volumes.values()]
    results["lgg-flair/val"] = {"full": {
        **segmentation_metrics(dice, iou, tumor_patients),
        "tumor_free_n": len(empty),
        "empty_mask_rate": round(float(np.mean(empty)), 4) if empty else None,
        "empty_mask_rate_ci95": mean_interval(empty, free_patients),
        "patients": len(patient_dice),
        "mean_patient_volume_dice": round(float(np.mean(patient_dice)), 4),
    }}
    head_ct = split_head_ct(data_root, seed=SPLIT_SEED)[1]
    ct_empty = [not _unet_output(model, p).mask.any() for p in tqdm(head_ct, desc=f"unet {HEAD_CT_SPLIT}", unit="img")]
    results[HEAD_CT_SPLIT] = {"full": {"n": len(ct_empty), "empty_mask_rate": round(float(np.mean(ct_empty)), 4)}}
    boxed = train_unet.sartaj_boxes_validation(data_root)
    inside, found = [], []
    for item in tqdm(boxed, desc="unet sartaj-boxes validation", unit="img"):
        output = _unet_output(model, item.path)
        pred, shape = output.mask, output.shape
        found.append(bool(pred.any()))
        inside.append(float(inside_box_share(pred[None], item.union_mask(*shape)[None])[0]))
    results[SARTAJ_BOXES_SPLIT] = {"full": {
        "n": len(boxed),
        "mask_found_rate": round(float(np.mean(found)), 4) if found else None,
        "inside_box_half_rate": round(float(np.mean(np.array(inside) >= 0.5)), 4) if inside else None,
    }}
    return results


def evaluate(
    model_name: str,
    *,
    data_root: Path,
    repository: Path,
    batch_size: int = 16,
    threads: int = 1,
    errors_dir: Path | None = None,
) -> dict[str, object]:
    """The card's metrics as JSON; with `errors_dir`, also an error gallery there (export/error_gallery.py)."""
    from export.audit import SUBSETS_FILE, load_or_build_audit

    audit = load_or_build_audit(data_root)
    duplicate_free = {key: set(paths) for key, paths in audit.duplicate_free.items()}
    model = OnnxModel(repository, model_name, threads=threads)
    errors: list[ErrorCase] | None = None if errors_dir is None else []
    if model_name == "classifier":
        splits = evaluate_classifier(model, data_root, duplicate_free[CLASSIFIER_SPLIT], batch_size, errors)
    elif model_name == "unet":
        splits = evaluate_unet(model, data_root, duplicate_free, batch_size, errors)
    else:
        raise ValueError(f"unknown model {model_name!r}; expected classifier or unet")
    if errors_dir is not None and errors is not None:
        written = write_gallery(errors, errors_dir, data_root=data_root)
        print(f"{len(errors)} errors: {', '.join(str(path) for path in written)}", file=sys.stderr)
    report: dict[str, object] = {
        "model": model_name,
        "onnx_sha256": hashlib.sha256(model.spec.onnx_path.read_bytes()).hexdigest(),
        "input_size": model.size,
        "preprocessing": "gateway.preprocessing: load_image_file -> prepare(size) (brain crop, resize, percentile normalize)",
        "duplicate_free_subsets": f"{SUBSETS_FILE.relative_to(REPO_ROOT)} (no near-duplicate in any training split)",
        "evaluated": dt.date.today().isoformat(),
        "splits": splits,
    }
    if model_name == "unet":
        report["mask_threshold"] = MASK_THRESHOLD
        report["min_component_px"] = unet_min_component_px(model.spec, GatewayConfig())
    report["targets"] = check_targets(model_name, splits)
    return report


def check_targets(model_name: str, splits: dict[str, object]) -> dict[str, object]:
    checks = {}
    for title, (split, subset, metric, minimum) in TARGETS[model_name].items():
        value: object = splits[split][subset]  # type: ignore[index]
        for part in metric.split("."):
            value = value[part]  # type: ignore[index]
        checks[title] = {"value": value, "met": value is not None and float(value) >= minimum}
    return checks


def _tensor(path: Path, size: int) -> np.ndarray:
    return prepare(load_image_file(str(path)).pixels, size).tensor[..., None]


# --- CLI -------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Recompute a model's card metrics from its committed ONNX file.")
    parser.add_argument("model", choices=("classifier", "unet"), help="which model to evaluate")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository", help="model repository holding <model>/1/model.onnx")
    parser.add_argument("--batch-size", type=int, default=16, help="ONNX Runtime batch size (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a quality target is missed")
    parser.add_argument(
        "--errors",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write an error gallery to DIR: a contact sheet per kind of error and errors.csv",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    from export.cli_checks import DATA_HINT, argument_problem, fail
    from gateway.errors import BrainscanError

    prog = f"python -m export evaluate {args.model}"
    if problem := argument_problem(data=args.data, output=args.output, errors_dir=args.errors):
        return fail(prog, problem)
    try:
        report = evaluate(
            args.model,
            data_root=args.data,
            repository=args.repository,
            batch_size=args.batch_size,
            threads=args.threads,
            errors_dir=args.errors,
        )
    except FileNotFoundError as error:
        return fail(prog, f"{error}; {DATA_HINT}")
    except BrainscanError as error:  # a missing or inconsistent model repository
        return fail(prog, str(error))
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    missed = [t for t, r in report["targets"].items() if not r["met"]]  # type: ignore[union-attr]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
