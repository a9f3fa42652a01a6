"""`python -m export evaluate service`: the evaluation splits sent through a running gateway, scored as served.

The per-model evaluations (`python -m export evaluate classifier|unet|maskrcnn`) score
each ONNX file alone. This one scores what a hospital client actually gets: each
file goes over gRPC through the Python SDK (`Client.analyze`), the classifier's
gate decides whether the U-Net and Mask R-CNN run (unless `--ungated`), and
the returned label, mask and instances are compared with the truth on the
original pixel grid:

- `sartaj-classification/Testing`: accuracy of the served label, per-class
  recall, tumor vs no_tumor accuracy of `tumor_detected`, and the decision's
  sensitivity, specificity, calibration error and scope flags (a `not_assessed`
  slice counts as "no tumor finding": as no_tumor for the label, as a negative
  decision, and in the scope-flag share);
- its `no_tumor` slices: the share on which a tumor, a mask or an instance is
  shown (false alarms as the user sees them);
- `lgg-flair/val` (a tumor slice has a mask of >= 200 px; 1-199 px slices are
  left out) and the held-out half of `head-ct/` (all negatives): sensitivity,
  specificity, calibration error, scope flags, and on LGG the glioma share of
  the tumors found;
- `br35h-polygons/val`, `ruslan-kl-polygons/test`: the share with a tumor
  detected, the Dice of the served mask (0 when none is returned), and the
  share of annotated tumors that an instance box overlaps at IoU ≥ 0.5;

each classification split on the full split and, where the audit knows it, its
duplicate-free subset, with the client-side latency of every call. The JSON
goes to stdout (and --output); one summary table per source to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import cv2
import numpy as np
from tqdm import tqdm

from export.datasets import CLASS_LABELS, AnnotatedSlice, default_data_root, load_classification_split, load_via_split
from export.evaluate_keras import (
    CLASSIFIER_SPLIT,
    HEAD_CT_SPLIT,
    SEGMENTATION_SPLITS,
    SPLIT_SEED,
    dice_and_iou,
    label_metrics,
)
from export.intervals import evidence_groups, mean_interval

if TYPE_CHECKING:
    from brainscan.client import Client
    from brainscan.results import AnalysisResult

IOU_MATCH = 0.5
LGG_SPLIT = "lgg-flair/val"
NO_TUMOR = CLASS_LABELS.index("no_tumor")
UNKNOWN_TUMOR = -1  # truth "a tumor of unknown type"
NOT_ASSESSED = "not_assessed"  # the served label of a slice out of scope (gateway.decision)
Item = TypeVar("Item")


@dataclass(frozen=True)
class Served:
    """One call's outcome: the result, or the error class the SDK raised; and its latency."""

    result: AnalysisResult | None
    error: str | None
    latency_ms: float


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x0, y0, x1, y1] boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1) of a bool mask's set pixels."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    return float(x), float(y), float(x + w), float(y + h)


def serve_all(call: Callable[[Path], AnalysisResult], paths: Sequence[Path], concurrency: int, desc: str) -> list[Served]:
    """Call the gateway on every path, `concurrency` at a time; results in input order."""
    from brainscan.errors import BrainscanError

    def one(path: Path) -> Served:
        started = time.perf_counter()
        try:
            result, error = call(path), None
        except BrainscanError as failure:
            result, error = None, type(failure).__name__
        return Served(result, error, (time.perf_counter() - started) * 1000.0)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(tqdm(pool.map(one, paths), total=len(paths), desc=desc, unit="img"))


def served_class(result: AnalysisResult) -> int:
    """The served label as a class index; not_assessed is "no tumor finding"."""
    return NO_TUMOR if result.label == NOT_ASSESSED else CLASS_LABELS.index(result.label)


Groups = Mapping[Path, str]  # slice → its patient or near-duplicate group (export.intervals.evidence_groups)


