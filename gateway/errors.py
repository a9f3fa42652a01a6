"""Domain errors and the one table that maps them to gRPC status codes.

    BrainscanError
    ├── InvalidImage        bad bytes, shape, dtype or size  → INVALID_ARGUMENT
                            (also damaged data, a malformed DICOM value, more
                            decoded pixels than one request may have)
    ├── InvalidSeries       a series that is not one stack   → INVALID_ARGUMENT
                            (mixed series, orientation/spacing differ, no order)
    ├── RequestTooLarge     over the configured request size → RESOURCE_EXHAUSTED
    ├── Overloaded          in-flight or in-flight pixel     → RESOURCE_EXHAUSTED
                            limit reached (gateway.admission)
    ├── BackendUnavailable  model server down or not ready   → UNAVAILABLE
    ├── DeadlineExceeded    the caller's deadline ran out    → DEADLINE_EXCEEDED
    └── ContractError       model repository does not match  → FAILED_PRECONDITION
                            (raised at start-up: the gateway refuses to start)
"""

from __future__ import annotations

import grpc


class BrainscanError(Exception):
    """Base of every error the gateway turns into a gRPC status."""


class InvalidImage(BrainscanError):
    pass


class InvalidSeries(BrainscanError):
    pass


class RequestTooLarge(BrainscanError):
    pass


class Overloaded(BrainscanError):
    pass


class BackendUnavailable(BrainscanError):
    pass


class DeadlineExceeded(BrainscanError):
    pass


class ContractError(BrainscanError):
    pass


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
