"""The naive baseline the source projects used, written once for comparison (not shipped).

A FastAPI endpoint that handles one request at a time with the training
frameworks: `async def` handlers that block the event loop while Keras'
`model.predict` runs the classifier and the U-Net, then eager PyTorch runs the
Mask R-CNN. Each request is decoded and preprocessed, run, and answered as JSON
with base64 PNG masks.

TensorFlow and torchvision cannot share a process with these wheels, so the
Mask R-CNN lives in a worker subprocess (`--role maskrcnn-worker`) that the
server feeds the image bytes over a pipe; it decodes and preprocesses them
itself, as a separate model script would.

Weights: the trained checkpoints under runs/ (classifier, unet: best.keras or
last.keras; maskrcnn: best.pt or last.pt) when they exist; else, for the Keras
models, the shipped SavedModel in the repository; else random weights of the
same architectures and input sizes (same compute). GET /info says which.

    python -m bench.naive_server --port 8000 --model-repository model_repository

Research use only; not a medical device.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gateway.config import PROJECT_ROOT
from gateway.contract import load_repository
from gateway.preprocessing import PreparedImage, boxes_to_original, decode_image, find_brain_box, mask_to_original, prepare

THRESHOLD = 0.5
_FRAME = struct.Struct("<Q")


# --- framing over the worker's pipes ----------------------------------------


def send(stream: BinaryIO, value: Any) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME.pack(len(payload)) + payload)
    stream.flush()


def receive(stream: BinaryIO) -> Any:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        raise EOFError("the Mask R-CNN worker closed its pipe")
    (length,) = _FRAME.unpack(header)
    return pickle.loads(stream.read(length))


# --- model loading -------------------------------------------------------------


def load_keras(role: str, size: int, runs: Path, repository: Path):
    """(model, where its weights came from): a runs/ checkpoint, else the shipped SavedModel, else random."""
    import keras

    for name in ("best.keras", "last.keras"):
        path = runs / role / name
        if path.is_file():
            return keras.models.load_model(path, compile=False), str(path)
    from export.keras_models import build_classifier, build_unet
    from export.train_common import load_initial_weights

    model = build_classifier(size, pretrained=False) if role == "classifier" else build_unet(size, pretrained=False)
    shipped = repository / role / "1" / "model.savedmodel"
    if (shipped / "saved_model.pb").is_file():
        try:
            load_initial_weights(model, shipped)
            return model, str(shipped)
        except ValueError:  # another architecture than the defaults: keep the same compute, random weights
            pass
    return model, "random weights (no trained checkpoint under runs/)"


def load_maskrcnn(size: int, runs: Path, repository: Path):
    """(model, config, where its weights came from): a runs/ checkpoint, else the shipped ONNX file's weights
    (export/maskrcnn_from_onnx.py), else random."""
    import torch

    from export.maskrcnn_model import build_maskrcnn, lite0_config

    for name in ("best.pt", "last.pt"):
        path = runs / "maskrcnn" / name
        if path.is_file():
            from export.export_maskrcnn import load_checkpoint

            model, config, _ = load_checkpoint(path)
            return model.eval(), config, str(path)
    config = lite0_config(size)
    torch.manual_seed(0)
    model = build_maskrcnn(config)
    shipped = repository / "maskrcnn" / "1" / "model.onnx"
    if shipped.is_file():
        from export.maskrcnn_from_onnx import state_dict_from_onnx

        try:
            model.load_state_dict(state_dict_from_onnx(model, shipped))
            return model.eval(), config, str(shipped)
        except (ValueError, RuntimeError, KeyError):  # another architecture: same compute, random weights
            pass
    return model.eval(), config, "random weights (no trained checkpoint under runs/)"


# --- the Mask R-CNN worker process ------------------------------------------------


def maskrcnn_worker(args: argparse.Namespace) -> int:
    """Read image bytes, answer boxes/scores/masks on the model grid, until the pipe closes."""
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, never into the protocol
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    spec = load_repository(args.model_repository)["maskrcnn"]
    model, config, source = load_maskrcnn(spec.input_size, args.runs, Path(args.model_repository))
    send(protocol_out, {"ready": True, "weights": source, "input_size": config.input_size})
    stdin = sys.stdin.buffer
    while True:
        try:
            data = receive(stdin)
        except EOFError:
            return 0
        try:
            pixels = decode_image(data).pixels
            prepared = prepare(pixels, config.input_size)
            with torch.inference_mode():
                out = model([torch.from_numpy(prepared.tensor)[None]])[0]
            send(protocol_out, {name: out[name].numpy() for name in ("boxes", "scores", "masks")})
        except Exception as error:  # the server turns it into a 400/500
            send(protocol_out, {"error": f"{type(error).__name__}: {error}"})


class MaskRCNNClient:
    def __init__(self, repository: Path, runs: Path) -> None:
        command = [sys.executable, "-m", "bench.naive_server", "--role", "maskrcnn-worker",
                   "--model-repository", str(repository), "--runs", str(runs)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=PROJECT_ROOT)
        self._lock = threading.Lock()
        self.info = receive(self._process.stdout)

    def __call__(self, data: bytes) -> dict[str, np.ndarray]:
        with self._lock:
            send(self._process.stdin, data)
            answer = receive(self._process.stdout)
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=30)


# --- the server ------------------------------------------------------------------


def _png_b64(mask: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    return base64.b64encode(encoded.tobytes()).decode("ascii") if ok else ""


class NaiveModels:
    def __init__(self, repository: Path, runs: Path) -> None:
        specs = load_repository(repository)
        self.labels = specs["classifier"].labels
        self.sizes = {role: spec.input_size for role, spec in specs.items()}
        self.classifier, classifier_source = load_keras("classifier", self.sizes["classifier"], runs, repository)
        self.unet, unet_source = load_keras("unet", self.sizes["unet"], runs, repository)
        for role, model in (("classifier", self.classifier), ("unet", self.unet)):
            self.sizes[role] = int(model.input_shape[1])  # a checkpoint's own size wins
        self.maskrcnn = MaskRCNNClient(repository, runs)
        self.sizes["maskrcnn"] = int(self.maskrcnn.info["input_size"])  # a checkpoint's own size wins
        self.info = {
            "classifier": classifier_source,
            "unet": unet_source,
            "maskrcnn": self.maskrcnn.info["weights"],
            "sizes": self.sizes,
        }
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay Keras' and PyTorch's first-call costs (graph tracing, allocations) before serving."""
        yy, xx = np.mgrid[:256, :256]
        head = (((yy - 128) / 100.0) ** 2 + ((xx - 128) / 90.0) ** 2 <= 1.0).astype(np.uint8) * 120
        ok, encoded = cv2.imencode(".png", head)
        for _ in range(2):
            self.analyze(encoded.tobytes())

    def analyze(self, data: bytes) -> dict[str, Any]:
        pixels = decode_image(data).pixels
        crop = find_brain_box(pixels)
        cls = prepare(pixels, self.sizes["classifier"], crop=crop)
        outputs = self.classifier.predict(cls.tensor[None, :, :, None], verbose=0)
        # The classifier has two heads (probabilities, in_scope); Keras returns them by name.
        probabilities = (outputs["probabilities"] if isinstance(outputs, dict) else outputs)[0]
        seg = prepare(pixels, self.sizes["unet"], crop=crop)
        mask = self.unet.predict(seg.tensor[None, :, :, None], verbose=0)[0, :, :, 0]
        full = mask_to_original(mask, seg) >= THRESHOLD
        det = self.maskrcnn(data)
        keep = det["scores"] >= THRESHOLD
        size = self.sizes["maskrcnn"]
        grid = PreparedImage(tensor=np.empty((size, size), np.float32), crop=crop, original_shape=pixels.shape[:2])
        boxes = boxes_to_original(det["boxes"][keep], grid, size)
        masks = [_png_b64(mask_to_original(m[0], grid) >= THRESHOLD) for m in det["masks"][keep]]
        return {
            "probabilities": {label: float(p) for label, p in zip(self.labels, probabilities)},
            "tumor_probability": float(1.0 - probabilities[self.labels.index("no_tumor")]),
            "mask_png": _png_b64(full),
            "boxes": boxes.tolist(),
            "scores": det["scores"][keep].tolist(),
            "masks_png": masks,
        }


def build_app(models: NaiveModels) -> FastAPI:
    app = FastAPI(title="naive brainscan baseline (bench only; research use, not a medical device)")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        return models.info

    @app.post("/analyze")
    async def analyze(request: Request) -> JSONResponse:
        data = await request.body()
        try:
            return JSONResponse(models.analyze(data))  # blocks the loop: one request at a time
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    return app


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Naive FastAPI baseline for the pipeline bench (not shipped).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository",
                        help="repository whose configs give the input sizes (default ./model_repository)")
    parser.add_argument("--runs", type=Path, default=PROJECT_ROOT / "runs", help="training run folders with checkpoints")
    parser.add_argument("--role", choices=("server", "maskrcnn-worker"), default="server", help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> int:
    if args.role == "maskrcnn-worker":
        return maskrcnn_worker(args)
    import uvicorn

    models = NaiveModels(args.model_repository, args.runs)
    print(f"naive baseline models: {json.dumps(models.info)}", flush=True)
    try:
        uvicorn.run(build_app(models), host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        models.maskrcnn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