def decision_report(truth: Sequence[int], served: list[Served], paths: Sequence[Path],
                    groups: Groups | None = None) -> dict[str, object]:
    """Sensitivity and specificity of `tumor_detected` with 95% intervals by group, calibration of the served
    probabilities, scope flags.

    truth: class index per slice, or UNKNOWN_TUMOR; scores cover the answered calls. The flagged slices are
    listed (folder/file) so that a reader can see what the scope check set aside: a CT is a right flag."""
    from export.calibration import calibration_errors
    rows = [(t, s.result, p) for t, s, p in zip(truth, served, paths) if s.result is not None]
    if not rows:
        return {"n": 0}
    truth_arr = np.array([t for t, _, _ in rows])
    results = [r for _, r, _ in rows]
    detected = np.array([r.tumor_detected for r in results])
    flagged = np.array([not r.scope.assessed for r in results])
    probabilities = np.array([[r.probabilities[label] for label in CLASS_LABELS] for r in results])
    positive = truth_arr != NO_TUMOR
    group = np.array([_group(groups, p) for _, _, p in rows])

    def share(values: np.ndarray) -> float | None:
        return round(float(values.mean()), 4) if len(values) else None

    return {
        "n": len(rows),
        "tumor_slices": int(positive.sum()),
        "sensitivity": share(detected[positive]),
        "sensitivity_ci95": mean_interval(detected[positive], group[positive]),
        "specificity": share(~detected[~positive]),
        "specificity_ci95": mean_interval(~detected[~positive], group[~positive]),
        "sensitivity_in_scope": share(detected[positive & ~flagged]),
        "scope_flagged": share(flagged),
        "scope_reasons": dict(Counter(r.scope.reason for r in results if not r.scope.assessed)),
        "scope_flagged_files": [f"{p.parent.name}/{p.name}" for (_, _, p), out in zip(rows, flagged) if out],
        **{k: (None if v is None else round(float(v), 4)) for k, v in calibration_errors(probabilities, truth_arr, NO_TUMOR).items()},
    }


def _group(groups: Groups | None, path: Path) -> str:
    """The slice's group; without a mapping every slice is its own."""
    return groups.get(path, str(path)) if groups is not None else str(path)


def classification_report(items: list[tuple[Path, str]], served: list[Served], groups: Groups | None = None) -> dict[str, object]:
    answered = [(path, label, s.result) for (path, label), s in zip(items, served) if s.result is not None]
    if not answered:
        return {"n": 0}
    truth = np.array([CLASS_LABELS.index(label) for _, label, _ in answered])
    pred = np.array([served_class(result) for _, _, result in answered])
    tumor = np.array([result.tumor_detected for _, _, result in answered])
    accuracy_ci = mean_interval(pred == truth, [_group(groups, path) for path, _, _ in answered])
    return {**label_metrics(truth, pred, tumor), "accuracy_ci95": accuracy_ci,
            **truth_report([(path, CLASS_LABELS.index(label)) for path, label in items], served, groups)}


def truth_report(items: list[tuple[Path, int]], served: list[Served], groups: Groups | None = None) -> dict[str, object]:
    return decision_report([truth for _, truth in items], served, [path for path, _ in items], groups)


def lgg_report(items: list[tuple[Path, int]], served: list[Served], groups: Groups | None = None) -> dict[str, object]:
    """The decision on LGG FLAIR slices, and which type the tumors found are given (all are gliomas)."""
    report = truth_report(items, served, groups)
    found = [s.result.label for (_, truth), s in zip(items, served) if s.result is not None and truth != NO_TUMOR
             and s.result.tumor_detected]
    report["glioma_share_of_tumors_found"] = round(found.count("glioma") / len(found), 4) if found else None
    return report


def false_alarm_report(served: list[Served]) -> dict[str, object]:
    results = [s.result for s in served if s.result is not None]
    if not results:
        return {"n": 0}

    def share(flags: list[bool]) -> float:
        return round(float(np.mean(flags)), 4)

    masks = [r.mask is not None for r in results]
    instances = [len(r.instances) > 0 for r in results]
    return {
        "n": len(results),
        "tumor_detected": share([r.tumor_detected for r in results]),
        "mask_shown": share(masks),
        "instance_shown": share(instances),
        "anything_shown": share([m or i for m, i in zip(masks, instances)]),
    }


