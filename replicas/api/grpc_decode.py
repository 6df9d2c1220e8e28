"""Request parsing for Serve's gRPC proxy that never raises: bad bytes become INVALID_ARGUMENT.

Serve's proxy parses each request with the generated stubs' `FromString` before routing it;
when that raises (garbage bytes, invalid UTF-8 in a string field), grpcio ends the call itself
with a status the application never sees (not INVALID_ARGUMENT). The servicer functions here
register the same handlers with a parser that returns an `UndecodableRequest` instead, which
the proxy forwards like any request; the ingress answers it INVALID_ARGUMENT naming the
parse error (replicas/api/grpc_service.py). Kept free of heavy imports: the proxy imports it.
Tests: tests/replicas/test_input_limits.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class UndecodableRequest:
    """A request message that did not parse as its RPC's input type."""

    message_type: str
    error: str
    size: int

    def describe(self) -> str:
        return f"the request is not a valid {self.message_type} message ({self.size} bytes): {self.error}"


def _lenient(handler: Any) -> Any:  # noqa: ANN401  # grpc.RpcMethodHandler (a namedtuple)
    parse: Callable[[bytes], Any] | None = handler.request_deserializer
    if parse is None or getattr(parse, "lenient", False):
        return handler
    name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    message_type = name.full_name if name is not None else "protobuf"

    def parse_or_mark(data: bytes) -> Any:  # noqa: ANN401
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return UndecodableRequest(message_type, str(exc)[:200] or type(exc).__name__, len(data))

    parse_or_mark.lenient = True  # type: ignore[attr-defined]  # a marker attribute on the function
    return handler._replace(request_deserializer=parse_or_mark)


class LenientServer:
    """Wraps the server handed to a generated `add_*Servicer_to_server`, making its parsers lenient."""

    def __init__(self, server: Any) -> None:  # noqa: ANN401
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:  # noqa: ANN401
        for h in generic_handlers:
            h._method_handlers = {k: _lenient(v) for k, v in h._method_handlers.items()}
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:
            add(service, {k: _lenient(v) for k, v in handlers.items()})


def add_epserve_to_server(servicer: Any, server: Any) -> None:  # noqa: ANN401
    from replicas.api.grpc_proxy_cancel import install_pump
    from replicas.proto.epserve_pb2_grpc import add_EpserveServicer_to_server

    install_pump(server)  # cancels and deadlines always reach the replica (replicas/api/grpc_proxy_cancel.py)
    add_EpserveServicer_to_server(servicer, LenientServer(server))


def add_health_to_server(servicer: Any, server: Any) -> None:  # noqa: ANN401
    from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server

    add_HealthServicer_to_server(servicer, LenientServer(server))
