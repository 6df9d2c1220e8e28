"""grpc.health.v1 answered inside Serve's gRPC proxy, outside the ingress's request slots.

Serve's proxy routes every RPC to the app's ingress deployment, where each one holds a request
slot until it ends; a Watch stream never ends, so 1,200 unauthenticated Watch streams once held
every slot. `add_health_servicer` (listed in the gRPC options' servicer functions, so Serve calls
it in each proxy process with the proxy's server) registers the health service as a passthrough
service of that server: Check and Watch run in the proxy itself. The app's readiness (its
ingress's `ready`: weights loaded, a step has run) is polled once per app per second for all
callers together; Watch streams are capped per proxy (`max_health_watchers`; RESOURCE_EXHAUSTED
beyond). The app is the one the `application` metadata names, else the only app, as Serve routes.
Tests: tests/replicas/test_unauth_limits.py, tests/replicas/test_grpc.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replicas.api.grpc_decode import UndecodableRequest

log = logging.getLogger("ray.serve.epserve.health")

HEALTH_SERVICE = "grpc.health.v1.Health"
SERVICES = ("", "epserve.v1.Epserve")  # "" = the whole server
INGRESS_DEPLOYMENT = "EpserveIngress"  # replicas/serving/app.py
MAX_WATCHERS_ENV = "EPSERVE_MAX_HEALTH_WATCHERS"
DEFAULT_MAX_WATCHERS = 1024
POLL_S = 1.0  # how stale a status may be; also the Watch streams' tick
READY_TIMEOUT_S = 10.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_health_servicer(servicer: Any, server: Any) -> None:  # noqa: ANN401  # Serve's mock servicer, its gRPC server
    """A `grpc_servicer_functions` entry: the health service served by the proxy itself."""
    from replicas.api.grpc_decode import LenientServer, add_health_to_server

    if not hasattr(server, "add_passthrough_service"):  # a Serve without passthrough services: route as before
        add_health_to_server(servicer, server)
        return
    server.add_passthrough_service(HEALTH_SERVICE)
    limit = int(os.environ.get(MAX_WATCHERS_ENV, DEFAULT_MAX_WATCHERS))
    # Lenient parsing: garbage bytes reach Check/Watch as UndecodableRequest and get INVALID_ARGUMENT.
    health_pb2_grpc.add_HealthServicer_to_server(ProxyHealth(max_watchers=limit), LenientServer(server))


class _AppReadiness:
    """One app's last known status and when it was read; one refresh in flight at a time."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.read_at = 0.0
        self.handle: Any = None
        self.lock = asyncio.Lock()


class ProxyHealth(health_pb2_grpc.HealthServicer):
    """Check and Watch over polled app readiness; Watch streams capped per proxy."""

    def __init__(self, max_watchers: int = DEFAULT_MAX_WATCHERS) -> None:
        self.max_watchers = max_watchers
        self.watchers = 0
        self._apps: dict[str, _AppReadiness] = {}

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:  # noqa: ANN401
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=await self._status(context))

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: Any,  # noqa: ANN401
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if isinstance(request, UndecodableRequest):
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(request.describe())
            return
        if request.service not in SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        if self.watchers >= self.max_watchers:  # ends the call with this status (no abort inside a generator)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(
                f"this proxy already serves {self.max_watchers} health Watch streams "
                "(max_health_watchers); use Check or retry later"
            )
            return
        self.watchers += 1
        try:
            last = None
            while True:
                status = await self._status(context)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(POLL_S)
        finally:
            self.watchers -= 1

    async def _status(self, context: Any) -> int:  # noqa: ANN401
        app = dict(context.invocation_metadata()).get("application", "")
        state = self._apps.setdefault(app, _AppReadiness())
        if time.monotonic() - state.read_at < POLL_S:
            return state.status  # type: ignore[return-value]  # read once: read_at 0.0 is stale at first
        async with state.lock:
            if time.monotonic() - state.read_at >= POLL_S:
                state.status = await self._read(app, state)
                state.read_at = time.monotonic()
        return state.status  # type: ignore[return-value]  # read once: read_at 0.0 is stale at first

    async def _read(self, app: str, state: _AppReadiness) -> int:
        from ray.serve.exceptions import BackPressureError

        try:
            if state.handle is None:
                state.handle = await asyncio.to_thread(_ingress_handle, app)
            if state.handle is None:
                return NOT_SERVING
            ready = await asyncio.wait_for(state.handle.ready.remote(), READY_TIMEOUT_S)
            return SERVING if ready else NOT_SERVING
        except BackPressureError:  # busy is not down: keep what we knew
            return state.status if state.status is not None else NOT_SERVING
        except Exception as exc:  # noqa: BLE001  # no app, no replica, timeout: not serving
            log.info("health of app %r: %r", app, exc)
            state.handle = None  # the app may have been redeployed: look it up again next time
            return NOT_SERVING


def _ingress_handle(app: str) -> Any:  # noqa: ANN401  # a DeploymentHandle, or None without a unique app
    """A handle to the app's ingress (blocking controller calls: run in a thread)."""
    from ray import serve

    if not app:
        names = list(serve.status().applications)
        if len(names) != 1:
            return None
        app = names[0]
    return serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=app, _record_telemetry=False)
