"""The gRPC API (replicas/proto/epserve.proto), served by Ray Serve's gRPC proxy on its own port.

Owns: turning proto requests into the same engine requests the HTTP API builds (one code path
for limits and defaults: replicas/api/request_builder.py), streaming results as proto messages,
API-key checks on metadata, the standard grpc.health.v1 service, and status codes
(INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, UNAUTHENTICATED; the client's
cancellation or deadline aborts the engine request). Requests go through the engine client the
HTTP API uses too (replicas/api/engine_client.py); the Serve ingress class exposes these as methods
named after the RPCs (replicas/api/ingress.py, which this module does not know). Tests: tests/replicas/test_grpc.py.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ValidationError

from replicas.api.chat_stream import ChatChoiceStream
from replicas.api.choice_text import ChoiceDelta
from replicas.api.engine_client import EngineClient
from replicas.api.grpc_decode import UndecodableRequest
from replicas.api.json_input import parse_json
from replicas.api.openai_protocol import ApiError, ChatCompletionRequest, CompletionRequest, validation_error
from replicas.api.request_builder import ModelContext
from replicas.proto import epserve_pb2 as pb
from replicas.serving.app_args import AppArgs

SERVICE = "epserve.v1.Epserve"
# The generated registrations, with parsers that turn bad bytes into INVALID_ARGUMENT (replicas/api/grpc_decode.py).
SERVICER_FUNCTIONS = [
    "replicas.api.grpc_decode.add_epserve_to_server",
    "replicas.api.proxy_health.add_health_servicer",  # grpc.health.v1, answered by the proxy itself
]
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_options(port: int, *, request_timeout_s: float | None = None) -> dict[str, Any]:
    """Serve's gRPC proxy options for this API (reflection on)."""
    return {
        "port": port,
        "grpc_servicer_functions": list(SERVICER_FUNCTIONS),
        "enable_reflection": True,
        "request_timeout_s": request_timeout_s,
    }


class GrpcError(Exception):
    """Raised after setting the status on the Serve gRPC context: Serve ends the call with that status."""


def fail(ctx: Any, err: ApiError) -> GrpcError:  # noqa: ANN401  # RayServegRPCContext
    ctx.set_code(STATUS.get(err.status, grpc.StatusCode.INTERNAL))
    ctx.set_details(err.message)
    return GrpcError(err.message)


def sampling_fields(s: pb.SamplingParams, *, chat: bool) -> dict[str, Any]:
    """Proto sampling params -> the OpenAI request fields of a chat (`chat`) or completions request, validated by
    the HTTP API's pydantic models: every cap (logprobs <= 20, n, stops, ranges) is the same for both APIs."""
    out: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "max_tokens",
        "skip_special_tokens",
    ):
        if s.HasField(name):
            out[name] = getattr(s, name)
    if s.min_tokens:
        out["min_tokens"] = s.min_tokens
    if s.stop:
        out["stop"] = list(s.stop)
    if s.stop_token_ids:
        out["stop_token_ids"] = list(s.stop_token_ids)
    if s.ignore_eos:
        out["ignore_eos"] = True
    out["n"] = s.n or 1
    if s.HasField("logprobs"):
        if chat:
            out["logprobs"], out["top_logprobs"] = True, s.logprobs
        else:
            out["logprobs"] = s.logprobs
    return out


def logprobs_pb(ev: ChoiceDelta) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(token_id=t, logprob=lp.logprob, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in lp.top])
        for t, lp in zip(ev.token_ids, ev.logprobs)
    ]


