"""Bench results → ratios, target checks and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {
    "throughput_vs_floor_c16": 0.90,  # gateway images/s at concurrency 16 ≥ 0.90 × floor
    "added_p50_ms_c1": 5.0,  # gateway p50 − floor p50 at concurrency 1 ≤ 5 ms
    "vs_naive_c16": 5.0,  # gateway images/s at concurrency 16 ≥ 5 × naive
}
DRIFT_WARNING = 0.10  # floor throughput change between start and end of a run that flags contention
SHORT = {"classifier": "cls", "unet": "unet", "maskrcnn": "mrcnn"}


def mean_batch(histogram: dict[int, int]) -> float | None:
    batches = sum(histogram.values())
    return sum(size * count for size, count in histogram.items()) / batches if batches else None


def floor_drift(results: dict[str, Any]) -> float | None:
    """Relative change of the ORT-only floor's images/s from the run's start to its end."""
    start, end = results["floor"].get("models"), results.get("floor_end")
    if not start or not end:
        return None
    return end["throughput_per_s"] / start["throughput_per_s"] - 1.0


def add_ratios(results: dict[str, Any]) -> None:
    """Annotate every gateway/naive point with its ratios to the floor and to the naive baseline."""
    floor = results["floor"].get("models")
    naive = {p["concurrency"]: p for p in results["systems"].get("naive", [])}
    naive_best = max((p["throughput_per_s"] for p in naive.values()), default=None)
    for system, points in results["systems"].items():
        for point in points:
            if floor:
                point["x_floor"] = round(point["throughput_per_s"] / floor["throughput_per_s"], 3)
                point["added_p50_ms"] = round(point["p50_ms"] - floor["p50_ms"], 3)
                point["added_p99_ms"] = round(point["p99_ms"] - floor["p99_ms"], 3)
            reference = naive.get(point["concurrency"], {}).get("throughput_per_s") or naive_best
            if system != "naive" and reference:
                point["x_naive"] = round(point["throughput_per_s"] / reference, 2)


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    for system in ("embedded", "triton"):
        points = {p["concurrency"]: p for p in results["systems"].get(system, [])}
        c16, c1 = points.get(16, {}), points.get(1, {})
        # The paired measurement, when there is one: it cancels the machine's drift (see bench.paired).
        paired = results.get("paired_c1", {}).get(system, {})
        added_c1 = paired.get("added_p50_ms", c1.get("added_p50_ms"))
        for name, value, ok in (
            ("throughput_vs_floor_c16", c16.get("x_floor"), lambda v: v >= TARGETS["throughput_vs_floor_c16"]),
            ("added_p50_ms_c1", added_c1, lambda v: v <= TARGETS["added_p50_ms_c1"]),
            ("vs_naive_c16", c16.get("x_naive"), lambda v: v >= TARGETS["vs_naive_c16"]),
        ):
            checks[f"{system}.{name}"] = {
                "value": value,
                "target": TARGETS[name],
                "met": None if value is None else bool(ok(value)),
            }
    return checks


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _batches(point: dict[str, Any]) -> str:
    parts = []
    for model, histogram in point.get("batch_sizes", {}).items():
        if model not in SHORT:
            continue
        average = mean_batch({int(k): v for k, v in histogram.items()})
        largest = max(int(k) for k in histogram)
        parts.append(f"{SHORT[model]} {average:.1f} (max {largest})")
    return ", ".join(parts) or "–"


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"Machine: {machine['description']} · load average at start {machine['loadavg_start']} · "
        f"{results['date']} · models: {results['models_note']}",
        "",
        "| system | conc. | images/s | p50 ms | p99 ms | × floor | + p50 ms | + p99 ms | × naive | mean batch (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    labels = {"models": "floor: ORT only, in-process", "models+pre/post": "floor + decode/pre/post, in-process"}
    for name, point in results["floor"].items():
        lines.append(
            f"| {labels.get(name, name)} | 1 | {_fmt(point['throughput_per_s'], 2)} | {_fmt(point['p50_ms'])} | "
            f"{_fmt(point['p99_ms'])} | {_fmt(point['throughput_per_s'] / results['floor']['models']['throughput_per_s'], 2)} "
            f"| {_fmt(point['p50_ms'] - results['floor']['models']['p50_ms'])} "
            f"| {_fmt(point['p99_ms'] - results['floor']['models']['p99_ms'])} | | |"
        )
    titles = {"embedded": "gateway, embedded ORT", "triton": "gateway, local Triton", "naive": "naive FastAPI"}
    for system, points in results["systems"].items():
        for p in points:
            errors = f" ({p['errors']} errors)" if p.get("errors") else ""
            lines.append(
                f"| {titles.get(system, system)}{errors} | {p['concurrency']} | {_fmt(p['throughput_per_s'], 2)} | "
                f"{_fmt(p['p50_ms'])} | {_fmt(p['p99_ms'])} | {_fmt(p.get('x_floor'), 2)} | "
                f"{_fmt(p.get('added_p50_ms'))} | {_fmt(p.get('added_p99_ms'))} | {_fmt(p.get('x_naive'), 1)} | "
                f"{_batches(p)} |"
            )
    for system, error in results.get("failures", {}).items():
        lines.append(f"| {system}: FAILED ({error.splitlines()[0][:120]}) | | | | | | | | | |")
    drift = floor_drift(results)
    if drift is not None and abs(drift) > DRIFT_WARNING:
        lines += ["", f"WARNING: the floor moved {drift:+.0%} between the start and the end of the run: the machine "
                  "was not quiet (other load), so these numbers are contended; rerun on an idle machine."]
    if machine["loadavg_start"] > 0.5 * machine["cores"]:
        lines += ["", f"WARNING: load average {machine['loadavg_start']} on {machine['cores']} cores before the run "
                  "started: other work shared the CPUs, so these numbers are contended; rerun on an idle machine."]
    for system, paired in results.get("paired_c1", {}).items():
        lines += ["", f"Paired at concurrency 1 ({titles.get(system, system)}, {paired['pairs']} alternating floor/gateway "
                  f"calls on the same slices): floor p50 {_fmt(paired['floor_p50_ms'])} ms, gateway p50 "
                  f"{_fmt(paired['gateway_p50_ms'])} ms, added p50 {_fmt(paired['added_p50_ms'])} ms (median of the "
                  f"per-slice differences), p90 {_fmt(paired['added_p90_ms'])} ms. The target check uses this figure."]
    lines += ["", "Targets (CPU): " + "; ".join(
        f"{name} = {_fmt(check['value'], 2)} (target {check['target']}) "
        f"{'met' if check['met'] else 'n/a' if check['met'] is None else 'NOT met'}"
        for name, check in results["targets"].items()
    )]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    """A bench's --out: the result as indented JSON, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
