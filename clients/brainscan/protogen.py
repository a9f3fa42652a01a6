"""Generates the Python gRPC code for proto/brainscan/v1 (committed; a test fails when stale).

    python -m brainscan.protogen            # regenerate in place
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
OUTPUT_ROOT = Path(__file__).resolve().parents[1]  # clients/
PROTO_FILES = ("brainscan/v1/brainscan.proto",)
GENERATED = ("brainscan_pb2.py", "brainscan_pb2.pyi", "brainscan_pb2_grpc.py")


def generate(output_root: Path) -> list[Path]:
    from grpc_tools import protoc

    for proto in PROTO_FILES:
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={output_root}",
                f"--pyi_out={output_root}",
                f"--grpc_python_out={output_root}",
                str(PROTO_ROOT / proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} (exit {code})")
    return [output_root / "brainscan" / "v1" / name for name in GENERATED]


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = OUTPUT_ROOT / "brainscan" / "v1" / path.name
            if not committed.is_file() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
        return stale


if __name__ == "__main__":
    for path in generate(OUTPUT_ROOT):
        print(f"wrote {path}")
    sys.exit(0)
