"""A real Triton server on this machine: `python -m triton_local`.

The tritonserver binary bundled in `nvidia-pytriton` has no ONNX Runtime
backend, so `LocalTriton` builds, in a temporary folder, a shim repository over
the canonical `model_repository/`: every model keeps its name, tensors, dims,
batching and instance groups, but runs through the Python backend with
`triton_local/shim_model.py` as its `model.py` (ONNX Runtime inside). The
canonical repository is never modified; it keeps the native onnxruntime
configs that the NGC container (docker/) uses.

    with LocalTriton(Path("model_repository")) as triton:   # free loopback ports
        client = InferenceServerClient(triton.grpc_url)

Start-up fails fast with `TritonStartupError`, whose message names the cause
(port taken, a model that failed to load, a missing library) and ends with the
tail of the server log.

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.contract import CONFIG_FILE, MODEL_FILE, parse_config
from gateway.errors import BrainscanError

SHIM_MODEL_SOURCE = Path(__file__).with_name("shim_model.py")
LOG_TAIL_LINES = 40
DEFAULT_STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"


class TritonStartupError(BrainscanError):
    """tritonserver did not become ready; the message names the cause."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the bundled Triton live in the virtual environment."""

    server: Path  # tritonserver binary
    python_backend: Path  # folder with libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # nvidia_pytriton.libs (shared libraries the binary links to)
    venv_bin: Path  # first on PATH so the stub finds numpy / onnxruntime

    @classmethod
    def find(cls) -> TritonInstall:
        # find_spec locates the package without importing it (pytriton's
        # client imports need gevent, which is deliberately not installed).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartupError(
                "nvidia-pytriton is not installed (it ships the tritonserver binary): "
                "pip install --no-deps -r requirements-nodeps.txt"
            )
        package = Path(list(spec.submodule_search_locations)[0])
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            server=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=package.parent / "nvidia_pytriton.libs",
            venv_bin=Path(sys.prefix) / "bin",
        )
        for path in (install.server, install.python_backend / "libtriton_python.so", install.stub, install.libs):
            if not path.exists():
                raise TritonStartupError(f"incomplete nvidia-pytriton install: {path} is missing")
        return install


# --- shim repository -------------------------------------------------------


def shim_config(config: mc.ModelConfig, *, gpu_available: bool, intra_op_threads: int | None = None) -> mc.ModelConfig:
    """The native onnxruntime config, re-targeted at the Python backend.

    Everything the contract and the scheduler depend on (name, tensors, dims,
    max_batch_size, batching, instance groups, parameters, labels) is kept.
    Only what the Python backend cannot honour changes: platform, model file
    name, ONNX-specific accelerators, and GPU instances on a host without GPUs.
    `intra_op_threads` fills the `intra_op_thread_count` parameter where the
    config leaves it out (the native backend then uses every core; so does this).
    """
    shim = mc.ModelConfig()
    shim.CopyFrom(config)
    shim.ClearField("platform")
    shim.ClearField("default_model_filename")
    shim.backend = "python"
    shim.optimization.ClearField("execution_accelerators")
    if intra_op_threads and "intra_op_thread_count" not in shim.parameters:
        shim.parameters["intra_op_thread_count"].string_value = str(intra_op_threads)
    if not gpu_available:
        for group in shim.instance_group:
            if group.kind == mc.ModelInstanceGroup.KIND_GPU:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
                group.ClearField("gpus")
    return shim


def build_shim_repository(
    source: Path, destination: Path, *, models: list[str] | None = None, intra_op_threads: int | None = None
) -> list[str]:
    """Write a Python-backend shim of `source` into `destination`; return the model names.

    ONNX files are symlinked, not copied; labels and other side files are copied.
    """
    source = source.resolve()
    if not source.is_dir():
        raise TritonStartupError(f"model repository {source} does not exist (pass --model-repository DIR)")
    model_dirs = sorted(p for p in source.iterdir() if (p / CONFIG_FILE).is_file())
    if models is not None:
        missing = sorted(set(models) - {p.name for p in model_dirs})
        if missing:
            raise TritonStartupError(f"model repository {source} has no model(s) {missing}")
        model_dirs = [p for p in model_dirs if p.name in models]
    if not model_dirs:
        raise TritonStartupError(f"model repository {source} holds no model (no */{CONFIG_FILE})")
    gpu = gpu_available()
    names = []
    for model_dir in model_dirs:
        config = shim_config(parse_config(model_dir / CONFIG_FILE), gpu_available=gpu, intra_op_threads=intra_op_threads)
        target = destination / model_dir.name
        target.mkdir(parents=True, exist_ok=True)
        (target / CONFIG_FILE).write_text(text_format.MessageToString(config))
        for entry in model_dir.iterdir():
            if entry.is_dir() and entry.name.isdigit():
                version = target / entry.name
                version.mkdir(exist_ok=True)
                onnx = entry / MODEL_FILE
                if not onnx.is_file():
                    raise TritonStartupError(f"model {model_dir.name!r}: {onnx} is missing")
                _replace_symlink(version / MODEL_FILE, onnx)
                shutil.copyfile(SHIM_MODEL_SOURCE, version / "model.py")
            elif entry.is_file() and entry.name != CONFIG_FILE:
                shutil.copyfile(entry, target / entry.name)
        names.append(model_dir.name)
    return names


