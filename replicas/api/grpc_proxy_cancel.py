"""Runs inside Serve's gRPC proxy: a streaming RPC that the client cancels, or whose deadline passes,
always cancels the request the proxy sent to the ingress replica (and so the engine request).

Why: Serve's proxy (ray 2.60, `gRPCProxy.send_request_to_replica`) cancels the replica's request
only when the cancellation lands while it awaits the replica's next result. grpc cancels the RPC's
task wherever it is — often while it writes a message, with the proxy's generators suspended at a
`yield`; those are later closed with GeneratorExit, which Serve turns into a status without
cancelling the replica's request, and the engine request ran on to max_tokens (2–23 % of
cancels). Here each streaming handler pulls the results in a task of its own and hands them over a
queue; the end of the RPC (cancel, deadline, or done) cancels that task, so the cancel always lands
inside its wait for the next result.

Installed by replicas.api.grpc_decode.add_epserve_to_server, a gRPC servicer function (replicas/api/grpc_service.py):
Serve imports and calls them in the proxy with the server it builds. Tests: tests/replicas/test_cancellation.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

_END = object()


class _LiveContext:
    """The RPC's servicer context with what reads grpc's call object taken while the call lives.

    The handler's task may outlive the call (Serve writes its access log after a cancel), and
    `peer()` on an ended call crashes the process; codes, details and metadata are plain fields.
    """

    def __init__(self, ctx: Any) -> None:  # noqa: ANN401  # grpc.aio.ServicerContext
        self._ctx = ctx
        self._taken = {
            name: getattr(ctx, name)()
            for name in ("peer", "auth_context", "peer_identities", "peer_identity_key", "invocation_metadata")
        }

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        if name in self._taken:
            value = self._taken[name]
            return lambda: value
        return getattr(self._ctx, name)


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def install_pump(server: Any) -> None:  # noqa: ANN401  # Serve's gRPC server in the proxy
    """Wrap the proxy's handler factory (once per server) so streaming RPCs run through `pumped`."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None and not getattr(factory, "epserve_pumped", False):
        server.service_handler_factory = pumped_factory(factory)


def pumped_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Serve's handler factory with its server-streaming handlers run through `pumped`."""
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    def make(*, service_method: str, streaming_type: Any) -> Callable[..., Any]:  # noqa: ANN401
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        return pumped(handler) if streaming_type == gRPCStreamingType.UNARY_STREAM else handler

    make.epserve_pumped = True  # type: ignore[attr-defined]  # a marker attribute on the function
    return make


def pumped(handler: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: ANN401
        queue: asyncio.Queue = asyncio.Queue()  # unbounded: the task never waits anywhere but on the replica

        live = _LiveContext(context)

        async def pump() -> None:
            try:
                async for message in handler(request, live):
                    queue.put_nowait(message)
            except BaseException as exc:  # noqa: BLE001  # handed to the RPC's task
                queue.put_nowait(_Raised(exc))
            finally:
                queue.put_nowait(_END)

        task = asyncio.get_running_loop().create_task(pump())
        # The RPC may end while its task writes a message, which leaves this generator suspended at its
        # `yield` (closed only when collected): the call's end cancels the pump, wherever this generator is.
        context.add_done_callback(lambda _ctx: task.cancel())
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Raised):
                    raise item.exc
                yield item
        finally:
            # Cancelled, past its deadline, or closed: the pump waits on the replica, so Serve's proxy sees the
            # cancel there and cancels the replica's request (a no-op once the pump has ended).
            task.cancel()

    return unary_stream
