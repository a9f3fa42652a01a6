"""`python -m bench ab` / `python -m bench.ab --baseline REV`: this checkout's gateway
against another revision's, side by side in one run.

On a shared machine the speed drifts between minutes by more than a code
change moves it, so two separate bench runs cannot settle an A/B. Here both
gateways (same backend, same models, same slices) run at once; with
`--backend triton` each build also gets its own local Triton:

- concurrency 1: floor, this build and the baseline take turns on the same
  slice (the order rotates), and the medians of the per-slice differences
  to the floor are reported;
- a higher concurrency (default 16): short windows alternate between the two
  builds (A B A B ...), and each build's images/s is the median of its windows.

The baseline revision is checked out into a temporary `git worktree`, with
this checkout's models, and runs on this virtual environment.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import processes
from bench.load import GrpcAnalyze, closed_loop
from bench.paired import added_latency, alternating_calls
from bench.report import write_json
from gateway.config import PROJECT_ROOT
from bench.triton_perf import default_images, find_images


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="A/B the gateway of this checkout against a git revision's, interleaved in one run "
        "(research use only; not a medical device).",
    )
    parser.add_argument("--baseline", required=True, help="git revision to compare against (e.g. HEAD~1, a tag, a hash)")
    parser.add_argument("--backend", choices=("embedded", "triton"), default="embedded",
                        help="gateway backend for both builds (default embedded)")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository",
                        help="model repository both builds serve (default ./model_repository)")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="image files or folders (default: $BRAINSCAN_DATA/sartaj-classification/Testing)")
    parser.add_argument("--count", type=int, default=24, help="slices to cycle through (default 24)")
    parser.add_argument("--rounds", type=int, default=60, help="concurrency-1 rounds of floor + both builds (default 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="load for the throughput windows (default 16)")
    parser.add_argument("--windows", type=int, default=4, help="throughput windows per build (default 4)")
    parser.add_argument("--window-s", type=float, default=8.0, help="seconds per window (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return parser


@contextlib.contextmanager
def baseline_checkout(revision: str) -> Iterator[Path]:
    """The revision's tree in a temporary git worktree, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="brainscan-ab-"))
    tree = folder / "tree"
    subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", "-q", str(tree), revision], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def interleaved_c1(repository: Path, addresses: dict[str, str], images: list[bytes], rounds: int) -> dict[str, Any]:
    """Per build: median over rounds of (build − floor) on the same slice, and each side's p50."""
    times = alternating_calls(repository, addresses, images, threads=os.cpu_count() or 1, rounds=rounds, warmup=3,
                              rotate=True)
    out: dict[str, Any] = {"rounds": rounds, "floor_p50_ms": round(float(np.median(times["floor"])), 3)}
    for name in addresses:
        out[name] = added_latency(times, name)
    return out


def alternating_throughput(addresses: dict[str, str], images: list[bytes], concurrency: int,
                           windows: int, window_s: float) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        clients = {name: GrpcAnalyze(address, images) for name, address in addresses.items()}
        rates: dict[str, list[float]] = {name: [] for name in addresses}
        try:
            for _ in range(windows):
                for name, client in clients.items():
                    result = await closed_loop(client, items=len(images), concurrency=concurrency,
                                               warmup_s=1.5, duration_s=window_s)
                    rates[name].append(round(result.completed / result.duration_s, 3))
        finally:
            for client in clients.values():
                await client.close()
        return {name: {"windows_per_s": r, "median_per_s": round(float(np.median(r)), 3)} for name, r in rates.items()}

    return asyncio.run(run())


def main(args: argparse.Namespace) -> int:
    known = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "--verify", "--quiet", f"{args.baseline}^{{commit}}"],
                           capture_output=True, text=True)
    if known.returncode != 0:
        print(f"bench ab: {args.baseline!r} is not a commit of this repository (try HEAD~1, a tag or a hash)",
              file=sys.stderr)
        return 2
    repository = args.model_repository.resolve()
    images = [p.read_bytes() for p in find_images(args.images or [default_images()], args.count)]
    threads = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="brainscan-ab-") as folder, baseline_checkout(args.baseline) as tree, \
            contextlib.ExitStack() as servers:
        workdir = Path(folder)
        addresses = {}
        for name, code in (("this", None), ("baseline", tree)):
            (workdir / name).mkdir()
            env = {"BRAINSCAN_ORT_THREADS": threads}
            if code is not None:
                env["PYTHONPATH"] = f"{code}{os.pathsep}{code / 'clients'}"
            triton_url = None
            if args.backend == "triton":
                triton_url = servers.enter_context(processes.local_triton(repository, workdir / name, cwd=code))
            addresses[name] = servers.enter_context(processes.gateway(
                repository, workdir / name, backend=args.backend, triton_url=triton_url, env=env, cwd=code))
        print(f"concurrency 1: {args.rounds} rounds of floor, this, baseline ({args.baseline})", flush=True)
        c1 = interleaved_c1(repository, addresses, images, args.rounds)
        print(f"concurrency {args.concurrency}: {args.windows} windows of {args.window_s:.0f} s per build", flush=True)
        load = alternating_throughput(addresses, images, args.concurrency, args.windows, args.window_s)
    result = {"baseline": args.baseline, "backend": args.backend, "concurrency_1": c1, f"concurrency_{args.concurrency}": load}
    print(f"\nbackend: {args.backend}\n| build | c1 p50 ms | added p50 ms (paired) | added p90 ms | c{args.concurrency} images/s (median) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| floor: ORT only | {c1['floor_p50_ms']:.1f} | 0.0 | 0.0 | |")
    for name in ("this", "baseline"):
        label = "this checkout" if name == "this" else f"baseline {args.baseline}"
        print(f"| {label} | {c1[name]['p50_ms']:.1f} | {c1[name]['added_p50_ms']:.1f} | {c1[name]['added_p90_ms']:.1f} "
              f"| {load[name]['median_per_s']:.2f} |")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
