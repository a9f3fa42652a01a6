"""The one table that maps domain errors (gateway/errors.py) to gRPC status codes,
used by both servicers (gateway/service.py, gateway/kserve.py)."""

from __future__ import annotations

import grpc

from gateway.errors import (
    BackendUnavailable,
    BrainscanError,
    ContractError,
    DeadlineExceeded,
    InvalidImage,
    InvalidSeries,
    Overloaded,
    RequestTooLarge,
)

STATUS_CODES: dict[type[BrainscanError], grpc.StatusCode] = {
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSeries: grpc.StatusCode.INVALID_ARGUMENT,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ContractError: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code_for(error: BrainscanError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL
