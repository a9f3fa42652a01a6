"""`python -m bench pipeline` / `python -m bench.pipeline`: what the gateway costs on top of the models.

One run, one machine, the same real slices (Sartaj `Testing/` by default),
every slice through all three models (ungated requests), measures:

1. the floor: the embedded backend's ONNX Runtime sessions called directly,
   one slice at a time, in this process (and the same plus decode/pre/post);
2. the gateway on the embedded backend, over gRPC, at each --concurrency;
3. the gateway on a local Triton (started here unless --triton-url is given);
4. the naive baseline (bench/naive_server.py: FastAPI, Keras predict, eager PyTorch).

It prints a Markdown table with ratios (× floor, added p50/p99 ms, × naive) and
the batch sizes formed (read from the KServe statistics of the gateway and of
Triton), checks the CPU targets, and writes everything as JSON to
--out/<host>-<date>.json so runs can be compared. Use --quick for a smoke run.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import processes, report
from bench.floor import measure_floor
from bench.load import GrpcAnalyze, HttpAnalyze, closed_loop
from bench.paired import paired_added_latency
from gateway.config import PROJECT_ROOT
from gateway.contract import load_repository
from bench.triton_perf import default_images, find_images

SYSTEMS = ("floor", "embedded", "triton", "naive")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure the gateway against the bare models and a naive FastAPI server "
        "(research use only; not a medical device).",
    )
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository",
                        help="model repository to serve (default ./model_repository)")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="image files or folders (default: $BRAINSCAN_DATA/sartaj-classification/Testing)")
    parser.add_argument("--count", type=int, default=48, help="slices to cycle through (default 48)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list out of {','.join(SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,4,16,64", help="gateway concurrencies (default 1,4,16,64)")
    parser.add_argument("--naive-concurrency", default="1,16", help="naive server concurrencies (default 1,16)")
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per point (default 12)")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per point (default 3)")
    parser.add_argument("--batch-max-size", type=int, default=None, help="embedded batching: rows per call (gateway default)")
    parser.add_argument("--batch-max-delay-ms", type=float, default=None, help="embedded batching: max wait, 0 = off")
    parser.add_argument("--ort-threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--triton-url", default=None, help="use this Triton (gRPC) instead of starting a local one")
    parser.add_argument("--runs", type=Path, default=PROJECT_ROOT / "runs", help="training runs with checkpoints for the naive server")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results", help="folder for the JSON and Markdown results")
    parser.add_argument("--pairs", type=int, default=60,
                        help="paired floor/gateway calls for the concurrency-1 added latency (0 = skip)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 slices, concurrency 1,4, naive 1, 2 s points")
    parser.add_argument("--check", action="store_true", help="exit 1 when a CPU target is not met")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.count, args.duration, args.warmup = min(args.count, 6), 2.0, 0.5
        args.concurrency, args.naive_concurrency, args.pairs = "1,4", "1", min(args.pairs, 8)
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        print(f"bench pipeline: unknown system(s) {unknown}; choose from {SYSTEMS}", file=sys.stderr)
        return 2
    repository = args.model_repository.resolve()
    specs = load_repository(repository)
    paths = find_images(args.images or [default_images()], args.count)
    images = [p.read_bytes() for p in paths]
    threads = args.ort_threads or (os.cpu_count() or 1)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "images": [str(p) for p in paths],
        "models": {role: {"name": s.name, "version": s.version, "max_batch_size": s.max_batch_size,
                          "input_size": s.input_size, "onnx_mb": round(s.onnx_path.stat().st_size / 2**20, 2)}
                   for role, s in specs.items()},
        "models_note": f"{repository.name}/ ({', '.join(f'{r} {s.input_size}px' for r, s in specs.items())})",
        "floor": {},
        "systems": {},
    }
    env = gateway_env(args, threads)
    results["gateway_env"] = env
    with tempfile.TemporaryDirectory(prefix="brainscan-bench-") as folder:
        workdir = Path(folder)
        gateway_points = _ints(args.concurrency)
        runners: dict[str, Callable[[], Any]] = {
            "floor": lambda: measure_floor(
                repository, images, threads=threads, warmup_s=args.warmup, duration_s=args.duration
            ),
            "embedded": lambda: run_embedded(repository, workdir, images, gateway_points, args, env, results),
            "triton": lambda: run_triton(repository, workdir, images, gateway_points, args, env, results),
            "naive": lambda: run_naive(repository, workdir, images, args, results),
        }
        for system in systems:
            step(f"{system}: starting")
            try:
                value = runners[system]()
            except Exception as error:  # one system failing must not lose the others' numbers
                step(f"{system} FAILED: {error}")
                results.setdefault("failures", {})[system] = f"{type(error).__name__}: {error}"
                continue
            if system == "floor":
                results["floor"] = value
            else:
                results["systems"][system] = value
        if "floor" in systems and len(systems) > 1 and "floor" not in results.get("failures", {}):
            step("floor again: did the machine stay quiet?")
            results["floor_end"] = measure_floor(
                repository, images, threads=threads, warmup_s=args.warmup, duration_s=args.duration / 2,
                models_only=True,
            )["models"]
    report.add_ratios(results)
    results["floor_drift"] = report.floor_drift(results)
    results["targets"] = report.check_targets(results)
    table = report.markdown(results)
    print(table)
    stem = f"{socket.gethostname()}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(f"\nwrote {args.out / stem}.json and .md")
    unmet = [name for name, check in results["targets"].items() if check["met"] is False]
    return 1 if results.get("failures") or (args.check and unmet) else 0


def gateway_env(args: argparse.Namespace, threads: int) -> dict[str, str]:
    # KServe on: its statistics report the batch sizes each point formed
    env = {"BRAINSCAN_ORT_THREADS": str(threads), "BRAINSCAN_KSERVE": "1"}
    if args.batch_max_size is not None:
        env["BRAINSCAN_BATCH_MAX_SIZE"] = str(args.batch_max_size)
    if args.batch_max_delay_ms is not None:
        env["BRAINSCAN_BATCH_MAX_DELAY_MS"] = str(args.batch_max_delay_ms)
    return env


def run_embedded(repository: Path, workdir: Path, images: list[bytes], points: list[int],
                 args: argparse.Namespace, env: dict[str, str], results: dict[str, Any]) -> list[dict[str, Any]]:
    with processes.gateway(repository, workdir, env=env) as address:
        swept = sweep("gateway (embedded)", address, images, points, args, stats_address=address)
        measure_paired("embedded", repository, address, images, args, env, results)
        return swept


def run_naive(repository: Path, workdir: Path, images: list[bytes], args: argparse.Namespace,
              results: dict[str, Any]) -> list[dict[str, Any]]:
    with processes.naive_server(repository, args.runs, workdir) as (host, port):
        results["naive_weights"] = json.loads(processes.http_get(f"http://{host}:{port}/info"))
        random = [m for m, source in results["naive_weights"].items() if str(source).startswith("random")]
        if random:
            results["models_note"] += f"; naive baseline with random weights for {', '.join(random)} (same architectures)"
        return sweep_naive(host, port, images, _ints(args.naive_concurrency), args)


def run_triton(repository: Path, workdir: Path, images: list[bytes], points: list[int],
               args: argparse.Namespace, env: dict[str, str], results: dict[str, Any]) -> list[dict[str, Any]]:
    def measure(triton_url: str) -> list[dict[str, Any]]:
        with processes.gateway(repository, workdir, backend="triton", triton_url=triton_url, env=env) as address:
            swept = sweep("gateway (triton)", address, images, points, args, stats_address=triton_url)
            measure_paired("triton", repository, address, images, args, env, results)
            return swept

    if args.triton_url:
        return measure(args.triton_url)
    from triton_local.runner import LocalTriton

    step("starting a local Triton server")
    with LocalTriton(repository) as triton:
        return measure(triton.grpc_url)


def measure_paired(system: str, repository: Path, address: str, images: list[bytes], args: argparse.Namespace,
                   env: dict[str, str], results: dict[str, Any]) -> None:
    """The concurrency-1 added latency measured paired against the in-process floor (see bench.paired)."""
    if not args.pairs:
        return
    step(f"gateway ({system}): paired added latency at concurrency 1, {args.pairs} pairs")
    results.setdefault("paired_c1", {})[system] = paired_added_latency(
        repository, address, images, threads=int(env["BRAINSCAN_ORT_THREADS"]), pairs=args.pairs)


def sweep(label: str, address: str, images: list[bytes], points: list[int], args: argparse.Namespace,
          *, stats_address: str) -> list[dict[str, Any]]:
    """The gateway at each concurrency, with the batch sizes each point formed."""

    async def run() -> list[dict[str, Any]]:
        target = GrpcAnalyze(address, images)  # one channel, made inside the loop that uses it
        results = []
        try:
            for concurrency in points:
                before = processes.batch_histograms(stats_address)
                point = await measure_point(label, target, len(images), concurrency, args)
                point["batch_sizes"] = processes.histogram_delta(processes.batch_histograms(stats_address), before)
                results.append(point)
        finally:
            await target.close()
        return results

    return asyncio.run(run())


def sweep_naive(host: str, port: int, images: list[bytes], points: list[int],
                args: argparse.Namespace) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        target = HttpAnalyze(host, port, images)
        try:
            return [await measure_point("naive FastAPI", target, len(images), c, args) for c in points]
        finally:
            await target.close()

    return asyncio.run(run())


async def measure_point(label: str, target: Callable[[int, int], Awaitable[None]], items: int, concurrency: int,
                        args: argparse.Namespace) -> dict[str, Any]:
    step(f"{label}: concurrency {concurrency}")
    result = await closed_loop(
        target, items=items, concurrency=concurrency, warmup_s=args.warmup, duration_s=args.duration
    )
    summary = result.summary()
    summary["loadavg"] = round(os.getloadavg()[0], 2)
    return summary


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import grpc
    import numpy
    import onnxruntime

    cores = os.cpu_count() or 1
    description = f"{socket.gethostname()}: {cores} × {cpu}" + (f", GPU {gpu}" if gpu else ", no GPU")
    return {
        "host": socket.gethostname(),
        "description": description,
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "loadavg_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "grpcio": grpc.__version__,
        "numpy": numpy.__version__,
    }


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
