"""`python -m bench series` / `python -m bench.series`: one DICOM series end to end.

A 24-slice 512×512 MR series (real Testing slices, by default, resized and
stored as 12-bit DICOM with positions 5 mm apart) goes through the gateway's
AnalyzeSeries from the SDK: files read, sent, analyzed slice by slice,
ordered and summarized, and in the last mode a DICOM SEG written. Prints the
time per series and per slice (median and spread over --rounds) for

- gated:          the default request (U-Net / Mask R-CNN only where the classifier sees a tumor)
- ungated:        all three models on every slice
- ungated + SEG:  the same plus the DICOM SEG

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import processes
from bench.dicom_series import mr_series
from bench.report import write_json
from brainscan import Client
from gateway.config import PROJECT_ROOT
from gateway.preprocessing import load_image_file
from bench.triton_perf import default_images, find_images

MODES = {"gated": {"gate": True}, "ungated": {"gate": False}, "ungated + SEG": {"gate": False, "dicom_seg": True}}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one DICOM series through AnalyzeSeries, per series and per slice "
                    "(research use only; not a medical device).")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository",
                        help="model repository to serve (default ./model_repository)")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="slices to build the series from (default: $BRAINSCAN_DATA/sartaj-classification/Testing)")
    parser.add_argument("--slices", type=int, default=24, help="slices in the series (default 24)")
    parser.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512)")
    parser.add_argument("--rounds", type=int, default=5, help="timed series per mode, after one warm-up (default 5)")
    parser.add_argument("--server", default=None, help="use this running gateway instead of starting one")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    return parser


def write_series(folder: Path, images: list[Path], size: int) -> list[Path]:
    """The slices as one MR series (12-bit, 0.5 mm pixels, 5 mm apart), one file each."""
    stack = np.stack([
        np.round(cv2.resize(load_image_file(str(p)).pixels, (size, size), interpolation=cv2.INTER_AREA) * 4095)
        .astype(np.uint16)
        for p in images
    ])
    paths = []
    for index, data in enumerate(mr_series(stack, spacing=(0.5, 0.5))):
        path = folder / f"slice-{index:03d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def measure(address: str, folder: Path, rounds: int, slices: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Client(address, timeout_s=60.0) as client:
        for mode, options in MODES.items():
            client.analyze_series(folder, **options)  # warm-up
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                analysis = client.analyze_series(folder, **options)
                times.append((time.perf_counter() - started) * 1000.0)
            (series,) = analysis.series
            assert len(series.slices) == slices and (not options.get("dicom_seg") or series.dicom_seg)
            median = statistics.median(times)
            results[mode] = {
                "series_ms_p50": round(median, 1),
                "series_ms_min": round(min(times), 1),
                "series_ms_max": round(max(times), 1),
                "slice_ms_p50": round(median / slices, 2),
                "tumor_slices": len(series.tumor_slices),
                "seg_kb": round(len(series.dicom_seg) / 1024, 1) if series.dicom_seg else None,
            }
    return results


def main(args: argparse.Namespace) -> int:
    images = find_images(args.images or [default_images()], args.slices)
    if len(images) < args.slices:
        print(f"bench series: only {len(images)} slices found; need {args.slices}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-series-") as tmp:
        work = Path(tmp)
        folder = work / "series"
        folder.mkdir()
        paths = write_series(folder, images[: args.slices], args.size)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"series: {args.slices} slices of {args.size}×{args.size} (12-bit, {megabytes:.1f} MiB); "
              f"{args.rounds} rounds per mode", flush=True)
        if args.server:
            results = measure(args.server, folder, args.rounds, args.slices)
        else:
            with processes.gateway(args.model_repository.resolve(), work) as address:
                results = measure(address, folder, args.rounds, args.slices)
    print("| mode | series p50 ms (min–max) | per slice ms | tumor slices | SEG KiB |\n|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['series_ms_p50']} ({r['series_ms_min']}–{r['series_ms_max']}) | {r['slice_ms_p50']} "
              f"| {r['tumor_slices']}/{args.slices} | {r['seg_kb'] or '—'} |")
    if args.out:
        write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
