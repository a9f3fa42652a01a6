"""Tiny random-weight models with the real contract, for plumbing tests.

They go through the same export code as the trained models (Keras → tf2onnx,
torchvision → torch.onnx), so tests exercise the real path; their answers mean
nothing.

Each model is written in its own process: importing TensorFlow and then
torchvision in one process segfaults with the pinned wheels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MODELS = ("classifier", "unet", "maskrcnn")


def write_tiny_model(repository: Path, model: str) -> None:
    if model == "maskrcnn":
        from export import export_maskrcnn

        export_maskrcnn.write_tiny(repository)
    else:
        from export import export_keras

        export_keras.write_tiny(repository, model)


def write_tiny_repository(repository: Path) -> Path:
    repository.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        result = subprocess.run(
            [sys.executable, "-m", "export.tiny", str(repository), "--model", model],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"writing tiny {model} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return repository


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a tiny random-weight model repository (plumbing only).")
    parser.add_argument("out", type=Path, help="folder to write the repository into")
    parser.add_argument("--model", choices=MODELS, help="write only this model (in this process)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.model:
        write_tiny_model(args.out, args.model)
    else:
        write_tiny_repository(args.out)
    print(f"tiny random-weight model(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