def localization_report(slices: list[AnnotatedSlice], served: list[Served], groups: Groups | None = None) -> dict[str, object]:
    dices, detected, flagged, regions, found, extra, names = [], [], [], 0, 0, 0, []
    for item, outcome in zip(slices, served):
        result = outcome.result
        if result is None:
            continue
        names.append(_group(groups, item.path))
        height, width = result.image_size
        truth_masks = item.instance_masks(height, width)
        truth = np.zeros((height, width), dtype=bool)
        for mask in truth_masks:
            truth |= mask
        served_mask = result.mask if result.mask is not None else np.zeros_like(truth)
        dices.append(dice_and_iou(served_mask, truth)[0])
        detected.append(bool(result.tumor_detected))
        flagged.append(not result.scope.assessed)
        boxes = [instance.box for instance in result.instances]
        truth_boxes = [mask_box(mask) for mask in truth_masks if mask.any()]
        regions += len(truth_boxes)
        found += sum(any(box_iou(t, b) >= IOU_MATCH for b in boxes) for t in truth_boxes)
        extra += sum(not any(box_iou(b, t) >= IOU_MATCH for t in truth_boxes) for b in boxes)
    if not dices:
        return {"n": 0}
    return {
        "n": len(dices),
        "tumor_detected": round(float(np.mean(detected)), 4),
        "tumor_detected_ci95": mean_interval(detected, names),
        "scope_flagged": round(float(np.mean(flagged)), 4),
        "mask_dice": round(float(np.mean(dices)), 4),
        "mask_dice_ci95": mean_interval(dices, names),
        "median_mask_dice": round(float(np.median(dices)), 4),
        "tumors": regions,
        "tumor_recall_box_iou_0.5": round(found / regions, 4) if regions else None,
        "unmatched_instances_per_slice": round(extra / len(dices), 4),
    }


def failures(served: list[Served]) -> dict[str, object]:
    """How many calls were sent, and how many the gateway refused or failed, by SDK error."""
    return {"sent": len(served), "failed": dict(Counter(s.error for s in served if s.error is not None))}


def full_and_duplicate_free(
    report: Callable[[list[Item], list[Served]], dict[str, object]],
    items: list[Item],
    served: list[Served],
    free: list[bool],
) -> dict[str, object]:
    """The report on the whole split and on its duplicate-free subset; scores cover answered calls only."""
    keep = [i for i, flag in enumerate(free) if flag]
    return {
        **failures(served),
        "full": report(items, served),
        "duplicate_free": report([items[i] for i in keep], [served[i] for i in keep]),
    }


def split_groups(paths: Iterable[Path]) -> dict[Path, str]:
    """Each slice of one split → its patient or near-duplicate group, for the 95% intervals."""
    listed = list(paths)
    return dict(zip(listed, evidence_groups(listed)))


