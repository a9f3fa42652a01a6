"""`python -m bench triton`: perf_analyzer against each model on a Triton server.

Input data are real slices run through the gateway's own preprocessing
(brain crop → resize to the model's input size → normalize), written as
perf_analyzer's JSON input file. Each model is measured over a concurrency
range; the raw perf_analyzer CSVs, one combined `summary.csv` (throughput,
p50/p90/p95/p99 latency) and a Markdown `summary.md` land in --out.

Without --url a local Triton (`triton_local.runner.LocalTriton`) is started on
free loopback ports for the run. Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.config import PROJECT_ROOT
from gateway.contract import ModelSpec, load_repository
from gateway.errors import BrainscanError
from gateway.preprocessing import load_image_file, prepare

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
SUMMARY_FIELDS = ["model", "concurrency", "throughput_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms"]


class BenchError(BrainscanError):
    pass


@dataclass(frozen=True)
class BenchRow:
    model: str
    concurrency: int
    throughput_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float


def default_images() -> Path:
    root = Path(os.environ.get("BRAINSCAN_DATA", PROJECT_ROOT.parent / "shared" / "datasets"))
    return root / "sartaj-classification" / "Testing"


def find_images(paths: list[Path], count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted files under `paths` (files or folders)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            files.append(path)
    files = sorted(set(files))
    if not files:
        raise BenchError(
            f"no images (png/jpg/dcm) found in {[str(p) for p in paths]}; pass --images DIR or set BRAINSCAN_DATA"
        )
    picks = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    return [files[i] for i in sorted(set(picks.tolist()))]


def write_input_data(spec: ModelSpec, images: list[Path], path: Path) -> Path:
    """perf_analyzer JSON input file: each image preprocessed and laid out as the model's `image` input."""
    tensor = spec.input("image")
    size = spec.input_size
    shape = [size if d < 0 else d for d in tensor.dims]
    if int(np.prod(shape)) != size * size:
        raise BenchError(f"model {spec.name!r}: input 'image' dims {list(tensor.dims)} do not hold a {size}×{size} slice")
    entries = []
    for image in images:
        pixels = prepare(load_image_file(str(image)).pixels, size).tensor.reshape(shape).astype(tensor.dtype)
        entries.append({"image": {"b64": base64.b64encode(pixels.tobytes()).decode(), "shape": shape}})
    path.write_text(json.dumps({"data": entries}))
    return path


def perf_analyzer_binary() -> Path:
    candidate = Path(sys.prefix) / "bin" / "perf_analyzer"
    found = candidate if candidate.exists() else shutil.which("perf_analyzer")
    if not found:
        raise BenchError("perf_analyzer not found; it ships with tritonclient==2.51.0 (pip install tritonclient)")
    return Path(found)