def build_backend_directory(install: TritonInstall, destination: Path) -> Path:
    """backends/python/{libtriton_python.so, triton_python_backend_utils.py, triton_python_backend_stub}."""
    python = destination / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copyfile(install.python_backend / name, python / name)
    shutil.copy2(install.stub, python / install.stub.name)
    return destination


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Triton drains and unloads), then SIGKILL to the whole group after a grace period."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _shared_memory_regions(pid: int) -> set[Path]:
    """The Python backend's /dev/shm regions that process `pid` has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {Path(path) for path in re.findall(r"/dev/shm/triton_python_backend_shm_region_\S+", maps)}


def gpu_available() -> bool:
    return Path("/dev/nvidiactl").exists()


def _replace_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


# --- ports -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT (our own previous run) still counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


# --- the server process ----------------------------------------------------


class LocalTriton:
    """A tritonserver process over a shim of `repository`, bound to 127.0.0.1.

    Ports given as 0 are picked free at the first start() and then kept, so
    stop() followed by start() brings the server back on the same address.
    """

    def __init__(
        self,
        repository: Path,
        *,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
        models: list[str] | None = None,
        log_verbose: int = 0,
        intra_op_threads: int | None = None,
    ) -> None:
        self.repository = Path(repository)
        # ONNX Runtime threads per model instance; like the embedded backend, all cores by default.
        self.intra_op_threads = intra_op_threads or os.cpu_count() or 1
        self.ports = {"grpc": grpc_port, "http": http_port, "metrics": metrics_port}
        self.startup_timeout_s = startup_timeout_s
        self.models = models
        self.log_verbose = log_verbose
        self.model_names: list[str] = []
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # addresses
    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['http']}"

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "tritonserver.log" if self._workdir else None

    def __enter__(self) -> LocalTriton:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Build the shim (first time), launch tritonserver, wait until every model is READY."""
        if self.is_running():
            return
        install = TritonInstall.find()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="brainscan-triton-"))
            try:
                self.model_names = build_shim_repository(
                    self.repository, self._workdir / "models", models=self.models, intra_op_threads=self.intra_op_threads
                )
                build_backend_directory(install, self._workdir / "backends")
            except BaseException:
                self.close()
                raise
        picked = self._claim_ports()
        for attempt in range(3):
            try:
                self._launch(install)
                break
            except TritonStartupError as exc:
                # a port picked free can be taken before tritonserver binds it: pick again
                if not picked or "already in use" not in str(exc).splitlines()[0] or attempt == 2:
                    raise
                for kind in picked:
                    self.ports[kind] = 0
                picked = self._claim_ports()

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after a grace period)."""
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None:
            _terminate(process)

    def kill(self) -> None:
        """SIGKILL the server and its backend stubs at once, as a crash would; start() brings it back.

        The Python backend's shared-memory regions, which a killed server cannot remove, are removed here.
        """
        process, self._process = self._process, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None and process.poll() is None:
            regions = _shared_memory_regions(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            for region in regions:
                region.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop and remove the temporary shim repository."""
        self.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def wait(self) -> int:
        """Block until the server exits on its own; return its exit code."""
        assert self._process is not None
        return self._process.wait()

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Last lines of the server log, without the blank lines and table borders Triton prints."""
        kept = [line for line in self.log_text().splitlines() if line.strip() and not line.startswith("+")]
        return "\n".join(kept[-lines:])

    # --- internals ---------------------------------------------------------

    def _launch(self, install: TritonInstall) -> None:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(install.venv_bin), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(install.libs), env.get("LD_LIBRARY_PATH", "")] if p)
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                self._command(install),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches us; we stop the server in order
            )
        # never leave a server behind when the owner forgets to stop it
        self._finalizer = weakref.finalize(self, _terminate, self._process)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _claim_ports(self) -> list[str]:
        """Fill in ports given as 0; refuse explicit ports already in use. Returns the kinds picked."""
        taken, picked = set(), []
        for kind, port in self.ports.items():
            if port == 0:
                port = free_port()
                while port in taken:
                    port = free_port()
                self.ports[kind] = port
                picked.append(kind)
            elif port_in_use(port):
                raise TritonStartupError(
                    f"cannot start Triton: {kind} port {port} on {LOOPBACK} is already in use "
                    f"(another tritonserver?); choose another with --{kind}-port or 0 for a free one"
                )
            taken.add(port)
        return picked

    def _command(self, install: TritonInstall) -> list[str]:
        assert self._workdir is not None
        return [
            str(install.server),
            f"--model-repository={self._workdir / 'models'}",
            f"--backend-directory={self._workdir / 'backends'}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.ports['grpc']}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.ports['http']}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            # large Mask R-CNN outputs: start the stub's shared memory bigger, grow in big steps
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=67108864",
        ]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise TritonStartupError(self._failure(f"tritonserver exited with code {code}"))
            not_ready = [name for name in self.model_names if not self._http_ok(f"/v2/models/{name}/ready")]
            if not not_ready and self._http_ok("/v2/health/ready"):
                return
            if time.monotonic() > deadline:
                raise TritonStartupError(
                    self._failure(
                        f"Triton was not ready after {self.startup_timeout_s:.0f} s; "
                        f"models not ready: {not_ready or 'none (server not ready)'}"
                    )
                )
            time.sleep(0.25)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _failure(self, headline: str) -> str:
        tail = self.log_tail()
        cause = diagnose(self.log_text())
        if self._workdir is not None:  # name the canonical files, not their shim links
            cause = cause.replace(str(self._workdir / "models"), str(self.repository.resolve()))
        parts = [f"cannot start Triton: {cause}" if cause else "cannot start Triton", headline]
        parts.append(f"--- last lines of {self.log_path} ---\n{tail}")
        return "\n".join(parts)


_CAUSES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"[Ss]ocket '([^']+)' already in use"), "address {0} already in use"),
    (re.compile(r"Address already in use[^\n\"]*"), "{0}"),
    # the message is one log line with escaped newlines; keep its first line
    (re.compile(r"failed to load '([^']+)'[^:]*: (.+?)(?:\\n|\"?$)", re.MULTILINE), "model {0!r} failed to load: {1}"),
    (re.compile(r"error while loading shared libraries: ([^\n]+)"), "missing shared library: {0}"),
    (re.compile(r"No module named '([^']+)'"), "Python package {0!r} not found by the backend stub"),
    (re.compile(r"^error: (.+)$", re.MULTILINE), "{0}"),
]
_ERROR_LINE = re.compile(r"^E\d{4} [^\]]*\] \"?(.+?)\"?$", re.MULTILINE)
_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")


def diagnose(log: str) -> str:
    """The most specific cause of a failed start that the server log reveals, or ''."""
    for pattern, template in _CAUSES:
        match = pattern.search(log)
        if match:
            return template.format(*(match.groups() or (match.group(0),)))
    errors = [e for e in _ERROR_LINE.findall(log) if not any(h in e for h in _HARMLESS)]
    return errors[0] if errors else ""


# --- `python -m triton_local` ----------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m triton_local",
        description=(
            "Run a local Triton Inference Server over the model repository (Python-backend shims "
            "around the ONNX files), bound to 127.0.0.1. Research use only; not a medical device."
        ),
        add_help=add_help,
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=Path(os.environ.get("BRAINSCAN_MODEL_REPOSITORY", "model_repository")),
        help="canonical model repository (default: $BRAINSCAN_MODEL_REPOSITORY or ./model_repository)",
    )
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = any free port)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = any free port)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002; 0 = any free port)")
    parser.add_argument(
        "--startup-timeout-s", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, help="give up if not ready by then"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--intra-op-threads", type=int, default=None,
                        help="ONNX Runtime threads per model instance where a config does not set "
                        "intra_op_thread_count (default: all cores)")
    return parser


def main(args: argparse.Namespace) -> int:
    triton = LocalTriton(
        args.model_repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        startup_timeout_s=args.startup_timeout_s,
        log_verbose=args.log_verbose,
        intra_op_threads=args.intra_op_threads,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        triton.start()
        print(
            f"Triton ready on grpc {triton.grpc_url}, http {triton.http_url} "
            f"(models: {', '.join(triton.model_names)}; log {triton.log_path}). Ctrl-C to stop.",
            flush=True,
        )
        code = triton.wait()
        print(f"tritonserver exited on its own (code {code}):\n{triton.log_tail()}", file=sys.stderr)
        return 1
    except BrainscanError as exc:  # start-up failures and contract errors name their cause
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping Triton...", file=sys.stderr, flush=True)
        return 0
    finally:
        triton.close()
        signal.signal(signal.SIGTERM, previous)
