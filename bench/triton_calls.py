"""What one model call through Triton costs over the same call in-process: `python -m bench.triton_calls`.

For each model, the embedded backend's own session (in this process) and the
gateway's Triton backend (over gRPC to a Triton server) take turns on the same
prepared tensors, one call at a time; the median of the per-call differences is
what the Triton hop adds to that model (gRPC, Triton's scheduler and, on the
local server, the Python-backend shim). Without `--triton-url` a local Triton
(`python -m triton_local`) is started over the same repository.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.floor import Feeds, model_inputs, open_backend
from bench.paired import added_latency
from bench.report import write_json
from gateway.backends.triton import TritonBackend
from bench.triton_perf import default_images, find_images


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Per-model cost of a Triton call over the same ONNX Runtime call in-process, measured paired "
                    "(research use only; not a medical device).")
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"), help="model repository (default ./model_repository)")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="image files or folders (default: $BRAINSCAN_DATA/sartaj-classification/Testing)")
    parser.add_argument("--count", type=int, default=24, help="slices to cycle through (default 24)")
    parser.add_argument("--rounds", type=int, default=72, help="paired calls per model (default 72)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads in-process (default: all cores)")
    parser.add_argument("--triton-url", default=None, help="use this Triton (gRPC) instead of starting a local one")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return parser


def paired_calls(repository: Path, triton_url: str, images: list[bytes], *, threads: int, rounds: int) -> dict[str, Any]:
    """model → in-process and Triton p50, and the median / p90 of (Triton − in-process), in ms."""
    backend = open_backend(repository, threads)
    feeds: list[Feeds] = [model_inputs(backend, data) for data in images]

    async def run() -> dict[str, Any]:
        triton = TritonBackend(triton_url, repository)
        await triton.start()
        try:
            results = {}
            for model in backend.specs:
                local, remote = [], []
                for r in range(rounds + 2):  # the first two rounds warm up
                    feed = feeds[r % len(feeds)][model]
                    started = time.perf_counter()
                    backend.run_session(model, feed)
                    middle = time.perf_counter()
                    await triton.infer(model, feed)
                    if r >= 2:
                        local.append((middle - started) * 1000.0)
                        remote.append((time.perf_counter() - middle) * 1000.0)
                paired = added_latency({"floor": np.asarray(local), "triton": np.asarray(remote)}, "triton")
                results[model] = {
                    "in_process_p50_ms": round(float(np.median(local)), 3),
                    "triton_p50_ms": paired["p50_ms"],
                    "added_p50_ms": paired["added_p50_ms"],
                    "added_p90_ms": paired["added_p90_ms"],
                    "calls": rounds,
                }
            return results
        finally:
            await triton.close()

    try:
        return asyncio.run(run())
    finally:
        asyncio.run(backend.close())


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model | in-process p50 ms | Triton p50 ms | added p50 ms (paired) | added p90 ms |",
             "|---|---:|---:|---:|---:|"]
    for model, r in results.items():
        lines.append(f"| {model} | {r['in_process_p50_ms']:.2f} | {r['triton_p50_ms']:.2f} | "
                     f"{r['added_p50_ms']:.2f} | {r['added_p90_ms']:.2f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    repository = args.model_repository.resolve()
    images = [p.read_bytes() for p in find_images(args.images or [default_images()], args.count)]
    threads = args.threads or os.cpu_count() or 1
    if args.triton_url:
        results = paired_calls(repository, args.triton_url, images, threads=threads, rounds=args.rounds)
    else:
        from triton_local.runner import LocalTriton

        with LocalTriton(repository) as triton:
            results = paired_calls(repository, triton.grpc_url, images, threads=threads, rounds=args.rounds)
    print(markdown(results))
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
