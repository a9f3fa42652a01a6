"""Draws a result on its slice: U-Net mask in red, Mask R-CNN boxes in yellow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from brainscan.pictures import load_frames
from brainscan.results import AnalysisResult


def render_overlay(gray: np.ndarray, result: AnalysisResult) -> Image.Image:
    """`gray`: the original slice as float in [0, 1] (H×W)."""
    base = (np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.stack([base] * 3, axis=-1).astype(np.float32)
    if result.mask is not None:
        red = np.array([255.0, 0.0, 0.0])
        rgb[result.mask] = 0.55 * rgb[result.mask] + 0.45 * red
    for instance in result.instances:
        green = np.array([0.0, 255.0, 0.0])
        rgb[instance.mask] = 0.8 * rgb[instance.mask] + 0.2 * green
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for instance in result.instances:
        draw.rectangle(instance.box, outline=(255, 220, 0), width=2)
        draw.text((instance.box[0] + 2, max(0, instance.box[1] - 12)), f"{instance.score:.2f}", fill=(255, 220, 0))
    draw.text((4, 4), f"{result.label} p(tumor)={result.tumor_probability:.2f}  research use only", fill=(0, 255, 255))
    return image


def write_overlay(image_path: Path, result: AnalysisResult, out_dir: Path, *, name: str | None = None) -> Path:
    """`<out_dir>/<name or the image's stem>.overlay.png`."""
    gray = load_frames(str(image_path))[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name or image_path.stem}.overlay.png"
    render_overlay(gray, result).save(target)
    return target
