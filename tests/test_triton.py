"""Local Triton (shim repository + real tritonserver), the Triton backend, and the bench.

Everything runs real processes on loopback ports: tritonserver from
nvidia-pytriton, tritonclient over gRPC, perf_analyzer. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.backends.triton import TritonBackend
from gateway.contract import CONFIG_FILE, MODEL_FILE, load_repository, parse_config
from gateway.errors import BackendUnavailable, ContractError
from gateway.request_clock import deadline_after
from triton_local.runner import LocalTriton, TritonStartupError, build_shim_repository, diagnose, shim_config
from tests.conftest import slice_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run(coroutine):
    return asyncio.run(coroutine)


def model_inputs(spec, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    """Random inputs laid out as the contract says (variable dims at the model's input size)."""
    size = spec.input_size
    inputs = {}
    for tensor in spec.inputs:
        dims = [size if d < 0 else d for d in tensor.dims]
        shape = ([batch] if spec.max_batch_size > 0 else []) + dims
        inputs[tensor.name] = rng.random(shape, dtype=np.float32).astype(tensor.dtype)
    return inputs


def copy_repository(source: Path, destination: Path) -> Path:
    """Configs and labels copied, ONNX files linked (cheap, and editable without touching the source)."""
    shutil.copytree(source, destination, copy_function=os.symlink, dirs_exist_ok=True)
    for config in destination.glob(f"*/{CONFIG_FILE}"):
        text = config.read_text()
        config.unlink()
        config.write_text(text)
    return destination


# --- shim repository (no server) ------------------------------------------


def test_shim_repository_keeps_the_contract(tiny_repository: Path, tmp_path: Path) -> None:
    names = build_shim_repository(tiny_repository, tmp_path)
    assert set(names) >= {"classifier", "unet", "maskrcnn"}
    for name in names:
        original = parse_config(tiny_repository / name / CONFIG_FILE)
        shim = parse_config(tmp_path / name / CONFIG_FILE)
        assert shim.backend == "python" and shim.platform == ""
        for field in ("name", "input", "output", "max_batch_size", "dynamic_batching", "instance_group", "parameters"):
            assert getattr(shim, field) == getattr(original, field), (name, field)
        version = tmp_path / name / "1"
        assert (version / "model.py").is_file()
        assert (version / MODEL_FILE).resolve() == (tiny_repository / name / "1" / MODEL_FILE).resolve()
    # labels travel with the classifier; the canonical repository is untouched
    assert (tmp_path / "classifier" / "labels.txt").read_text() == (tiny_repository / "classifier" / "labels.txt").read_text()
    assert parse_config(tiny_repository / "unet" / CONFIG_FILE).backend == "onnxruntime"


def test_shim_config_moves_gpu_instances_to_cpu_only_without_gpus() -> None:
    config = text_format.Parse(
        'name: "unet" platform: "onnxruntime_onnx" max_batch_size: 8 '
        'instance_group { count: 2 kind: KIND_GPU gpus: 0 } '
        'optimization { execution_accelerators { gpu_execution_accelerator { name: "tensorrt" } } }',
        mc.ModelConfig(),
    )
    cpu = shim_config(config, gpu_available=False)
    assert cpu.backend == "python" and not cpu.platform
    assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and cpu.instance_group[0].count == 2
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator
    gpu = shim_config(config, gpu_available=True)
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and list(gpu.instance_group[0].gpus) == [0]


def test_shim_config_fills_thread_count_only_where_the_config_leaves_it_out() -> None:
    bare = text_format.Parse('name: "unet" platform: "onnxruntime_onnx"', mc.ModelConfig())
    assert shim_config(bare, gpu_available=False, intra_op_threads=4).parameters["intra_op_thread_count"].string_value == "4"
    assert "intra_op_thread_count" not in shim_config(bare, gpu_available=False).parameters
    pinned = text_format.Parse(
        'name: "unet" parameters { key: "intra_op_thread_count" value { string_value: "1" } }', mc.ModelConfig()
    )
    assert shim_config(pinned, gpu_available=False, intra_op_threads=4).parameters["intra_op_thread_count"].string_value == "1"


@pytest.mark.parametrize(
    ("log_line", "cause"),
    [  # lines as tritonserver 2.51 writes them
        ('E1123 09:17:07.713606 11978 main.cc:257] "failed to start HTTP service: Unavailable - '
         "Socket '127.0.0.1:59031' already in use \"", "address 127.0.0.1:59031 already in use"),
        ("tritonserver: error while loading shared libraries: libb64.so.0d: cannot open shared object file",
         "missing shared library: libb64.so.0d: cannot open shared object file"),
        ('E1123 09:13:50.788290 8906 model_lifecycle.cc:642] "failed to load \'unet\' version 1: Internal: '
         'InvalidProtobuf: Protobuf parsing failed.\\n\\nAt:\\n  model.py(56): initialize\\n"',
         "model 'unet' failed to load: Internal: InvalidProtobuf: Protobuf parsing failed."),
    ],
)  # fmt: skip
def test_diagnose_names_the_cause(log_line: str, cause: str) -> None:
    harmless = 'E1123 09:13:35.213429 8429 server.cc:241] "CudaDriverHelper has not been initialized."\n'
    assert diagnose(harmless + log_line + "\n") == cause


# --- the server ------------------------------------------------------------


def test_server_is_ready_on_loopback_with_every_model(running_triton: LocalTriton, tiny_repository: Path) -> None:
    host, port = running_triton.grpc_url.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    for name in load_repository(tiny_repository):
        with urllib.request.urlopen(f"{running_triton.http_url}/v2/models/{name}/ready", timeout=5) as reply:
            assert reply.status == 200


def test_start_fails_fast_when_the_port_is_taken(tiny_repository: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = LocalTriton(tiny_repository, grpc_port=port)
        started = time.monotonic()
        with pytest.raises(TritonStartupError, match=rf"grpc port {port} .*already in use"):
            server.start()
        server.close()
    assert time.monotonic() - started < 10


def test_start_fails_naming_a_model_that_cannot_load(tiny_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(tiny_repository, tmp_path / "repo")
    broken = repository / "unet" / "1" / MODEL_FILE
    broken.unlink()
    broken.write_bytes(b"this is not an ONNX file")
    server = LocalTriton(repository, models=["classifier", "unet"], startup_timeout_s=120)
    with pytest.raises(TritonStartupError) as failure:
        server.start()
    server.close()
    message = str(failure.value)
    assert "model 'unet' failed to load" in message.splitlines()[0], message
    assert "--- last lines of" in message  # the log tail comes with it
    assert not server.is_running()


def test_cli_runs_until_sigterm_and_stops_cleanly(tiny_repository: Path, tmp_path: Path) -> None:
    log = tmp_path / "triton-cli.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "triton_local", "--model-repository", str(tiny_repository),
             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Triton ready" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "Triton ready" in log.read_text(), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    shim_dir = log.read_text().split("log ")[-1].split("tritonserver.log")[0]
    assert not Path(shim_dir).exists(), "temporary shim repository was not removed"


# --- the Triton backend ----------------------------------------------------


def test_backend_matches_onnxruntime(running_triton: LocalTriton, tiny_repository: Path) -> None:
    rng = np.random.default_rng(7)

    async def check() -> None:
        backend = TritonBackend(running_triton.grpc_url, tiny_repository)
        await backend.start()
        try:
            assert backend.kind == "triton" and await backend.is_ready()
            for role, spec in backend.specs.items():
                inputs = model_inputs(spec, rng)
                served = await backend.infer(role, inputs, deadline=deadline_after(60))
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                session = ort.InferenceSession(str(spec.onnx_path), options, providers=["CPUExecutionProvider"])
                names = [t.name for t in spec.outputs]
                reference = dict(zip(names, session.run(names, inputs)))
                assert set(served) == set(names)
                for name in names:
                    assert served[name].dtype == spec.output(name).dtype
                    assert served[name].shape == reference[name].shape, (role, name)
                    np.testing.assert_allclose(served[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=f"{role}.{name}")
        finally:
            await backend.close()

    run(check())


def test_backend_names_expected_and_actual_on_bad_input(running_triton: LocalTriton, tiny_repository: Path) -> None:
    async def check() -> None:
        backend = TritonBackend(running_triton.grpc_url, tiny_repository)
        await backend.start()
        try:
            spec = backend.specs["unet"]
            good = model_inputs(spec, np.random.default_rng(0), batch=1)["image"]
            with pytest.raises(ContractError, match=r"'unet' input 'image': expected FP32 .*got float64"):
                await backend.infer("unet", {"image": good.astype(np.float64)})
            with pytest.raises(ContractError, match=r"expected shape \[-1, .*got \[1, 3"):
                await backend.infer("unet", {"image": good[:, :3]})
            with pytest.raises(ContractError, match="is missing"):
                await backend.infer("unet", {})
        finally:
            await backend.close()

    run(check())


def test_backend_refuses_a_repository_that_differs_from_what_triton_serves(
    running_triton: LocalTriton, tiny_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(tiny_repository, tmp_path / "repo")
    config_path = repository / "unet" / CONFIG_FILE
    config = parse_config(config_path)
    served_batch = config.max_batch_size
    config.max_batch_size = served_batch + 1
    config_path.write_text(text_format.MessageToString(config))

    async def check() -> None:
        backend = TritonBackend(running_triton.grpc_url, repository)
        try:
            with pytest.raises(ContractError, match=rf"'unet'.*max_batch_size {served_batch + 1}, Triton serves {served_batch}"):
                await backend.start()
        finally:
            await backend.close()

    run(check())


def test_backend_start_reports_unreachable_triton(tiny_repository: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    async def check() -> None:
        backend = TritonBackend(f"127.0.0.1:{port}", tiny_repository, startup_wait_s=0.5)
        try:
            with pytest.raises(BackendUnavailable, match=rf"127.0.0.1:{port} is not ready"):
                await backend.start()
            assert not await backend.is_ready()
        finally:
            await backend.close()

    run(check())


def test_health_flips_while_triton_is_down_and_back(running_triton: LocalTriton, tiny_repository: Path) -> None:
    async def check() -> None:
        backend = TritonBackend(running_triton.grpc_url, tiny_repository, max_retries=2, backoff_s=0.05)
        await backend.start()
        spec = backend.specs["classifier"]
        inputs = model_inputs(spec, np.random.default_rng(1), batch=1)
        url = running_triton.grpc_url
        try:
            before = await backend.infer("classifier", inputs, deadline=deadline_after(30))
            running_triton.stop()
            assert not await backend.is_ready()
            with pytest.raises(BackendUnavailable, match=r"'classifier' .*unavailable after 3 attempt"):
                await backend.infer("classifier", inputs, deadline=deadline_after(10))
            running_triton.start()  # same ports
            assert running_triton.grpc_url == url
            deadline = time.monotonic() + 30
            while not await backend.is_ready():
                assert time.monotonic() < deadline, "backend did not report ready after Triton returned"
                await asyncio.sleep(0.2)
            after = await backend.infer("classifier", inputs, deadline=deadline_after(30))
            np.testing.assert_allclose(after["probabilities"], before["probabilities"], rtol=1e-6)
        finally:
            await backend.close()
            if not running_triton.is_running():
                running_triton.start()

    run(check())


# --- bench -----------------------------------------------------------------


def test_bench_smoke(running_triton: LocalTriton, tiny_repository: Path, tmp_path: Path) -> None:
    from bench import triton_perf

    images = slice_folder(tmp_path / "images", 3, 200)
    out = tmp_path / "bench"
    args = triton_perf.get_args_parser().parse_args(
        ["--url", running_triton.grpc_url, "--model-repository", str(tiny_repository), "--models", "classifier",
         "--images", str(images), "--concurrency-range", "1:2", "--measurement-interval-ms", "300",
         "--stability-percentage", "1000", "--max-trials", "5", "--out", str(out)]
    )  # fmt: skip
    assert triton_perf.main(args) == 0
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["concurrency"]) for r in rows] == [("classifier", "1"), ("classifier", "2")]
    assert all(float(r["throughput_per_s"]) > 0 and float(r["p99_ms"]) >= float(r["p50_ms"]) > 0 for r in rows)
    assert "| classifier | 1 |" in (out / "summary.md").read_text()


def test_pipeline_bench_pairs_the_triton_gateway(running_triton: LocalTriton, tiny_repository: Path, tmp_path: Path) -> None:
    """`bench.pipeline` measures the Triton gateway's concurrency-1 added latency paired, like the embedded one's."""
    images = slice_folder(tmp_path / "images", 3, 224)
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "bench.pipeline", "--quick", "--systems", "floor,triton", "--concurrency", "1",
        "--triton-url", running_triton.grpc_url, "--model-repository", str(tiny_repository),
        "--images", str(images), "--out", str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [written] = list(out.glob("*.json"))
    data = json.loads(written.read_text())
    paired = data["paired_c1"]["triton"]
    assert paired["pairs"] == 8 and paired["floor_p50_ms"] > 0 and paired["gateway_p50_ms"] > 0
    assert data["targets"]["triton.added_p50_ms_c1"]["value"] == paired["added_p50_ms"]
    assert "Paired at concurrency 1 (gateway, local Triton" in result.stdout


def test_triton_calls_bench_reports_each_models_paired_cost(running_triton: LocalTriton, tiny_repository: Path, tmp_path: Path) -> None:
    """`python -m bench triton-calls` times every model in-process and through Triton, turn about."""
    images = slice_folder(tmp_path / "images", 2, 200)
    out = tmp_path / "calls.json"
    command = [
        sys.executable, "-m", "bench", "triton-calls", "--triton-url", running_triton.grpc_url,
        "--model-repository", str(tiny_repository), "--images", str(images), "--rounds", "4", "--out", str(out),
    ]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"classifier", "unet", "maskrcnn"}
    for row in data.values():
        assert row["calls"] == 4 and row["in_process_p50_ms"] > 0 and row["triton_p50_ms"] > 0
        assert row["added_p90_ms"] >= row["added_p50_ms"]
    assert "| maskrcnn |" in result.stdout
