"""Request body limits: a size cap that applies before the body is buffered, and a read deadline.

Two places enforce them. Serve's HTTP proxy reads every body into memory as it arrives and hands
the request to an ingress replica before the body is complete, so a slow or huge body would hold
an ingress slot and proxy memory. `ProxyBodyLimits` runs inside the proxy (installed through Ray
Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` hook, replicas/api/proxy_options.py) and, like
nginx's request buffering, answers 413 on a Content-Length over the cap without reading, reads
the rest of the body within the deadline (408 past it, 413 as soon as a chunked body passes the
cap) and only then lets the proxy route the request, so no ingress slot waits on a client's
upload. A budget bounds the bytes all requests of one proxy hold while they buffer (503 beyond).
`read_body` repeats the cap and the deadline in the ingress for proxies without the hook.
Tests: tests/replicas/test_unauth_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from replicas.api.openai_protocol import ApiError

MAX_BODY_ENV = "EPSERVE_MAX_REQUEST_BODY_BYTES"
READ_TIMEOUT_ENV = "EPSERVE_BODY_READ_TIMEOUT_S"
DEFAULT_MAX_BODY_BYTES = 16 * 2**20
DEFAULT_READ_TIMEOUT_S = 10.0
BUDGET_BODIES = 32  # a proxy buffers at most this many full-size bodies at once


def too_large(size: int, cap: int) -> ApiError:
    return ApiError(413, f"request body of {size} bytes exceeds the limit of {cap} bytes (max_request_body_mb)")


def too_slow(timeout_s: float) -> ApiError:
    return ApiError(408, f"the request body did not arrive within {timeout_s:g} s (body_read_timeout_s)")


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body size; None when absent (chunked or no body). A malformed value is a 400."""
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                n = int(value)
            except ValueError:
                n = -1
            if n < 0:
                raise ApiError(400, f"invalid Content-Length {value[:40]!r}")
            return n
    return None


def _has_body(scope: dict[str, Any]) -> bool:
    """HTTP/1.1: a request has a body only with Content-Length > 0 or Transfer-Encoding."""
    for name, value in scope.get("headers", []):
        n = name.lower()
        if n == b"transfer-encoding":
            return True
        if n == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False


class ProxyBodyLimits:
    """Pure ASGI middleware for Serve's HTTP proxy (see the module docstring)."""

    def __init__(
        self,
        app: Any,  # noqa: ANN401  # an ASGI app
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        budget_bytes: int | None = None,
    ) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.budget = budget_bytes if budget_bytes is not None else BUDGET_BODIES * max_bytes
        self.held = 0  # bytes of bodies this proxy holds for requests not yet answered

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        try:
            declared = content_length(scope.get("headers", []))
            if declared is not None and declared > self.max_bytes:
                raise too_large(declared, self.max_bytes)
        except ApiError as err:
            await _reply(send, err)
            return
        reserved = 0

        def reserve(n: int) -> None:
            nonlocal reserved
            if self.held + n > self.budget:
                raise ApiError(
                    503,
                    "the server is holding too many request bodies; retry later",
                    type="service_unavailable_error",
                    retry_after=1,
                )
            self.held += n
            reserved += n

        def release() -> None:
            nonlocal reserved
            self.held -= reserved
            reserved = 0

        try:
            try:
                chunks, size = [], 0
                if declared:
                    reserve(declared)
                deadline = time.monotonic() + self.read_timeout_s
                while True:
                    left = deadline - time.monotonic()
                    try:
                        message = await asyncio.wait_for(receive(), max(left, 0.001))
                    except TimeoutError:
                        raise too_slow(self.read_timeout_s) from None
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise too_large(size, self.max_bytes)
                    if size > reserved:
                        reserve(size - reserved)
                    if chunk:
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
            except ApiError as err:
                await _reply(send, err, close=err.status == 408)
                return
            body: bytes | None = b"".join(chunks)
            chunks.clear()

            async def replay() -> dict[str, Any]:
                nonlocal body
                if body is not None:
                    message, body = {"type": "http.request", "body": body, "more_body": False}, None
                    return message
                return await receive()  # after the body: the disconnect Serve watches for

            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    release()  # the replica has read the body by the time it answers
                await send(message)

            await self.app(scope, replay, sending)
        finally:
            release()


async def _reply(send: Any, err: ApiError, *, close: bool = False) -> None:  # noqa: ANN401
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(int(err.retry_after)).encode()))
    if close:  # a client too slow to send its body does not keep the connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Any]:
    """The callback `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names; limits from the proxy's environment."""
    from starlette.middleware import Middleware

    return [
        Middleware(
            ProxyBodyLimits,
            max_bytes=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)),
            read_timeout_s=float(os.environ.get(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_S)),
        )
    ]


async def read_body(request: Any, max_bytes: int, read_timeout_s: float) -> bytes:  # noqa: ANN401  # starlette Request
    """The request body in the ingress, under the same cap and deadline (413 / 408 as ApiError)."""
    declared = content_length(list(request.scope.get("headers", [])))
    if declared is not None and declared > max_bytes:
        raise too_large(declared, max_bytes)
    chunks, size = [], 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(size, max_bytes)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), read_timeout_s)
    except TimeoutError:
        raise too_slow(read_timeout_s) from None
    return b"".join(chunks)
