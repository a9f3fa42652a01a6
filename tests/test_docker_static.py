"""Static checks of the deployment files (no Docker engine here).

Every config.pbtxt must parse with Triton's own ModelConfig proto and suit the
NGC container's onnxruntime backend; compose.yaml and the Dockerfile must
reference paths and ports that exist. The Triton entrypoint script really runs
(with `echo` standing in for tritonserver).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCKER = PROJECT_ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile.gateway"
COMPOSE = DOCKER / "compose.yaml"
ENTRYPOINT = DOCKER / "triton-entrypoint.sh"
TENSORRT_BLOCK = DOCKER / "tensorrt-optimization.pbtxt"


def parse_strict(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def check_native_model(model_dir: Path, *, tensorrt_block: bool = True) -> mc.ModelConfig:
    config = parse_strict((model_dir / "config.pbtxt").read_text())
    assert config.name == model_dir.name
    assert config.backend == "onnxruntime" or config.platform == "onnxruntime_onnx", (
        f"{model_dir}: the NGC container serves these with the onnxruntime backend"
    )
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    assert versions and all((v / "model.onnx").is_file() for v in versions), f"{model_dir}: no <version>/model.onnx"
    for output in config.output:
        if output.label_filename:
            assert (model_dir / output.label_filename).is_file()
    if tensorrt_block:  # the TensorRT option (triton-entrypoint.sh) must still parse
        with_tensorrt = parse_strict((model_dir / "config.pbtxt").read_text() + TENSORRT_BLOCK.read_text())
        assert with_tensorrt.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    return config


def test_every_config_parses_with_tritons_model_config(tiny_repository: Path) -> None:
    canonical = sorted((PROJECT_ROOT / "model_repository").glob("*/config.pbtxt"))
    tiny = sorted(tiny_repository.glob("*/config.pbtxt"))
    assert {p.parent.name for p in tiny} >= {"classifier", "unet", "maskrcnn"}
    for config_path in canonical + tiny:
        check_native_model(config_path.parent)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_dockerfile_copies_existing_paths_and_pins_from_requirements() -> None:
    instructions = dockerfile_instructions()
    ignore = (DOCKER / "Dockerfile.gateway.dockerignore").read_text().splitlines()
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [args.split()[:-1] for instruction, args in instructions if instruction == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (PROJECT_ROOT / source).exists(), f"Dockerfile COPY {source}: no such path in the build context"
            assert source.rstrip("/") in included, f"{source} is excluded by Dockerfile.gateway.dockerignore"
    requirements = {
        re.split(r"[=<>\[ ]", line.strip(), maxsplit=1)[0].lower()
        for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    wanted = re.search(r"grep -E '\^\(([^)]+)\)", DOCKERFILE.read_text()).group(1).split("|")
    missing = sorted(set(wanted) - requirements)
    assert not missing, f"Dockerfile installs {missing}, which requirements.txt does not list"
    assert {"grpcio", "tritonclient", "onnxruntime"} <= set(wanted)
    exposed = [args for instruction, args in instructions if instruction == "EXPOSE"]
    assert exposed == [dockerfile_env()["BRAINSCAN_PORT"]]


def test_compose_references_existing_paths_and_matching_ports() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"triton", "gateway"}

    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).resolve().exists(), f"service {name}: volume source {source} does not exist"
            else:
                assert source in compose.get("volumes", {}), f"service {name}: named volume {source} is not declared"

    triton = services["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and triton["image"].endswith("-py3")
    mounted = {v.split(":")[1] for v in triton["volumes"]}
    assert triton["entrypoint"][-1] in mounted, "the entrypoint script is not mounted into the container"
    assert triton["environment"]["TRITON_MODEL_SOURCE"] in mounted
    assert "/opt/brainscan/tensorrt-optimization.pbtxt" in mounted  # the script's default block path
    triton_ports = {int(p.rsplit(":", 1)[1]) for p in triton["ports"]}
    assert triton_ports == {8000, 8001, 8002}  # tritonserver's defaults: HTTP, gRPC, metrics
    assert "8000" in " ".join(triton["healthcheck"]["test"])
    gpu = triton["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]

    gateway = services["gateway"]
    build = gateway["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    env = gateway["environment"]
    host, port = env["BRAINSCAN_TRITON_URL"].split(":")
    assert host == "triton" and int(port) == 8001, "the gateway must reach Triton's gRPC port by service name"
    gateway_ports = {int(p.rsplit(":", 1)[1]) for p in gateway["ports"]}
    assert gateway_ports == {int(env["BRAINSCAN_PORT"])} == {int(dockerfile_env()["BRAINSCAN_PORT"])}
    assert env["BRAINSCAN_MODEL_REPOSITORY"] in {v.split(":")[1] for v in gateway["volumes"]}
    assert gateway["depends_on"]["triton"]["condition"] == "service_healthy"
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s["ports"])


def run_entrypoint(tmp_path: Path, source: Path, accelerator: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TRITONSERVER": "echo",
        "TRITON_ACCELERATOR": accelerator,
        "TRITON_MODEL_SOURCE": str(source),
        "TRITON_MODEL_DIR": str(tmp_path / "models"),
        "TRITON_TENSORRT_BLOCK": str(TENSORRT_BLOCK),
    }
    return subprocess.run(["bash", str(ENTRYPOINT), "--log-verbose=0"], env=env, capture_output=True, text=True, timeout=60)


def test_entrypoint_serves_a_tensorrt_variant_without_touching_the_repository(
    tiny_repository: Path, tmp_path: Path
) -> None:
    plain = run_entrypoint(tmp_path, tiny_repository, "none")
    assert plain.returncode == 0, plain.stderr
    assert f"--model-repository={tiny_repository} " in plain.stdout and "--log-verbose=0" in plain.stdout

    before = {p: p.read_text() for p in tiny_repository.glob("*/config.pbtxt")}
    result = run_entrypoint(tmp_path, tiny_repository, "tensorrt")
    assert result.returncode == 0, result.stderr
    assert f"--model-repository={tmp_path / 'models'} " in result.stdout
    for original, text in before.items():
        assert original.read_text() == text
        variant = tmp_path / "models" / original.parent.name
        config = check_native_model(variant, tensorrt_block=False)
        native = parse_strict(text)
        assert config.input == native.input and config.output == native.output
        assert config.max_batch_size == native.max_batch_size
        assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"

    wrong = run_entrypoint(tmp_path, tiny_repository, "tensorflow")
    assert wrong.returncode == 2 and "TRITON_ACCELERATOR must be" in wrong.stderr


@pytest.mark.parametrize("script", [ENTRYPOINT])
def test_shell_scripts_have_valid_syntax(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def dockerfile_copies() -> list[tuple[str, str]]:
    """(source, destination under WORKDIR) of every COPY."""
    pairs = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            *sources, destination = args.split()
            pairs += [(source, destination) for source in sources]
    return pairs


def test_the_gateway_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """Every package pyproject.toml lists must be copied into the image, or `pip install .` fails there."""
    import shutil
    import sys
    import tomllib
    import zipfile

    context = tmp_path / "app"
    context.mkdir()
    for source, destination in dockerfile_copies():
        target = context / destination
        if (PROJECT_ROOT / source).is_dir():
            shutil.copytree(PROJECT_ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(PROJECT_ROOT / source, target)
    project = tomllib.loads((context / "pyproject.toml").read_text())
    package_dirs = project["tool"]["setuptools"].get("package-dir", {})
    for package in project["tool"]["setuptools"]["packages"]:
        top, *rest = package.split(".")
        folder = Path(package_dirs.get(top, top), *rest)
        assert (context / folder / "__init__.py").is_file(), f"pyproject.toml lists {package}; the Dockerfile does not copy {folder}"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(context)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("brainscan-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {"gateway/server.py", "gateway/backends/triton.py", "brainscan_proto/v1/brainscan_pb2_grpc.py"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "brainscan-server = gateway.cli:main" in archive.read(entry_points).decode()
    assert dockerfile_instructions()[-1] == ("CMD", '["brainscan-server"]')