def perf_analyzer_env() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on a CPU host: nvidia-cuda-runtime-cu12 provides it."""
    try:
        import nvidia.cuda_runtime
    except ImportError:
        raise BenchError("perf_analyzer needs libcudart.so.12: pip install nvidia-cuda-runtime-cu12") from None
    lib = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(lib), env.get("LD_LIBRARY_PATH", "")] if p)
    return env


def run_perf_analyzer(
    spec: ModelSpec, url: str, input_data: Path, out: Path, args: argparse.Namespace
) -> tuple[Path, str]:
    """Run perf_analyzer for one model; return its CSV and a warning ('' when all went well)."""
    csv_path = out / f"{spec.name}.csv"
    command = [
        str(perf_analyzer_binary()),
        "-m", spec.name,
        "-u", url,
        "-i", "grpc",
        "-b", str(args.batch_size if spec.max_batch_size > 0 else 1),
        "--concurrency-range", args.concurrency_range,
        "--input-data", str(input_data),
        "--measurement-interval", str(args.measurement_interval_ms),
        "--stability-percentage", str(args.stability_percentage),
        "--max-trials", str(args.max_trials),
        "-f", str(csv_path),
    ]  # fmt: skip
    log_path = out / f"{spec.name}.log"
    with open(log_path, "wb") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=perf_analyzer_env(), check=False)
    log_lines = log_path.read_text(errors="replace").splitlines()
    if not csv_path.exists() or not read_rows(spec.name, csv_path):
        tail = "\n".join(log_lines[-20:])
        hint = "\nhint: apt-get install -y libb64-0d" if "libb64" in tail else ""
        raise BenchError(f"perf_analyzer failed for model {spec.name!r} (exit {result.returncode}):\n{tail}{hint}")
    # perf_analyzer drops a concurrency level it cannot measure stably, sometimes still exiting 0
    unstable = sorted({int(m) for m in re.findall(r"stable measurement .* for concurrency (\d+)", "\n".join(log_lines))})
    problems = [f"no stable measurement at concurrency {unstable} (raise --measurement-interval-ms)"] if unstable else []
    if result.returncode != 0 and not unstable:
        problems.append(f"perf_analyzer exited {result.returncode}: {log_lines[-1].strip() if log_lines else ''}")
    return csv_path, f"{spec.name}: {'; '.join(problems)}" if problems else ""


def read_rows(model: str, csv_path: Path) -> list[BenchRow]:
    """perf_analyzer CSV (latencies in µs) → rows in ms."""
    with open(csv_path, newline="") as handle:
        return [
            BenchRow(
                model=model,
                concurrency=int(row["Concurrency"]),
                throughput_per_s=float(row["Inferences/Second"]),
                **{f"p{q}_ms": float(row[f"p{q} latency"]) / 1000 for q in (50, 90, 95, 99)},
            )
            for row in sorted(csv.DictReader(handle), key=lambda r: int(r["Concurrency"]))
        ]


def write_summary(rows: list[BenchRow], out: Path, header: str, warnings: list[str]) -> str:
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_FIELDS)
        for row in rows:
            writer.writerow([row.model, row.concurrency, *(f"{getattr(row, f):.2f}" for f in SUMMARY_FIELDS[2:])])
    lines = [
        header,
        "",
        "| model | concurrency | throughput (infer/s) | p50 (ms) | p99 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.model} | {r.concurrency} | {r.throughput_per_s:.1f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} |" for r in rows
    ]
    lines += [f"\nWarning: {warning}" for warning in warnings]
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    return table


def run(args: argparse.Namespace, url: str, specs: dict[str, ModelSpec]) -> str:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    images = find_images(args.images or [default_images()], args.num_images)
    rows: list[BenchRow] = []
    warnings: list[str] = []
    for name in args.models:
        spec = specs[name]
        data = write_input_data(spec, images, out / f"{name}-input.json")
        print(f"perf_analyzer: {name} at {url}, concurrency {args.concurrency_range}, {len(images)} slices", flush=True)
        try:
            csv_path, warning = run_perf_analyzer(spec, url, data, out, args)
        except BenchError as exc:  # one model's failure should not hide the others' numbers
            print(exc, file=sys.stderr)
            warnings.append(f"{name}: no result; see {out / (name + '.log')}")
            continue
        rows += read_rows(name, csv_path)
        warnings += [warning] if warning else []
    if not rows:
        raise BenchError(f"perf_analyzer measured nothing; logs in {out}")
    header = (
        f"perf_analyzer on Triton at {url}; batch size {args.batch_size}; {len(images)} real preprocessed slices; "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    return write_summary(rows, out, header, warnings)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench triton",
        description=(
            "Load-test each model on a Triton server with perf_analyzer, using real preprocessed slices. "
            "Research use only; not a medical device."
        ),
        add_help=add_help,
    )
    parser.add_argument("--url", help="Triton gRPC address host:port (default: start a local Triton for the run)")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(os.environ.get("BRAINSCAN_MODEL_REPOSITORY", PROJECT_ROOT / "model_repository")),
        help="model repository: the contract, and what a local Triton serves",
    )
    parser.add_argument("--models", nargs="+", default=["classifier", "unet", "maskrcnn"], help="models to measure")
    parser.add_argument(
        "--images", type=Path, nargs="+", help="image files or folders (default: $BRAINSCAN_DATA/sartaj-classification/Testing)"
    )
    parser.add_argument("--num-images", type=int, default=16, help="slices to use as input data (spread over the files)")
    parser.add_argument("--concurrency-range", default="1:4", help="start:end[:step] (default 1:4)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size for models that batch (default 1)")
    parser.add_argument("--measurement-interval-ms", type=int, default=5000, help="length of one measurement window")
    parser.add_argument("--stability-percentage", type=int, default=10, help="allowed spread between windows")
    parser.add_argument("--max-trials", type=int, default=10, help="windows tried before giving up on stability")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / f"bench-triton-{dt.datetime.now():%Y%m%d-%H%M%S}",
        help="output folder (CSV, logs, summary)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    from triton_local.runner import LocalTriton  # only needed without --url

    try:
        specs = load_repository(args.model_repository)
        unknown = sorted(set(args.models) - set(specs))
        if unknown:
            raise BenchError(f"unknown model(s) {unknown}; choose from {sorted(specs)}")
        if args.url:
            summary = run(args, args.url, specs)
        else:
            with LocalTriton(args.model_repository, models=sorted(set(args.models))) as triton:
                summary = run(args, triton.grpc_url, specs)
    except BrainscanError as exc:  # contract, start-up and perf_analyzer failures name their cause
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    print(summary)
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
