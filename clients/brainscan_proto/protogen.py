"""Generates the Python gRPC code for proto/brainscan/v1 (committed; a test fails when stale).

    python -m brainscan_proto.protogen      # regenerate in place (`make proto`)

protoc names Python modules after the .proto's path (brainscan/v1/...); the code
lives in the brainscan_proto package so that the SDK's name stays free, and the
one import between the generated modules is pointed there. The descriptor keeps
the .proto's own name (brainscan/v1/brainscan.proto), as every other language sees it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent  # clients/brainscan_proto
PROTO_ROOT = PACKAGE_ROOT.parents[1] / "proto"
PROTO_FILES = ("brainscan/v1/brainscan.proto",)
GENERATED = ("brainscan_pb2.py", "brainscan_pb2.pyi", "brainscan_pb2_grpc.py")


def generate(target: Path) -> list[Path]:
    """Write the generated files into target/v1/ and return their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        for proto in PROTO_FILES:
            code = protoc.main(
                [
                    "protoc",
                    f"-I{PROTO_ROOT}",
                    f"--python_out={tmp}",
                    f"--pyi_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(PROTO_ROOT / proto),
                ]
            )
            if code != 0:
                raise RuntimeError(f"protoc failed on {proto} (exit {code})")
        (target / "v1").mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "brainscan" / "v1" / name).read_text()
            path = target / "v1" / name
            path.write_text(text.replace("from brainscan.v1 import", "from brainscan_proto.v1 import"))
            written.append(path)
        return written


def stale_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        return [
            path.name
            for path in generate(Path(tmp))
            if not (committed := PACKAGE_ROOT / "v1" / path.name).is_file() or committed.read_bytes() != path.read_bytes()
        ]


if __name__ == "__main__":
    for path in generate(PACKAGE_ROOT):
        print(f"wrote {path}")
    sys.exit(0)
