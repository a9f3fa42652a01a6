"""torch.onnx export of the Mask R-CNN contract and the ONNX Runtime parity gate.

Parity (export fails otherwise), on real slices chosen by the caller:
same number of detections above the serving threshold, matched boxes within
1 px, mask IoU ≥ 0.99. The exported graph is also run on blank slices, which
must yield zero detections without an error (a known pitfall of exporting
torchvision detectors), and every output must respect the detection cap.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.maskrcnn_model import MaskRCNNExportWrapper

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "masks")
BOX_TOLERANCE_PX = 1.0
MIN_MASK_IOU = 0.99


class ParityError(RuntimeError):
    """The exported graph disagrees with PyTorch (or fails on an input PyTorch handles)."""


def export_onnx(model: torch.nn.Module, path: Path, example: torch.Tensor) -> None:
    """Trace the wrapper to ONNX with a dynamic image size and a dynamic detection count."""
    wrapper = MaskRCNNExportWrapper(model).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape math are expected here
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            opset_version=OPSET,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {1: "height", 2: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "masks": {0: "detections", 2: "height", 3: "width"},
            },
            do_constant_folding=True,
        )


def ort_session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_io_names(session) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
        raise ParityError(f"ONNX tensor names: expected inputs [{INPUT_NAME!r}] outputs {list(OUTPUT_NAMES)}, got {inputs} {outputs}")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass
class ParityReport:
    slices: int = 0
    detections_compared: int = 0
    max_box_diff_px: float = 0.0
    min_mask_iou: float = 1.0
    max_score_diff: float = 0.0
    blank_slices_with_zero_detections: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "slices": self.slices,
            "detections_compared": self.detections_compared,
            "max_box_diff_px": round(self.max_box_diff_px, 4),
            "min_mask_iou": round(self.min_mask_iou, 4),
            "max_score_diff": round(self.max_score_diff, 6),
            "blank_slices_with_zero_detections": self.blank_slices_with_zero_detections,
            "notes": self.notes,
        }


def check_parity(
    model: torch.nn.Module,
    session,
    images: Sequence[np.ndarray],
    *,
    threshold: float,
    max_detections: int,
    blank_size: int,
) -> ParityReport:
    """Compare PyTorch and ONNX Runtime on `images` (each S×S float32); raise ParityError on any miss."""
    wrapper = MaskRCNNExportWrapper(model).eval()
    report = ParityReport()
    for index, image in enumerate(images):
        tensor = np.ascontiguousarray(image, dtype=np.float32)[None]
        with torch.no_grad():
            t_boxes, t_scores, t_masks = (x.numpy() for x in wrapper(torch.from_numpy(tensor)))
        o_boxes, o_scores, o_masks = session.run(list(OUTPUT_NAMES), {INPUT_NAME: tensor})
        _check_shapes(o_boxes, o_scores, o_masks, tensor.shape[1:], max_detections, f"slice {index}")
        t_keep, o_keep = t_scores >= threshold, o_scores >= threshold
        if t_keep.sum() != o_keep.sum():
            raise ParityError(
                f"slice {index}: PyTorch has {int(t_keep.sum())} detections ≥ {threshold}, ONNX Runtime {int(o_keep.sum())} "
                f"(scores torch {np.round(t_scores, 4).tolist()} vs ort {np.round(o_scores, 4).tolist()})"
            )
        # Both come sorted by score; a near-tie may swap neighbours, so match each torch box to its nearest.
        for tb, tm in zip(t_boxes[t_keep], t_masks[t_keep]):
            diffs = np.abs(o_boxes[o_keep] - tb).max(axis=1)
            j = int(np.argmin(diffs))
            iou = _iou(tm[0] >= 0.5, o_masks[o_keep][j][0] >= 0.5)
            report.max_box_diff_px = max(report.max_box_diff_px, float(diffs[j]))
            report.min_mask_iou = min(report.min_mask_iou, iou)
            report.detections_compared += 1
            if diffs[j] > BOX_TOLERANCE_PX or iou < MIN_MASK_IOU:
                raise ParityError(f"slice {index}: box differs by {diffs[j]:.3f} px, mask IoU {iou:.4f}")
        if len(t_scores) and len(o_scores) == len(t_scores):
            report.max_score_diff = max(report.max_score_diff, float(np.abs(np.sort(t_scores) - np.sort(o_scores)).max()))
        report.slices += 1
    for blank in (np.zeros((blank_size, blank_size), np.float32), np.full((blank_size, blank_size), 0.5, np.float32)):
        try:
            boxes, scores, masks = session.run(list(OUTPUT_NAMES), {INPUT_NAME: blank[None]})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ParityError(f"exported graph fails on a blank slice: {exc}") from None
        _check_shapes(boxes, scores, masks, blank.shape, max_detections, "blank slice")
        if len(scores) == 0:
            report.blank_slices_with_zero_detections += 1
    if report.blank_slices_with_zero_detections == 0:
        report.notes.append("no blank slice produced zero raw detections; the zero-detection path was not exercised")
    return report


def _check_shapes(boxes, scores, masks, hw: tuple[int, int], cap: int, where: str) -> None:
    n = len(scores)
    expected = {"boxes": (n, 4), "scores": (n,), "masks": (n, 1, *hw)}
    actual = {"boxes": boxes.shape, "scores": scores.shape, "masks": masks.shape}
    for name in expected:
        if tuple(actual[name]) != expected[name]:
            raise ParityError(f"{where}: output {name!r} has shape {tuple(actual[name])}, expected {expected[name]}")
    if n > cap:
        raise ParityError(f"{where}: {n} detections exceed the cap of {cap}")
    for name, array in (("boxes", boxes), ("scores", scores), ("masks", masks)):
        if array.dtype != np.float32:
            raise ParityError(f"{where}: output {name!r} is {array.dtype}, expected float32")


def latency_ms(session, image: np.ndarray, runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median/p90 wall time of one ONNX Runtime call on an S×S slice."""
    feed = {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)[None]}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": round(float(np.median(times)), 2), "p90_ms": round(float(np.percentile(times, 90)), 2), "runs": runs}