def spread(items: list[Item], limit: int) -> list[Item]:
    """At most `limit` items taken evenly across the list (every class of a sorted split); 0 = all."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def lgg_items(data_root: Path) -> list[tuple[Path, int]]:
    """lgg-flair/val: tumor slices (mask >= 200 px) as glioma, tumor-free ones as no_tumor; 1-199 px left out."""
    from export.datasets import LGG_MIN_TUMOR_PX, load_lgg_split

    glioma = CLASS_LABELS.index("glioma")
    return [(s.path, glioma if s.tumor_px else NO_TUMOR) for s in load_lgg_split(data_root, "val")
            if s.tumor_px == 0 or s.tumor_px >= LGG_MIN_TUMOR_PX]


def head_ct_items(data_root: Path) -> list[tuple[Path, int]]:
    """The head-CT half the trainings never see (by near-duplicate group): all negatives."""
    from export.train_classifier import split_head_ct

    return [(path, NO_TUMOR) for path in split_head_ct(data_root, seed=SPLIT_SEED)[1]]


def summary_table(splits: dict[str, dict]) -> str:
    """One line per source: the decision as served, type accuracy where the truth has types, ECE, scope flags;
    sensitivity, specificity and accuracy with their 95% interval by patient / near-duplicate group."""

    def cell(value: object, interval: object = None) -> str:
        text = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
        if isinstance(interval, list) and value is not None:
            text += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        return text

    lines = [f"{'source':<44} {'n':>5} {'sens (95% CI)':>17} {'sens in scope':>13} {'spec (95% CI)':>17} "
             f"{'type acc (95% CI)':>17} {'ECE p(tumor)':>12} {'scope flags':>11}"]
    for key, split in splits.items():
        for part in ("full", "duplicate_free"):
            report = split.get(part)
            if not report or not report.get("n") or ("sensitivity" not in report and "mask_dice" not in report):
                continue  # nothing to score, or the no_tumor false-alarm view (its numbers are in the JSON)
            name = key if part == "full" else f"{key} (duplicate-free)"
            if "mask_dice" in report:
                sensitivity = cell(report.get("tumor_detected"), report.get("tumor_detected_ci95"))
            else:
                sensitivity = cell(report.get("sensitivity"), report.get("sensitivity_ci95"))
            if "accuracy" in report:
                type_accuracy = cell(report["accuracy"], report.get("accuracy_ci95"))
            else:
                type_accuracy = cell(report.get("glioma_share_of_tumors_found"))
            lines.append(
                f"{name:<44} {report['n']:>5} {sensitivity:>17} {cell(report.get('sensitivity_in_scope')):>13} "
                f"{cell(report.get('specificity'), report.get('specificity_ci95')):>17} "
                f"{type_accuracy:>17} {cell(report.get('ece_tumor')):>12} {cell(report.get('scope_flagged')):>11}"
            )
    lines.append("type acc: 4-class accuracy on Sartaj, glioma share of the tumors found on LGG; "
                 "not_assessed counts as no tumor finding; sens in scope: over the tumor slices judged in scope; "
                 "95% CI: bootstrap over patients (lgg-flair) or near-duplicate groups")
    return "\n".join(lines)


def evaluate_service(
    client: Client, data_root: Path, *, gate: bool, concurrency: int, limit: int = 0, timeout_s: float | None = None
) -> dict[str, object]:
    """Every evaluation split through `client`; the report as a JSON-able dict.
    Each split says how many calls it sent and which failed; scores cover the answered calls."""
    from export.audit import load_or_build_audit

    audit = load_or_build_audit(data_root)

    def call(path: Path) -> AnalysisResult:
        return client.analyze(path, gate=gate, image_id=path.name, timeout_s=timeout_s)

    splits: dict[str, object] = {}
    every_call: list[Served] = []
    items = spread(load_classification_split(data_root, "Testing"), limit)
    served = serve_all(call, [path for path, _ in items], concurrency, CLASSIFIER_SPLIT)
    every_call += served
    free = [audit.is_duplicate_free(CLASSIFIER_SPLIT, path) for path, _ in items]
    splits[CLASSIFIER_SPLIT] = full_and_duplicate_free(
        partial(classification_report, groups=split_groups(path for path, _ in items)), items, served, free)
    negatives = [i for i, (_, label) in enumerate(items) if label == "no_tumor"]
    splits[f"{CLASSIFIER_SPLIT}/no_tumor"] = {
        **failures([served[i] for i in negatives]),
        "full": false_alarm_report([served[i] for i in negatives]),
        "duplicate_free": false_alarm_report([served[i] for i in negatives if free[i]]),
    }
    for key in SEGMENTATION_SPLITS:
        dataset, split = key.split("/")
        slices = spread(load_via_split(data_root, dataset, split), limit)
        served = serve_all(call, [item.path for item in slices], concurrency, key)
        every_call += served
        free = [audit.is_duplicate_free(key, item.path) for item in slices]
        splits[key] = full_and_duplicate_free(
            partial(localization_report, groups=split_groups(item.path for item in slices)), slices, served, free)
    for key, truth_items, report in (
        (LGG_SPLIT, lgg_items(data_root), lgg_report),
        (HEAD_CT_SPLIT, head_ct_items(data_root), truth_report),
    ):
        truth_items = spread(truth_items, limit)
        served = serve_all(call, [path for path, _ in truth_items], concurrency, key)
        every_call += served
        splits[key] = {**failures(served), "full": report(truth_items, served, split_groups(p for p, _ in truth_items))}
    latencies = np.array([s.latency_ms for s in every_call if s.result is not None])
    return {
        "gated": gate,
        "concurrency": concurrency,
        "evaluated": dt.date.today().isoformat(),
        "calls": len(every_call),
        "failed": dict(Counter(s.error for s in every_call if s.error is not None)),
        "latency_ms": {  # of the answered calls
            "p50": round(float(np.percentile(latencies, 50)), 2) if latencies.size else None,
            "p99": round(float(np.percentile(latencies, 99)), 2) if latencies.size else None,
        },
        "splits": splits,
    }


# --- CLI -------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    from brainscan.cli import add_connection_flags

    parser = argparse.ArgumentParser(
        description="Send every evaluation split through a running gateway and score what it returns, as served. "
        "Start one first: brainscan-server."
    )
    add_connection_flags(parser)
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root (default: $BRAINSCAN_DATA or ../shared/datasets)")
    parser.add_argument("--ungated", action="store_true", help="run U-Net/Mask R-CNN on every slice, not only where the classifier sees a tumor")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight at once (default 4)")
    parser.add_argument("--limit", type=int, default=0, help="at most N slices per split, spread evenly (smoke runs); 0 = all")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each slice's call in seconds (default 60)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON to this file")
    return parser


def main(args: argparse.Namespace) -> int:
    """0 when every call was answered, 1 when some failed (the report says which), 2 on a usage error."""
    from brainscan.cli import connect
    from brainscan.errors import BrainscanError, ServerUnavailable

    from export.cli_checks import DATA_HINT, argument_problem, fail

    prog = "python -m export evaluate service"
    if problem := argument_problem(data=args.data, output=args.output, limit=args.limit):
        return fail(prog, problem)
    if args.concurrency < 1:
        return fail(prog, "--concurrency must be at least 1")
    with connect(args) as client:
        try:
            info = client.model_info()
        except ServerUnavailable as error:
            return fail(prog, f"no gateway answering at {args.server} ({error}); start one with `brainscan-server`")
        except BrainscanError as error:
            return fail(prog, f"the gateway at {args.server} refused: {error}")
        labels = {label for model in info.models if model.role == "classifier" for label in model.labels}
        if labels != set(CLASS_LABELS):
            return fail(prog, f"the gateway's classifier labels {sorted(labels)} are not this dataset's {list(CLASS_LABELS)}")
        try:
            report = evaluate_service(
                client, args.data, gate=not args.ungated, concurrency=args.concurrency, limit=args.limit, timeout_s=args.timeout
            )
        except FileNotFoundError as error:
            return fail(prog, f"{error}; {DATA_HINT}")
    report = {
        "gateway": args.server,
        "backend": info.backend,
        "decision": {
            "gate": info.decision.gate, "alone": info.decision.alone, "strong": info.decision.strong,
            "min_mask_fraction": info.decision.min_mask_fraction, "scope_threshold": info.decision.scope_threshold,
            "learned_scope_check": info.decision.learned_scope_check, "detection_threshold": info.detection_threshold,
        },
        "models": {model.role: f"{model.name}:{model.version}" for model in info.models},
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(summary_table(report["splits"]), file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if report["failed"]:
        print(f"{prog}: {sum(report['failed'].values())} of {report['calls']} calls failed {report['failed']}; "
              "the scores cover the answered ones only", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