def chat_message_dict(m: pb.ChatMessage) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": m.role}
    if m.parts:
        parts = []
        for p in m.parts:
            if p.HasField("text"):
                parts.append({"type": "text", "text": p.text})
            else:
                import base64

                url = f"data:{p.image.mime_type or 'image/png'};base64,{base64.b64encode(p.image.data).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
        msg["content"] = parts
    elif m.content or not m.tool_calls:
        msg["content"] = m.content
    if m.tool_calls:
        msg["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    for field in ("tool_call_id", "reasoning_content", "name"):
        if getattr(m, field):
            msg[field] = getattr(m, field)
    return msg


class GrpcApi:
    """RPC implementations.

    Args:
        engine: the engine client (shared with the HTTP API). ctx: the model context. args: the app's arguments.
    """

    def __init__(self, engine: EngineClient, ctx: ModelContext, args: AppArgs) -> None:
        self.engine = engine
        self.ctx = ctx
        self.args = args
        self.api_key = args.resolved_api_key()

    def check_auth(self, ctx: Any) -> None:  # noqa: ANN401
        key = self.api_key
        if not key:
            return
        given = dict(ctx.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):  # constant time
            raise fail(ctx, ApiError(401, "missing or invalid API key in the 'authorization' metadata"))

    @staticmethod
    def check_decoded(request: Any, ctx: Any) -> None:  # noqa: ANN401
        """Bytes the proxy could not parse (replicas/api/grpc_decode.py) are the client's error: INVALID_ARGUMENT."""
        if isinstance(request, UndecodableRequest):
            raise fail(ctx, ApiError(400, request.describe()))

    def _validate(self, model: type[BaseModel], fields: dict[str, Any]) -> Any:  # noqa: ANN401
        try:
            return model.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc) from None

    async def generate(self, request: pb.GenerateRequest, ctx: Any) -> AsyncIterator[pb.GenerateResponse]:  # noqa: ANN401
        self.check_auth(ctx)
        self.check_decoded(request, ctx)
        rid = ctx.request_id() or uuid.uuid4().hex  # unique when the client sends none
        try:
            ctxm = self.ctx
            kind = request.WhichOneof("prompt")
            if kind is None:
                raise ApiError(400, "give a prompt: token_ids, text or messages", param="prompt")
            fields = {"model": request.model or ctxm.name, **sampling_fields(request.sampling, chat=kind == "messages")}
            if request.HasField("cache_salt"):
                fields["cache_salt"] = request.cache_salt
            if kind == "messages":
                req = self._validate(
                    ChatCompletionRequest,
                    {**fields, "messages": [chat_message_dict(m) for m in request.messages.messages]},
                )
                ctxm.check_model(req.model)
                chat = await asyncio.to_thread(ctxm.chat_prompt, req)
                prompt, mm, hints = chat.ids, chat.mm, chat.cache_hints
            else:
                if "max_tokens" not in fields:
                    fields["max_tokens"] = None
                req = self._validate(
                    CompletionRequest,
                    {**fields, "prompt": list(request.token_ids.ids) if kind == "token_ids" else request.text},
                )
                ctxm.check_model(req.model)
                prompt, mm, hints = (await asyncio.to_thread(ctxm.completion_prompts, req))[0], None, ()
            ctxm.check_ids(prompt, "prompt")
            greq = ctxm.build(req, prompt, request_id=rid, mm=mm, cache_hints=hints)
            stream = await self.engine.start(greq)
        except ApiError as err:
            raise fail(ctx, err) from None
        completion: dict[int, int] = {}
        async for ev in self.engine.deltas(stream):
            if ev.error is not None:
                raise fail(ctx, ApiError(ev.error.status, ev.error.message))
            completion[ev.index] = ev.completion_tokens
            yield pb.GenerateResponse(
                index=ev.index,
                token_ids=list(ev.token_ids),
                text=ev.text,
                logprobs=logprobs_pb(ev),
                finish_reason=ev.finish_reason or "",
                stop_reason="" if ev.stop_reason is None else str(ev.stop_reason),
            )
        total = sum(completion.values())
        yield pb.GenerateResponse(
            usage=pb.Usage(
                prompt_tokens=len(prompt),
                completion_tokens=total,
                total_tokens=len(prompt) + total,
                cached_tokens=stream.cached_tokens,
            )
        )

    async def chat(self, request: pb.ChatRequest, ctx: Any) -> AsyncIterator[pb.ChatResponse]:  # noqa: ANN401
        """Chat with the HTTP API's features: reasoning split, tool calls, structured output."""
        self.check_auth(ctx)
        self.check_decoded(request, ctx)
        rid = ctx.request_id() or uuid.uuid4().hex  # unique when the client sends none
        try:
            ctxm = self.ctx
            req = self._validate(ChatCompletionRequest, chat_fields(request, default_model=ctxm.name))
            ctxm.check_model(req.model)
            chat = await asyncio.to_thread(ctxm.chat_prompt, req)
            greq = ctxm.build(
                req,
                chat.ids,
                request_id=rid,
                grammar=ctxm.chat_grammar(req, thinking=chat.thinking),
                mm=chat.mm,
                thinking=chat.thinking,
                cache_hints=chat.cache_hints,
            )
            stream = await self.engine.start(greq)
        except ApiError as err:
            raise fail(ctx, err) from None
        parsers: dict[int, ChatChoiceStream] = {}
        completion: dict[int, int] = {}
        async for ev in self.engine.deltas(stream):
            if ev.error is not None:
                raise fail(ctx, ApiError(ev.error.status, ev.error.message))
            parser = parsers.setdefault(ev.index, ChatChoiceStream(thinking=chat.thinking, tools=chat.tools))
            delta = parser.feed(ev.text)
            if ev.finish_reason is not None:
                delta = delta + parser.finish()
            completion[ev.index] = ev.completion_tokens
            yield pb.ChatResponse(
                index=ev.index,
                content=delta.content,
                reasoning_content=delta.reasoning,
                tool_calls=[tool_call_delta_pb(d) for d in delta.tool_calls],
                token_ids=list(ev.token_ids),
                logprobs=logprobs_pb(ev),
                finish_reason=parser.finish_reason(ev.finish_reason) or "",
            )
        total = sum(completion.values())
        yield pb.ChatResponse(
            usage=pb.Usage(
                prompt_tokens=len(chat.ids),
                completion_tokens=total,
                total_tokens=len(chat.ids) + total,
                cached_tokens=stream.cached_tokens,
            )
        )

    async def model_info(self, request: pb.ModelInfoRequest, ctx: Any) -> pb.ModelInfoResponse:  # noqa: ANN401
        self.check_auth(ctx)
        self.check_decoded(request, ctx)
        c = self.ctx
        a = self.args
        return pb.ModelInfoResponse(
            model=c.name,
            max_model_len=c.max_model_len,
            vocab_size=c.cfg.vocab_size,
            eos_token_ids=list(c.defaults.eos_token_ids),
            trunk_ranks=a.trunk_ranks,
            expert_ranks=a.expert_ranks,
            model_type=c.cfg.model_type,
            num_experts=c.cfg.num_experts,
            num_experts_per_tok=c.cfg.num_experts_per_tok,
        )

    async def health_check(self, request: health_pb2.HealthCheckRequest, ctx: Any) -> health_pb2.HealthCheckResponse:  # noqa: ANN401
        self.check_decoded(request, ctx)
        if request.service not in ("", SERVICE):
            raise fail(ctx, ApiError(404, f"unknown service {request.service!r}"))
        ready = await self.engine.ready()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def health_watch(
        self,
        request: health_pb2.HealthCheckRequest,
        ctx: Any,  # noqa: ANN401
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        self.check_decoded(request, ctx)
        if request.service not in ("", SERVICE):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            status = (await self.health_check(request, ctx)).status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)


