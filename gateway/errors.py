"""Domain errors, plain Python (no gRPC: preprocessing and training import them).

The gRPC status each one becomes (gateway/status_codes.py, beside the servicers):

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
