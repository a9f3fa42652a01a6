"""Writes the Triton model repository: config.pbtxt, labels and model card.

What is written is re-parsed through `gateway.contract` (the gateway's own
reader) before returning, so export cannot produce a repository the gateway
would refuse.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from gateway.contract import (
    CONFIG_FILE,
    DISCLAIMER,
    LABELS_FILE,
    MODEL_FILE,
    ModelSpec,
    TensorSpec,
    load_model_spec,
    triton_data_type,
    validate_role,
)

def version_dir(repository: Path, name: str, version: int = 1) -> Path:
    path = repository / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    return path


def onnx_path(repository: Path, name: str, version: int = 1) -> Path:
    return version_dir(repository, name, version) / MODEL_FILE


def write_model_config(
    repository: Path,
    *,
    name: str,
    max_batch_size: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    labels: list[str] | None = None,
    label_output: str | None = None,
    parameters: dict[str, str] | None = None,
    max_queue_delay_us: int = 0,
) -> ModelSpec:
    """Write `<repository>/<name>/config.pbtxt` (+ labels.txt) for the native onnxruntime backend.

    Dynamic batching waits `max_queue_delay_us` for more requests. The default 0 batches
    what queued while the instance was busy and never holds a lone request (a 2 ms delay
    added 2.0 ms to every gated call at concurrency 1 through the local Triton).
    """
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch_size,
    )
    for tensor in inputs:
        config.input.add(name=tensor.name, data_type=triton_data_type(tensor.dtype), dims=list(tensor.dims))
    for tensor in outputs:
        out = config.output.add(name=tensor.name, data_type=triton_data_type(tensor.dtype), dims=list(tensor.dims))
        if labels is not None and tensor.name == label_output:
            out.label_filename = LABELS_FILE
    if max_batch_size > 0:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.version_policy.latest.num_versions = 1
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    if labels is not None:
        (model_dir / LABELS_FILE).write_text("\n".join(labels) + "\n")
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
    spec = load_model_spec(model_dir)
    validate_role(spec, name)
    return spec


def set_model_parameters(repository: Path, name: str, parameters: dict[str, str]) -> ModelSpec:
    """Set string parameters in an existing `<repository>/<name>/config.pbtxt`, keeping everything else."""
    model_dir = repository / name
    config = text_format.Parse((model_dir / CONFIG_FILE).read_text(), mc.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))
    spec = load_model_spec(model_dir)
    validate_role(spec, name)
    return spec


def replace_card_metrics(repository: Path, name: str, metrics: dict[str, object], *, note: str) -> Path:
    """Swap the metrics JSON of an existing MODEL_CARD.md (e.g. after its thresholds changed), with a dated note."""
    path = repository / name / "MODEL_CARD.md"
    text = path.read_text()
    head = text.split("\n## Metrics")[0].rstrip() + "\n\n"
    path.write_text(head + "\n".join([
        "## Metrics (as computed by `python -m export evaluate`)", "", f"{note} ({dt.date.today().isoformat()})", "",
        "```json", json.dumps(metrics, indent=2), "```", ""]))
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_model_card(
    repository: Path,
    name: str,
    *,
    summary: str,
    sections: dict[str, str],
    metrics: dict[str, object],
) -> Path:
    """Write `<repository>/<name>/MODEL_CARD.md`; metrics also go in verbatim as JSON."""
    lines = [
        f"# Model card: {name}",
        "",
        f"> **{DISCLAIMER}**",
        "",
        summary.strip(),
        "",
        f"- Written: {dt.date.today().isoformat()}",
        f"- Code commit: {git_commit()}",
        f"- File: `{name}/1/{MODEL_FILE}`",
        "",
    ]
    for title, body in sections.items():
        lines += [f"## {title}", "", body.strip(), ""]
    lines += ["## Metrics (as computed by `python -m export evaluate`)", "", "```json", json.dumps(metrics, indent=2), "```", ""]
    path = repository / name / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
