"""What the page shows: SDK results and SDK errors turned into JSON for app.js."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from brainscan.errors import (
    BrainscanError,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServerUnavailable,
    Unauthenticated,
)
from brainscan.overlay import render_overlay
from brainscan.results import AnalysisResult


@dataclass(frozen=True)
class PageError:
    """An error as the page shows it: an HTTP status, a kind app.js can branch on, a sentence."""

    status: int
    kind: str  # bad_file | too_big | gateway_down | token_refused | busy | timeout | server_error
    message: str

    def body(self) -> dict[str, object]:
        return {"error": {"kind": self.kind, "message": self.message}}


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def slice_view(result: AnalysisResult, gray: np.ndarray) -> dict[str, object]:
    """One slice: the result's JSON (what "Download JSON" saves) and both pictures."""
    original = Image.fromarray((np.clip(gray, 0.0, 1.0) * 255).astype(np.uint8))
    return {
        "frame": result.frame,
        "result": result_json(result),
        "original_png": png_data_url(original),
        "overlay_png": png_data_url(render_overlay(gray, result)),
    }


def result_json(result: AnalysisResult) -> dict[str, object]:
    """The SDK's JSON (with its scope verdict where the SDK has one), less the file name the page never sees."""
    data = result.to_json_dict()
    data.pop("image", None)  # app.js adds the name it kept
    data["frame"] = result.frame
    return data


def error_view(error: BrainscanError, server: str) -> PageError:
    detail = _without_code(str(error))
    if isinstance(error, InvalidInput):
        if "too big" in detail or "larger than max" in detail:
            return PageError(413, "too_big", f"The gateway refused the file as too big ({detail}).")
        return PageError(400, "bad_file", f"This file could not be analyzed: {detail}")
    if isinstance(error, Unauthenticated):
        return PageError(
            401, "token_refused",
            f"The gateway at {server} refused the access token ({detail}). "
            "Start the page with the right --token-file (or BRAINSCAN_TOKEN).",
        )
    if isinstance(error, ServerUnavailable):
        return PageError(
            503, "gateway_down",
            f"The gateway at {server} cannot be reached or cannot analyze right now ({detail}). "
            "Check that it is running, then try again.",
        )
    if isinstance(error, Overloaded):
        return PageError(503, "busy", f"The gateway is busy ({detail}). Try again in a moment.")
    if isinstance(error, DeadlineExceeded):
        return PageError(504, "timeout", f"The gateway did not answer in time ({detail}).")
    return PageError(502, "server_error", f"The gateway reported an error: {detail}")


def too_big(size: int, limit: int) -> PageError:
    return PageError(
        413, "too_big",
        f"The file is {_megabytes(size)}; the gateway accepts at most {_megabytes(limit)} per file.",
    )


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _without_code(message: str) -> str:
    """'INVALID_ARGUMENT: image is empty' -> 'image is empty' (the page says what the code means)."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.isupper() and head.replace("_", "").isalpha() else message
