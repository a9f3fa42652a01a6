"""`python -m export export decision`: choose the served answer's operating points on validation data.

First the U-Net's smallest served mask region (`export.unet_regions`, on the
U-Net's own validation split), written as `min_component_px` into
`model_repository/unet/config.pbtxt`. Then the decision: runs the exported classifier, U-Net and Mask R-CNN (ONNX Runtime, the
gateway's preprocessing) on the classifier's validation split: slices carved
from the training sources by near-duplicate group (Sartaj, Br35H, ruslan-kl)
or by patient (lgg-flair/train), never an evaluation split. Then picks, by
grid search, the thresholds of the rule the gateway applies
(`gateway.decision`):

    out of scope   when in_scope < scope_threshold (chosen so that at most
                   0.5% of the validation MRI slices are flagged)
    tumor          when p(tumor) >= decision_strong, or p(tumor) >=
                   decision_gate and the U-Net mask covers >= decision_min_mask_fraction
                   of its input or a Mask R-CNN instance reaches the serving score
    tumor (no localization model ran)   when p(tumor) >= decision_alone

maximizing the mean over sources of balanced accuracy (sensitivity only for
the tumor-only sources), the U-Net masks filtered as served. The thresholds are written as parameters of
`model_repository/classifier/config.pbtxt`; the validation report goes to
`model_repository/classifier/decision.json`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export import unet_regions
from export.datasets import CLASS_LABELS, default_data_root

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_TUMOR = CLASS_LABELS.index("no_tumor")
MAX_SCOPE_FLAGS = 0.005
GATES = np.round(np.arange(0.05, 0.96, 0.05), 2)
STRONG = np.round(np.concatenate([np.arange(0.5, 0.95, 0.05), [0.95, 0.97, 0.98, 0.99, 0.995, 1.0]]), 3)  # 1.0: never alone
MASK_FRACTIONS = (0.0005, 0.001, 0.002, 0.004, 0.008)
MASK_THRESHOLD = 0.5  # the gateway's default BRAINSCAN_MASK_THRESHOLD


@dataclass
class Evidence:
    """Per validation slice: source, truth (tumor or not) and what each model said."""

    sources: np.ndarray
    tumor: np.ndarray
    p_tumor: np.ndarray
    in_scope: np.ndarray
    mask_fraction: np.ndarray
    max_instance_score: np.ndarray


def collect(repository: Path, data_root: Path, run_args: dict, threads: int, min_component_px: int = 0) -> Evidence:
    import onnxruntime as ort

    from export import train_classifier as tc
    from gateway.contract import load_model_spec
    from gateway.postprocessing import drop_small_components
    from gateway.preprocessing import load_image_file, prepare

    _, items = tc.run_items(run_args, data_root)
    val = [i for i in items.val if items.groups[i] != tc.OUT_OF_SCOPE and items.paths[i] is not None]

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    specs = {name: load_model_spec(repository / name) for name in ("classifier", "unet", "maskrcnn")}
    sessions = {name: ort.InferenceSession(str(spec.onnx_path), options, providers=["CPUExecutionProvider"])
                for name, spec in specs.items()}
    rows = []
    for i in tqdm(val, desc="decision evidence (validation)", unit="img"):
        gray = load_image_file(str(items.paths[i])).pixels
        cls = sessions["classifier"].run(["probabilities", "in_scope"],
                                         {"image": prepare(gray, specs["classifier"].input_size).tensor[None, ..., None]})
        unet = sessions["unet"].run(None, {"image": prepare(gray, specs["unet"].input_size).tensor[None, ..., None]})[0]
        unet = drop_small_components(unet[0, ..., 0], threshold=MASK_THRESHOLD, min_px=min_component_px)
        scores = sessions["maskrcnn"].run(["scores"], {"image": prepare(gray, specs["maskrcnn"].input_size).tensor[None]})[0]
        rows.append((1.0 - float(cls[0][0, NO_TUMOR]), float(cls[1][0, 0]), float((unet >= MASK_THRESHOLD).mean()),
                     float(scores.max()) if len(scores) else 0.0))
    values = np.array(rows, dtype=np.float64)
    return Evidence(
        sources=np.array([items.sources[i] for i in val]),
        tumor=np.array([items.groups[i] != NO_TUMOR for i in val]),
        p_tumor=values[:, 0], in_scope=values[:, 1], mask_fraction=values[:, 2], max_instance_score=values[:, 3],
    )


def objective(evidence: Evidence, decided: np.ndarray) -> tuple[float, dict[str, dict[str, float | None]]]:
    """Mean over sources of balanced accuracy (sensitivity alone where a source has no negatives)."""
    per_source: dict[str, dict[str, float | None]] = {}
    scores = []
    for source in sorted(set(evidence.sources.tolist())):
        rows = evidence.sources == source
        pos, neg = rows & evidence.tumor, rows & ~evidence.tumor
        sens = float(decided[pos].mean()) if pos.any() else None
        spec = float((~decided[neg]).mean()) if neg.any() else None
        per_source[source] = {"n": int(rows.sum()), "sensitivity": sens, "specificity": spec}
        parts = [v for v in (sens, spec) if v is not None]
        scores.append(float(np.mean(parts)))
    return float(np.mean(scores)), per_source


def choose(evidence: Evidence, detection_threshold: float) -> dict[str, object]:
    mri_scope = np.sort(evidence.in_scope)
    scope_threshold = float(min(0.5, mri_scope[int(np.floor(MAX_SCOPE_FLAGS * len(mri_scope)))] - 1e-6))
    judged = evidence.in_scope >= scope_threshold
    found = evidence.max_instance_score >= detection_threshold
    best: tuple[float, float, float, float] | None = None
    for gate in GATES:
        for strong in STRONG[STRONG >= gate]:
            for fraction in MASK_FRACTIONS:
                localized = (evidence.mask_fraction >= fraction) | found
                decided = judged & ((evidence.p_tumor >= strong) | ((evidence.p_tumor >= gate) & localized))
                score, _ = objective(evidence, decided)
                key = (score, float(decided[evidence.tumor].mean()))
                if best is None or key > best[:2]:
                    best = (*key, gate, strong, fraction)  # type: ignore[assignment]
    assert best is not None
    _, _, gate, strong, fraction = best  # type: ignore[misc]
    alone_best = max(GATES, key=lambda t: (objective(evidence, judged & (evidence.p_tumor >= t))[0], -t))
    localized = (evidence.mask_fraction >= fraction) | found
    combined = judged & ((evidence.p_tumor >= strong) | ((evidence.p_tumor >= gate) & localized))
    score, per_source = objective(evidence, combined)
    alone_score, alone_per_source = objective(evidence, judged & (evidence.p_tumor >= alone_best))
    return {
        "parameters": {
            "decision_gate": f"{gate:g}", "decision_strong": f"{strong:g}", "decision_alone": f"{alone_best:g}",
            "decision_min_mask_fraction": f"{fraction:g}", "scope_threshold": f"{scope_threshold:.4g}",
        },
        "validation": {
            "slices": int(len(evidence.tumor)),
            "scope_flagged_share": round(float((~judged).mean()), 4),
            "combined_rule": {"mean_balanced_accuracy": round(score, 4), "per_source": per_source},
            "classifier_alone": {"mean_balanced_accuracy": round(alone_score, 4), "per_source": alone_per_source},
        },
    }


def card_metrics_text(card: Path) -> str:
    """The metrics JSON block of a model card ("{}" when there is none)."""
    text = card.read_text() if card.is_file() else ""
    start = text.find("```json", text.find("## Metrics"))
    if start < 0:
        return "{}"
    body = text[start + len("```json"):]
    return body[: body.find("```")]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Choose the tumor decision's thresholds on validation data and "
                                                 "write them into the classifier's config.pbtxt.")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository", help="model repository")
    parser.add_argument("--data", type=Path, default=default_data_root(), help="datasets root")
    parser.add_argument("--run", type=Path, default=REPO_ROOT / "runs" / "classifier",
                        help="the classifier's run folder (its args.json fixes the validation split)")
    parser.add_argument("--detection-threshold", type=float, default=0.5, help="the gateway's Mask R-CNN score threshold")
    unet_regions.add_arguments(parser, REPO_ROOT)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    return parser


def main(args: argparse.Namespace) -> int:
    from export.repository import set_model_parameters

    args_file = Path(args.run) / "args.json"
    run_args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    regions = unet_regions.choose_min_component_px(args.repository, args.data, args.unet_run, args.threads, MASK_THRESHOLD)
    set_model_parameters(args.repository, "unet", {"min_component_px": str(regions["min_component_px"])})
    print(f"U-Net regions under {regions['min_component_px']} px dropped: validation score "
          f"{regions['scores'][str(regions['min_component_px'])]['score']} against {regions['scores']['0']['score']} unfiltered")
    evidence = collect(args.repository, args.data, run_args, args.threads, int(regions["min_component_px"]))  # type: ignore[call-overload]
    report = choose(evidence, args.detection_threshold)
    report["unet_min_component_px"] = regions["min_component_px"]
    set_model_parameters(args.repository, "classifier", report["parameters"])  # type: ignore[arg-type]
    out = Path(args.repository) / "classifier" / "decision.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    from export.evaluate_keras import evaluate
    from export.repository import replace_card_metrics

    # The U-Net's card metrics are of its served masks, which the regions filter changes: recompute them.
    unet_metrics = evaluate("unet", data_root=args.data, repository=args.repository, threads=args.threads)
    unet_metrics["regions_validation"] = regions
    replace_card_metrics(args.repository, "unet", unet_metrics,
                         note=f"Recomputed by `python -m export export decision`, mask regions under "
                              f"{regions['min_component_px']} px of the {regions['grid']}-px grid dropped "
                              "(the size it chose on the U-Net's validation split)")
    # The classifier's card metrics depend on decision_alone and scope_threshold: recompute them.
    metrics = evaluate("classifier", data_root=args.data, repository=args.repository, threads=args.threads)
    card = json.loads(card_metrics_text(Path(args.repository) / "classifier" / "MODEL_CARD.md"))
    for key in ("calibration_validation",):
        if key in card:
            metrics[key] = card[key]
    metrics["decision"] = report
    replace_card_metrics(args.repository, "classifier", metrics,
                         note="Recomputed by `python -m export export decision` with the thresholds it chose")
    print(json.dumps(report, indent=2))
    print(f"wrote the parameters into {args.repository / 'classifier' / 'config.pbtxt'} and the report to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
