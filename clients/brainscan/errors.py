"""The SDK's one exception tree.

    BrainscanError
    ├── InvalidInput          the image was refused (client-side check, INVALID_ARGUMENT, or a
    │                         message over gRPC's size limit: RESOURCE_EXHAUSTED "larger than max")
    ├── Unauthenticated       missing or wrong token (UNAUTHENTICATED)
    ├── Overloaded            the server is at capacity (RESOURCE_EXHAUSTED)
    ├── ServerUnavailable     server or model server unreachable (UNAVAILABLE)
    ├── DeadlineExceeded      no answer within the deadline (DEADLINE_EXCEEDED)
    └── ServerError           anything else the server reported

Each carries `.code` (the gRPC status code name, or None for client-side checks).
"""

from __future__ import annotations

import grpc


class BrainscanError(Exception):
    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidInput(BrainscanError):
    pass


class Unauthenticated(BrainscanError):
    pass


class Overloaded(BrainscanError):
    pass


class ServerUnavailable(BrainscanError):
    pass


class DeadlineExceeded(BrainscanError):
    pass


class ServerError(BrainscanError):
    pass


_BY_CODE: dict[str, type[BrainscanError]] = {
    "INVALID_ARGUMENT": InvalidInput,
    "UNAUTHENTICATED": Unauthenticated,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": ServerUnavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def from_status(code: str, message: str) -> BrainscanError:
    return _BY_CODE.get(code, ServerError)(f"{code}: {message}", code)


def from_rpc_error(error: grpc.RpcError) -> BrainscanError:
    code = error.code()  # type: ignore[attr-defined]
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() or ""  # type: ignore[attr-defined]
    if name == "RESOURCE_EXHAUSTED" and "larger than max" in details:
        # gRPC's own message-size limit (either side), not a busy server: retrying will not help.
        return InvalidInput(f"{name}: the request is too big for the gateway ({details})", name)
    return from_status(name, details)
