"""One server interceptor for what every RPC needs: a request id (taken from
`x-request-id` when it is a plain token, else generated; returned in trailing
metadata and stamped on every log line), bearer-token auth (health checks stay
open), in-flight gauge, counts by method and status code, latency, and one
access-log line, refused calls included.

The token is checked before the request message is parsed: the wrapped handler
receives the raw bytes and parses them itself, after the check, so a malformed
message gets INVALID_ARGUMENT (and no traceback in the log) and an
unauthenticated caller gets nothing parsed at all.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import re
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
# A caller's request id is used only when it is a plain token, so no header text reaches the log.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def load_tokens(path: Path) -> tuple[bytes, ...]:
    tokens = tuple(line.strip().encode() for line in path.read_text().splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"auth token file {path} holds no token")
    return tokens


def token_accepted(presented: str | None, accepted: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every accepted token (no early exit); the scheme is case-insensitive
    (RFC 7235)."""
    if not isinstance(presented, str):
        return False
    scheme, _, credentials = presented.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = credentials.strip().encode()
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
        offered = metadata.get(REQUEST_ID_KEY)
        request_id = offered if isinstance(offered, str) and _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
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

    def enter(self, context: grpc.aio.ServicerContext) -> None:
        request_id_var.set(self.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))
        self.started = time.perf_counter()
        if self.metrics:
            self.metrics.in_flight.inc()

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        """Inside the bookkeeping (counted, logged, gauge restored), before anything of the request is parsed."""
        if not self.authorized:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"
            )

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
    parse = handler.request_deserializer or (lambda raw: raw)

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception:  # protobuf's DecodeError, or any other deserializer's complaint
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid message for {scope.method} ({len(raw)} bytes); check the client's .proto",
            )

    async def parsed_stream(raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for raw in raw_iterator:
            yield await parsed(raw, context)

    def parse_input(request_streams: bool) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def single(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await parsed(raw, context)

        async def stream(raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return parsed_stream(raw_iterator, context)

        return stream if request_streams else single

    def unary_response(inner: Callable[..., Awaitable[Any]], request_streams: bool) -> Callable[..., Awaitable[Any]]:
        load = parse_input(request_streams)

        async def behaviour(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            error: BaseException | None = None
            scope.enter(context)
            try:
                await scope.check(context)
                return await inner(await load(raw, context), context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                scope.exit(context, error)

        return behaviour

    def streaming_response(inner: Callable[..., AsyncIterator[Any]], request_streams: bool) -> Callable[..., AsyncIterator[Any]]:
        load = parse_input(request_streams)

        async def behaviour(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            error: BaseException | None = None
            scope.enter(context)
            try:
                await scope.check(context)
                async for item in inner(await load(raw, context), context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                scope.exit(context, error)

        return behaviour

    def responses(inner: Callable[..., Any], request_streams: bool) -> Callable[..., Any]:
        # A streaming handler either yields (async generator) or writes with
        # context.write() and returns (coroutine, e.g. the health Watch).
        if inspect.isasyncgenfunction(inner):
            return streaming_response(inner, request_streams)
        return unary_response(inner, request_streams)

    # The request arrives as bytes (no deserializer): it is parsed after the token check, above.
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary, False), None, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary, True), None, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(responses(handler.unary_stream, False), None, serializer)
    return grpc.stream_stream_rpc_method_handler(responses(handler.stream_stream, True), None, serializer)