def int8_cost(path: Path, out_path: Path, images: Sequence[np.ndarray], threshold: float, latency_runs: int) -> dict[str, object]:
    """What shrinking would cost: ONNX Runtime dynamic int8 weights vs the FP32 graph on the same slices.

    Reported only (the FP32 file is what ships when it fits the budget).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns about every integer shape tensor
    quantize_dynamic(str(path), str(out_path), weight_type=QuantType.QInt8)
    fp32, int8 = ort_session(path), ort_session(out_path)
    count_mismatch, box_diffs, ious = 0, [], []
    for image in images:
        feed = {INPUT_NAME: np.ascontiguousarray(image, dtype=np.float32)[None]}
        a_boxes, a_scores, a_masks = fp32.run(list(OUTPUT_NAMES), feed)
        b_boxes, b_scores, b_masks = int8.run(list(OUTPUT_NAMES), feed)
        a_keep, b_keep = a_scores >= threshold, b_scores >= threshold
        if a_keep.sum() != b_keep.sum():
            count_mismatch += 1
        if a_keep.any() and b_keep.any():
            for box, mask in zip(a_boxes[a_keep], a_masks[a_keep]):
                diffs = np.abs(b_boxes[b_keep] - box).max(axis=1)
                j = int(np.argmin(diffs))
                box_diffs.append(float(diffs[j]))
                ious.append(_iou(mask[0] >= 0.5, b_masks[b_keep][j][0] >= 0.5))
    return {
        "onnx_mb": round(out_path.stat().st_size / 2**20, 2),
        "slices": len(images),
        "slices_with_different_detection_count": count_mismatch,
        "median_box_diff_px": round(float(np.median(box_diffs)), 2) if box_diffs else None,
        "max_box_diff_px": round(float(np.max(box_diffs)), 2) if box_diffs else None,
        "min_mask_iou": round(float(np.min(ious)), 4) if ious else None,
        "ort_cpu_latency_2_threads": latency_ms(int8, images[-1], runs=latency_runs) if latency_runs else None,
    }