def tool_call_delta_pb(d: dict[str, Any]) -> pb.ToolCallDelta:
    fn = d.get("function") or {}
    return pb.ToolCallDelta(
        index=d.get("index", 0), id=d.get("id", ""), name=fn.get("name", ""), arguments=fn.get("arguments", "")
    )


def chat_fields(request: pb.ChatRequest, *, default_model: str) -> dict[str, Any]:
    """A proto ChatRequest as the fields of the HTTP API's ChatCompletionRequest (one validation path)."""
    fields: dict[str, Any] = {
        "model": request.model or default_model,
        **sampling_fields(request.sampling, chat=True),
        "messages": [chat_message_dict(m) for m in request.messages],
    }
    if request.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": _json_or_400(t.parameters_json, f"tools[{t.name}].parameters_json")
                    if t.parameters_json
                    else {"type": "object", "properties": {}},
                },
            }
            for t in request.tools
        ]
    if request.tool_choice:
        fields["tool_choice"] = (
            request.tool_choice
            if request.tool_choice in ("auto", "none", "required")
            else {"type": "function", "function": {"name": request.tool_choice}}
        )
    rf = request.response_format
    if rf.json_object:
        fields["response_format"] = {"type": "json_object"}
    elif rf.json_schema:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": _json_or_400(rf.json_schema, "response_format.json_schema")},
        }
    elif rf.regex:
        fields["structured_outputs"] = {"regex": rf.regex}
    elif rf.choice:
        fields["structured_outputs"] = {"choice": list(rf.choice)}
    if request.HasField("enable_thinking"):
        fields["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
    if request.HasField("max_thinking_tokens"):
        fields["max_thinking_tokens"] = request.max_thinking_tokens
    if request.HasField("cache_salt"):
        fields["cache_salt"] = request.cache_salt
    return fields


def _json_or_400(text: str, param: str) -> Any:  # noqa: ANN401
    return parse_json(text, param=param, what=param)  # the HTTP bodies' limits: depth, lone surrogates
