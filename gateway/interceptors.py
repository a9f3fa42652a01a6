"""One server interceptor for what every RPC needs: a request id (taken from
`x-request-id` or generated, returned in trailing metadata and stamped on every
log line), bearer-token auth (health checks stay open), in-flight gauge,
counts by method and status code, latency, and one access-log line.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from gateway.observability import Metrics, request_id_var

log = logging.getLogger("brainscan.access")

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
REQUEST_ID_KEY = "x-request-id"


def load_tokens(path: Path) -> tuple[bytes, ...]:
    tokens = tuple(line.strip().encode() for line in path.read_text().splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"auth token file {path} holds no token")
    return tokens


def token_accepted(presented: str | None, accepted: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every accepted token (no early exit)."""
    if presented is None or not presented.startswith("Bearer "):
        return False
    candidate = presented[len("Bearer ") :].strip().encode()
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(candidate, token)
    return matched


class GatewayInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, metrics: Metrics | None, tokens: tuple[bytes, ...] = ()) -> None:
        self.metrics = metrics
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        request_id = str(metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex)[:128]
        needs_auth = bool(self.tokens) and not details.method.startswith(OPEN_PREFIXES)
        authorized = not needs_auth or token_accepted(metadata.get("authorization"), self.tokens)
        return _wrap(handler, _CallScope(self, details.method, request_id, authorized))


class _CallScope:
    """Bookkeeping around one call; used by the wrapped behaviours below."""

    def __init__(self, interceptor: GatewayInterceptor, method: str, request_id: str, authorized: bool) -> None:
        self.metrics = interceptor.metrics
        self.method = method
        self.request_id = request_id
        self.authorized = authorized
        self.started = 0.0

    async def enter(self, context: grpc.aio.ServicerContext) -> None:
        request_id_var.set(self.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        self.started = time.perf_counter()
        if self.metrics:
            self.metrics.in_flight.inc()
        if not self.authorized:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")

    def exit(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = context.code()
        if code is None:
            if error is None:
                code = grpc.StatusCode.OK
            elif isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        elapsed = time.perf_counter() - self.started
        if self.metrics:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method=self.method, code=name).inc()
            self.metrics.request_seconds.labels(method=self.method).observe(elapsed)
        if not self.method.startswith(OPEN_PREFIXES):
            log.info("rpc", extra={"method": self.method, "code": name, "ms": round(elapsed * 1000, 3)})


def _wrap(handler: grpc.RpcMethodHandler, scope: _CallScope) -> grpc.RpcMethodHandler:
    def unary_response(inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def behaviour(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            await scope.enter(context)
            try:
                return await inner(request_or_iterator, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                scope.exit(context, error)

        return behaviour

    def streaming_response(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def behaviour(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            await scope.enter(context)
            try:
                async for item in inner(request_or_iterator, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                scope.exit(context, error)

        return behaviour

    def stream(inner: Callable[..., Any]) -> Callable[..., Any]:
        # A streaming handler either yields (async generator) or writes with
        # context.write() and returns (coroutine, e.g. the health Watch).
        return streaming_response(inner) if inspect.isasyncgenfunction(inner) else unary_response(inner)

    codecs = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), *codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), *codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), *codecs)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), *codecs)
