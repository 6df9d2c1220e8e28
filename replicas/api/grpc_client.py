"""A small Python client for the epserve gRPC API (what internal services import).

Wraps the generated stubs: API key and Serve application in the metadata, a deadline on every
call (gRPC sets none by default), and helpers that collect a stream into a result.
Example:
    with EpserveClient("127.0.0.1:9000", api_key="k") as c:
        print(c.complete(text="Hello", max_tokens=16).text)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from replicas.proto import epserve_pb2 as pb
from replicas.proto import epserve_pb2_grpc as pb_grpc


@dataclass
class Completion:
    """A collected Generate stream (choice 0 unless `index` says otherwise)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None


class EpserveClient:
    """Client of one server.

    Args:
        target: "host:port" of Serve's gRPC proxy.
        api_key: sent as `authorization: Bearer <key>`.
        application: Serve application name (needed when the cluster runs several apps).
        timeout_s: default deadline of each call.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        application: str | None = None,
        timeout_s: float = 120.0,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.channel = channel or grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)],
        )
        self.stub = pb_grpc.EpserveStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata: list[tuple[str, str]] = []
        if api_key:
            self.metadata.append(("authorization", f"Bearer {api_key}"))
        if application:
            self.metadata.append(("application", application))

    def __enter__(self) -> EpserveClient:
        return self

    def __exit__(self, *exc: Any) -> None:  # noqa: ANN401
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def sampling(**kw: Any) -> pb.SamplingParams:  # noqa: ANN401
        """SamplingParams from keyword arguments (temperature=0, max_tokens=16, stop=[...], ...)."""
        return pb.SamplingParams(**kw)

    def generate(
        self,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        messages: list[pb.ChatMessage] | None = None,
        model: str = "",
        timeout_s: float | None = None,
        cache_salt: str | None = None,
        **sampling: Any,  # noqa: ANN401
    ) -> Iterator[pb.GenerateResponse]:
        """Stream Generate; cancel by closing the returned iterator (`.cancel()` on it). `cache_salt`: the
        prefix-cache namespace (None: the shared one)."""
        req = pb.GenerateRequest(model=model, sampling=self.sampling(**sampling))
        if cache_salt is not None:
            req.cache_salt = cache_salt
        if text is not None:
            req.text = text
        elif token_ids is not None:
            req.token_ids.ids.extend(token_ids)
        elif messages is not None:
            req.messages.messages.extend(messages)
        return self.stub.Generate(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def complete(self, **kw: Any) -> Completion:  # noqa: ANN401
        """Generate, collected (choice 0)."""
        out = Completion()
        for msg in self.generate(**kw):
            if msg.HasField("usage"):
                out.usage = msg.usage
            if msg.index == 0:
                out.text += msg.text
                out.token_ids += list(msg.token_ids)
                out.finish_reason = msg.finish_reason or out.finish_reason
        return out

    def chat(
        self,
        messages: list[pb.ChatMessage],
        *,
        model: str = "",
        tools: list[pb.Tool] | None = None,
        tool_choice: str = "",
        response_format: pb.ResponseFormat | None = None,
        enable_thinking: bool | None = None,
        max_thinking_tokens: int | None = None,
        timeout_s: float | None = None,
        cache_salt: str | None = None,
        **sampling: Any,  # noqa: ANN401
    ) -> Iterator[pb.ChatResponse]:
        req = pb.ChatRequest(
            model=model,
            messages=messages,
            sampling=self.sampling(**sampling),
            tools=tools or [],
            tool_choice=tool_choice,
        )
        if response_format is not None:
            req.response_format.CopyFrom(response_format)
        if enable_thinking is not None:
            req.enable_thinking = enable_thinking
        if max_thinking_tokens is not None:
            req.max_thinking_tokens = max_thinking_tokens
        if cache_salt is not None:
            req.cache_salt = cache_salt
        return self.stub.Chat(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def model_info(self, timeout_s: float | None = None) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout_s or self.timeout_s, metadata=self.metadata)

    def health(self, service: str = "", timeout_s: float = 10.0) -> int:
        """grpc.health.v1 status (health_pb2.HealthCheckResponse.SERVING == 1)."""
        meta = [m for m in self.metadata if m[0] == "application"]
        return self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=meta
        ).status
