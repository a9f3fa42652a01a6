"""brainscan: Python SDK for the brain-MRI tumor analysis gateway.

    from brainscan import Client
    with Client("localhost:50051") as client:
        result = client.analyze("slice.png")

Research use only. Not a medical device; not for diagnosis or treatment decisions.
"""

from brainscan.client import AsyncClient, Client, DecisionInfo, ModelInfo, ServerInfo
from brainscan.errors import (
    BrainscanError,
    DeadlineExceeded,
    InvalidInput,
    Overloaded,
    ServerError,
    ServerUnavailable,
    Unauthenticated,
)
from brainscan.results import DISCLAIMER, AnalysisResult, Instance, Scope
from brainscan.series import SeriesAnalysis, SeriesFailure, SeriesResult, SeriesSlice, SkippedFile

__all__ = [
    "AnalysisResult",
    "AsyncClient",
    "BrainscanError",
    "Client",
    "DISCLAIMER",
    "DeadlineExceeded",
    "DecisionInfo",
    "Instance",
    "InvalidInput",
    "ModelInfo",
    "Overloaded",
    "ServerError",
    "ServerInfo",
    "Scope",
    "SeriesAnalysis",
    "SeriesFailure",
    "SeriesResult",
    "SeriesSlice",
    "ServerUnavailable",
    "SkippedFile",
    "Unauthenticated",
]
