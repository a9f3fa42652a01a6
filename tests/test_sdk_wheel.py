"""The SDK as an integrator gets it: its own wheel (clients/pyproject.toml), installed into a
fresh virtual environment with nothing else, analyzing a slice against a real gateway."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import PROJECT_ROOT, png_bytes, synthetic_slice

CLIENT_DEPENDENCIES = {"grpcio", "protobuf", "numpy", "pillow"}
OPTIONAL = {"pydicom", "fastapi", "uvicorn"}  # the [dicom] and [web] extras


def build_wheel(out: Path) -> Path:
    """Built from a copy, so that the checkout gets no build/ or egg-info."""
    source = out / "source"
    shutil.copytree(PROJECT_ROOT / "clients", source, ignore=shutil.ignore_patterns("node", "__pycache__", "*.egg-info", "build"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = out.glob("brainscan_client-*.whl")
    return wheel


def test_sdk_wheel_holds_the_client_only(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"brainscan", "brainscan_proto", "brainscan_web"}
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    plain = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in required if "extra ==" not in r}
    extras = {r.split(">")[0].split(";")[0].strip().lower() for r in required if "extra ==" in r}
    assert plain == CLIENT_DEPENDENCIES and extras <= OPTIONAL


def test_sdk_wheel_alone_in_a_fresh_venv_analyzes_against_a_real_gateway(embedded_gateway, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, command = venv / "bin" / "python", venv / "bin" / "brainscan"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    installed = {row["name"].lower().replace("_", "-") for row in json.loads(listed.stdout)} - {"pip", "setuptools"}
    assert installed - {"typing-extensions"} == CLIENT_DEPENDENCIES | {"brainscan-client"}  # (grpcio needs typing-extensions)

    image = tmp_path / "slice.png"
    image.write_bytes(png_bytes(synthetic_slice(240, seed=3)))
    # cwd outside the checkout: nothing of the server, the exporters or the benches can be found
    done = subprocess.run(
        [str(command), "analyze", str(image), "--server", embedded_gateway.address, "--json", "--ungated",
         "--overlay", str(tmp_path / "overlays")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[0])
    assert result["label"] and 0.0 <= result["tumor_probability"] <= 1.0
    assert (tmp_path / "overlays" / "slice.overlay.png").is_file()
    info = subprocess.run([str(command), "info", "--server", embedded_gateway.address], capture_output=True, text=True, cwd=tmp_path)
    assert info.returncode == 0 and "classifier" in info.stdout, info.stderr
    for server_side in ("gateway", "export", "bench", "cv2", "onnxruntime"):
        probe = subprocess.run([str(python), "-c", f"import {server_side}"], capture_output=True, cwd=tmp_path)
        assert probe.returncode != 0, f"{server_side} is importable next to the SDK"
