"""Write a perf_analyzer `--input-data` JSON for the gateway's `brainscan_pipeline` model.

KServe sends BYTES tensors raw as length-prefixed elements, and perf_analyzer
passes a b64 value through as those raw bytes, so each image is stored as
base64(4-byte little-endian length + encoded image).

    python -m bench.perf_input perf-input.json --count 16
    perf_analyzer -m brainscan_pipeline -u 127.0.0.1:50051 -i grpc --input-data perf-input.json ...

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from gateway.kserve import serialize_bytes
from bench.triton_perf import default_images, find_images


def write_input_data(images: list[Path], path: Path) -> Path:
    steps = [{"IMAGE": {"b64": base64.b64encode(serialize_bytes([p.read_bytes()])).decode("ascii")}} for p in images]
    path.write_text(json.dumps({"data": steps}))
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="perf_analyzer input data for brainscan_pipeline (real slices).")
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--images", type=Path, nargs="+", default=None,
                        help="image files or folders (default: $BRAINSCAN_DATA/sartaj-classification/Testing)")
    parser.add_argument("--count", type=int, default=16, help="slices to include (default 16)")
    return parser


def main(args: argparse.Namespace) -> int:
    images = find_images(args.images or [default_images()], args.count)
    write_input_data(images, args.out)
    print(f"wrote {len(images)} slices to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
