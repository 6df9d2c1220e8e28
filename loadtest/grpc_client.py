"""Streaming client of epserve's gRPC Generate (grpc.aio over the generated stubs), timing every message.

Same contract as http_client.py: `send` never raises and returns a `RequestResult`. Generate
streams one message per token (tokens counted as len(token_ids)); the last message carries the
usage. Token-id prompts go as `token_ids`, text as `text`. Errors are `grpc_<status code>`.
Every call sends a fresh `request_id` metadata entry: Serve hands the ingress only what the client
sent, and the engine refuses two running requests with one id (an empty one included).
Tests: tests/loadtest/test_bench.py (the real app).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc

from loadtest.datasets import BenchRequest
from loadtest.metrics import RequestResult
from replicas.proto import epserve_pb2 as pb
from replicas.proto import epserve_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 2**20


class GrpcGenerateClient:
    """Streams Generate calls to one server; use as `async with`.

    Args:
        target: "host:port" of Serve's gRPC proxy.
        model: model name ("" = the server's).
        api_key: sent as `authorization: Bearer KEY` metadata.
        application: Serve application name (needed when the cluster runs several apps).
        temperature: sampling temperature (0 = greedy).
        timeout_s: deadline of one whole call.
        ignore_eos: set ignore_eos and min_tokens = max_tokens (exact output lengths), as over HTTP.
    """

    def __init__(
        self,
        target: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        application: str | None = None,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        ignore_eos: bool = False,
    ) -> None:
        self.target = target
        self.ignore_eos = ignore_eos
        self.model = model or ""
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.metadata: list[tuple[str, str]] = []
        if api_key:
            self.metadata.append(("authorization", f"Bearer {api_key}"))
        if application:
            self.metadata.append(("application", application))
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.EpserveStub | None = None

    async def __aenter__(self) -> GrpcGenerateClient:
        self.channel = grpc.aio.insecure_channel(
            self.target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = pb_grpc.EpserveStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def resolve_model(self) -> str:
        """The configured model, else the server's (ModelInfo)."""
        if not self.model:
            assert self.stub is not None, "use the client as `async with`"
            try:
                info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30, metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                raise ValueError(f"ModelInfo on {self.target} failed: {exc.code().name}: {exc.details()}") from None
            self.model = info.model
        return self.model

    def request(self, req: BenchRequest) -> pb.GenerateRequest:
        sampling = pb.SamplingParams(max_tokens=req.output_len, temperature=self.temperature)
        if self.ignore_eos:
            sampling.min_tokens, sampling.ignore_eos = req.output_len, True
        out = pb.GenerateRequest(model=self.model, sampling=sampling)
        if isinstance(req.prompt, str):
            out.text = req.prompt
        else:
            out.token_ids.ids.extend(req.prompt)
        return out

    async def send(self, req: BenchRequest, now: Callable[[], float]) -> RequestResult:
        """Run one Generate call to the end (see http_client.OpenAICompletionsClient.send)."""
        assert self.stub is not None, "use the client as `async with`"
        message = self.request(req)
        r = RequestResult(req.prompt_len, req.output_len, start=now(), group=req.group)
        try:
            metadata = [*self.metadata, ("request_id", uuid.uuid4().hex)]
            call = self.stub.Generate(message, timeout=self.timeout_s, metadata=metadata)
            async for msg in call:
                t = now()
                if msg.token_ids:
                    r.chunk_times.append(t)
                    r.chunk_tokens.append(len(msg.token_ids))
                if msg.HasField("usage"):
                    r.usage_prompt_tokens = msg.usage.prompt_tokens
                    r.usage_completion_tokens = msg.usage.completion_tokens
        except grpc.aio.AioRpcError as exc:
            r.error, r.error_detail = f"grpc_{exc.code().name.lower()}", str(exc.details())[:300]
        r.end = now()
        return r
