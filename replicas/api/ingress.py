"""The HTTP ingress: OpenAI-compatible routes in front of the engine deployment.

Owns: the route table (`api`), API-key checking for every route but /health, request ids
(X-Request-Id header in and out, in the body id and in every log line), body size limits,
turning bad input into OpenAI error bodies (400/401/404/413/429/503 with Retry-After), and
streaming as SSE (one chunk per choice per engine step, usage chunk, in-band error + [DONE]).
The engine client (replicas/api/engine_client.py) starts requests and turns the engine's token
ids into text; the gRPC service (replicas/api/grpc_service.py) shares it.
`serve.ingress(build_api)` and the deployment options are applied in replicas/serving/app.py. Must not: run the model.
A client that leaves cancels its engine requests (tests/replicas/test_cancellation.py); open streams are
counted so a stopping server waits for them (tests/replicas/test_graceful_shutdown.py).
Admin: POST /reset_prefix_cache drops every engine replica's prefix cache (epserve/reset_prefix_cache_cmd.py).
Tests: tests/replicas/test_serving.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_shards.image_processing import MediaLimits
from replicas.api.body_limits import read_body
from replicas.api.chat_stream import ChatChoiceStream
from replicas.api.choice_text import ChoiceDelta
from replicas.api.engine_client import EngineClient, EngineStream
from replicas.api.grpc_service import GrpcApi
from replicas.api.json_input import parse_json
from replicas.api.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ResetPrefixCacheRequest,
    TokenizeRequest,
    bad_request,
    validation_error,
)
from replicas.api.openai_responses import (
    ChoiceState,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    usage,
    usage_chunk,
)
from replicas.api.request_builder import ModelContext
from replicas.engine.engine_types import EngineFailure
from replicas.serving.app_args import AppArgs
from replicas.serving.metrics import MetricsRegistry, push_forever

log = logging.getLogger("ray.serve.epserve.ingress")

MAX_BODY_BYTES = 16 * 2**20
PUBLIC_PATHS = ("/health",)
METRICS_PUSH_S = 1.0
REQUEST_ID_HEADER = "X-Request-Id"
ENGINE_DEPLOYMENT = "EpserveEngine"  # the engine deployment's name (replicas/serving/app.py)
RESET_TIMEOUT_S = 30.0  # how long /reset_prefix_cache waits for every engine replica to answer
# The engine replica(s) that ran the request (RequestOutput.engine_id), so load tests can see where prefix-aware
# routing sent it (loadtest/, benchmarks/bench_prefix_cache.py).
ENGINE_HEADER = "x-epserve-engine"


async def _parse(request: Request, model: type[BaseModel], *, empty_ok: bool = False) -> Any:  # noqa: ANN401  # returns an instance of `model`
    # cap and read deadline: AppArgs, put on the request by the auth middleware
    raw = await read_body(request, *getattr(request.state, "body_limits", (MAX_BODY_BYTES, 10.0)))
    if empty_ok and not raw.strip():
        raw = b"{}"
    obj = parse_json(raw)  # depth and lone-surrogate limits: a 400, not a RecursionError / UnicodeEncodeError later
    if not isinstance(obj, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _sse(obj: Any) -> str:  # noqa: ANN401  # any JSON value
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Ingress:
    """Route handlers; one instance per ingress replica.

    Args:
        engine: a Serve handle to the engine deployment.
        args: the app's `AppArgs` as a dict.
        metrics_hub: a handle to the app's MetricsHub actor (None in tests without one).
    """

    def __init__(self, engine: Any, args: dict[str, Any], metrics_hub: Any = None) -> None:  # noqa: ANN401
        from model_shards.tiny_checkpoint import resolve_model_dir

        self.args = AppArgs.model_validate(args)
        folder = resolve_model_dir(self.args.model)
        name = self.args.served_model_name or default_model_name(self.args.model)
        a = self.args
        self.ctx = ModelContext.load(
            folder,
            name=name,
            max_model_len=a.max_model_len,
            cache_tokens=a.num_kv_blocks * a.block_size,
            default_max_tokens=a.default_max_tokens,
            max_n=a.max_n,
            max_fanout=a.max_fanout,
            media_limits=MediaLimits(
                max_images=a.max_images_per_request,
                max_videos=a.max_videos_per_request,
                max_bytes=a.max_image_bytes,
                max_pixels=a.max_image_pixels,
                max_frames=a.max_video_frames,
                max_video_bytes=a.max_video_bytes,
                max_video_seconds=a.max_video_seconds,
                max_video_decoded_frames=a.max_video_decoded_frames,
                max_video_decoded_pixels=a.max_video_decoded_pixels,
                max_video_decode_s=a.max_video_decode_s,
            ),
            local_media=a.allowed_local_media_path,
            max_thinking_tokens=a.max_thinking_tokens,
        )
        self.api_key = self.args.resolved_api_key()
        self.engine = EngineClient(engine, self.ctx.tokenizer, caller=_replica_name)
        self.hub = metrics_hub
        self.metrics = MetricsRegistry()
        self._push_task: asyncio.Task | None = None
        self.open_streams = 0  # streaming responses not yet ended (a stopping server waits for them)
        self.grpc = GrpcApi(self.engine, self.ctx, self.args)

    # ----------------------------------------------------------------- generation
    async def _collect(self, streams: list[EngineStream], offsets: list[int]) -> list[ChoiceState]:
        """Run every stream to the end (non-streaming responses)."""

        async def one(stream: EngineStream, offset: int) -> list[ChoiceState]:
            states: dict[int, ChoiceState] = {}
            async for ev in self.engine.deltas(stream):
                if ev.error is not None:
                    raise ApiError(
                        ev.error.status,
                        ev.error.message,
                        type=_error_type(ev.error),
                        retry_after=2 if ev.error.retriable else None,
                    )
                st = states.setdefault(ev.index, ChoiceState(index=offset + ev.index))
                st.text += ev.text
                st.token_ids += list(ev.token_ids)
                st.logprobs += list(ev.logprobs)
                st.completion_tokens = ev.completion_tokens
                if ev.finish_reason is not None:
                    st.finish_reason, st.stop_reason = ev.finish_reason, ev.stop_reason
            return list(states.values())

        parts = await asyncio.gather(*(one(s, o) for s, o in zip(streams, offsets)))
        return [c for p in parts for c in p]

    async def chat(self, request: Request) -> Response:
        rid = request.state.request_id
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        self.ctx.check_model(req.model)
        # rendering may decode and resize images: off the event loop
        chat = await asyncio.to_thread(self.ctx.chat_prompt, req)
        prompt = chat.ids
        greq = self.ctx.build(
            req,
            prompt,
            request_id=rid,
            grammar=self.ctx.chat_grammar(req, thinking=chat.thinking),
            mm=chat.mm,
            thinking=chat.thinking,
            cache_hints=chat.cache_hints,
        )
        log.info("request %s: chat, %d prompt tokens, n=%d, stream=%s", rid, len(prompt), req.n, req.stream)
        stream = await self.engine.start(greq)
        body_id = f"chatcmpl-{rid}"
        if not req.stream:
            choices = await self._collect([stream], [0])
            for c in choices:
                parser = ChatChoiceStream(thinking=chat.thinking, tools=chat.tools)
                delta = parser.feed(c.text) + parser.finish()
                c.text, c.reasoning, c.tool_calls = delta.content, delta.reasoning, parser.tool_calls
                c.finish_reason = parser.finish_reason(c.finish_reason)
            return JSONResponse(
                chat_response(
                    body_id,
                    self.ctx.name,
                    choices,
                    prompt_tokens=len(prompt),
                    tok=self.ctx.tokenizer,
                    want_logprobs=req.logprobs,
                    cached_tokens=stream.cached_tokens,
                ),
                headers=_engine_header([stream]),
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        async def sse() -> AsyncIterator[str]:
            created = int(time.time())
            parsers: dict[int, ChatChoiceStream] = {}
            completion: dict[int, int] = {}
            async for ev in self.engine.deltas(stream):
                if ev.error is not None:
                    yield _sse(_stream_error(ev))
                    break
                first = ev.index not in parsers
                parser = parsers.setdefault(ev.index, ChatChoiceStream(thinking=chat.thinking, tools=chat.tools))
                delta = parser.feed(ev.text)
                if ev.finish_reason is not None:
                    delta = delta + parser.finish()
                chunk = chat_chunk(
                    body_id,
                    self.ctx.name,
                    created,
                    ev,
                    delta,
                    first=first,
                    finish_reason=parser.finish_reason(ev.finish_reason),
                    tok=self.ctx.tokenizer,
                    want_logprobs=req.logprobs,
                )
                completion[ev.index] = ev.completion_tokens
                if continuous:
                    chunk["usage"] = usage(len(prompt), sum(completion.values()), stream.cached_tokens)
                yield _sse(chunk)
            else:
                if include_usage:
                    yield _sse(
                        usage_chunk(
                            body_id,
                            self.ctx.name,
                            created,
                            "chat.completion.chunk",
                            len(prompt),
                            sum(completion.values()),
                            stream.cached_tokens,
                        )
                    )
            yield "data: [DONE]\n\n"

        return _sse_response(self, sse(), [stream])

    async def completions(self, request: Request) -> Response:
        rid = request.state.request_id
        req: CompletionRequest = await _parse(request, CompletionRequest)
        self.ctx.check_model(req.model)
        prompts = await asyncio.to_thread(self.ctx.completion_prompts, req)  # long texts: off the event loop
        for ids in prompts:
            self.ctx.check_ids(ids, "prompt")
        grammar = self.ctx.completion_grammar(req)
        greqs = [
            self.ctx.build(req, ids, request_id=rid if len(prompts) == 1 else f"{rid}-{i}", grammar=grammar)
            for i, ids in enumerate(prompts)
        ]
        log.info("request %s: completion, %d prompt(s), n=%d, stream=%s", rid, len(prompts), req.n, req.stream)
        streams = []
        try:
            for g in greqs:
                streams.append(await self.engine.start(g))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        offsets = [i * req.n for i in range(len(prompts))]
        n_prompt = sum(len(p) for p in prompts)
        body_id = f"cmpl-{rid}"
        want_lp = req.logprobs is not None
        if not req.stream:
            choices = await self._collect(streams, offsets)
            echo = (
                {offsets[i] + j: self.ctx.tokenizer.decode(p) for i, p in enumerate(prompts) for j in range(req.n)}
                if req.echo
                else None
            )
            return JSONResponse(
                completion_response(
                    body_id,
                    self.ctx.name,
                    choices,
                    prompt_tokens=n_prompt,
                    tok=self.ctx.tokenizer,
                    want_logprobs=want_lp,
                    echo_texts=echo,
                    cached_tokens=sum(s.cached_tokens for s in streams),
                ),
                headers=_engine_header(streams),
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def sse() -> AsyncIterator[str]:
            created = int(time.time())
            completion: dict[int, int] = {}
            text_len: dict[int, int] = {}
            merged = _merge([self.engine.deltas(s) for s in streams], offsets)
            async for index, ev in merged:
                if ev.error is not None:
                    yield _sse(_stream_error(ev))
                    break
                yield _sse(
                    completion_chunk(
                        body_id,
                        self.ctx.name,
                        created,
                        ev,
                        index=index,
                        tok=self.ctx.tokenizer,
                        want_logprobs=want_lp,
                        offset=text_len.get(index, 0),
                    )
                )
                text_len[index] = text_len.get(index, 0) + len(ev.text)
                completion[index] = ev.completion_tokens
            else:
                if include_usage:
                    yield _sse(
                        usage_chunk(
                            body_id,
                            self.ctx.name,
                            created,
                            "text_completion",
                            n_prompt,
                            sum(completion.values()),
                            sum(s.cached_tokens for s in streams),
                        )
                    )
            yield "data: [DONE]\n\n"

        return _sse_response(self, sse(), streams)

    # ----------------------------------------------------------------- utility routes
    def models(self) -> dict[str, Any]:
        # `root` is the served name, never the folder: where the weights sit on disk is not the client's business.
        c, a = self.ctx, self.args
        entry = {
            "id": c.name,
            "object": "model",
            "created": 0,
            "owned_by": "epserve",
            "root": c.name,
            "max_model_len": c.max_model_len,
            "max_position_embeddings": c.cfg.max_position_embeddings,
        }
        if c.max_model_len < c.cfg.max_position_embeddings:  # say why the context is shorter than `inspect` shows
            cache = a.num_kv_blocks * a.block_size
            entry["max_model_len_reason"] = (
                f"set by max_model_len {a.max_model_len}"
                if a.max_model_len is not None
                else f"capped by the KV cache of one trunk rank: num_kv_blocks {a.num_kv_blocks} x block_size "
                f"{a.block_size} = {cache} tokens"
            )
        return {"object": "list", "data": [entry]}

    async def tokenize(self, request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await _parse(request, TokenizeRequest)
        self.ctx.check_model(req.model)
        if req.prompt is not None:
            ids = await asyncio.to_thread(self.ctx.encode_text, req.prompt)
        else:
            chat = ChatCompletionRequest(
                model=self.ctx.name,
                messages=req.messages or [],
                add_generation_prompt=req.add_generation_prompt,
                chat_template_kwargs=req.chat_template_kwargs,
            )
            ids = await asyncio.to_thread(self.ctx.render_chat, chat)
        return {"count": len(ids), "max_model_len": self.ctx.max_model_len, "tokens": ids}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await _parse(request, DetokenizeRequest)
        self.ctx.check_model(req.model)
        if req.tokens:
            self.ctx.check_ids(req.tokens, "tokens")
        return {"prompt": self.ctx.tokenizer.decode(req.tokens)}

    async def reset_prefix_cache(self, request: Request) -> dict[str, Any]:
        """Admin: drop the prefix cache of every engine replica (reached through the engine handle; calls are routed,
        so they repeat until each running replica answered once). Returns each replica's answer (what it dropped,
        or its error), the sums over replicas, and whether every running replica answered without an error."""
        await _parse(request, ResetPrefixCacheRequest, empty_ok=True)
        expected = await asyncio.to_thread(_running_engine_replicas)
        answers = await self.engine.reset_prefix_cache(expected, RESET_TIMEOUT_S)
        if not answers:
            raise ApiError(
                503,
                "no engine replica answered the prefix cache reset",
                type="service_unavailable_error",
                retry_after=2,
            )
        totals: dict[str, int] = {}
        for a in answers:
            for k, v in a.items():
                if isinstance(v, int) and not isinstance(v, bool):
                    totals[k] = totals.get(k, 0) + v
        complete = len(answers) >= expected and not any("error" in a for a in answers)
        log.warning(
            "request %s: prefix cache reset on %d of %d engine replicas: %s",
            request.state.request_id,
            len(answers),
            expected,
            totals,
        )
        return {
            "object": "prefix_cache_reset",
            "complete": complete,
            "expected_replicas": expected,
            "dropped": totals,
            "replicas": answers,
        }

    async def health(self) -> Response:
        ready = await self.ready()
        body = {"status": "ok" if ready else "unavailable", "model": self.ctx.name}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def ready(self) -> bool:
        """Weights loaded and a step has run on some engine replica (cached for 2 s)."""
        return await self.engine.ready()

    async def stream_count(self) -> tuple[str, int]:
        """This replica's id and its open streams (epserve/serve_cmd.py waits for 0 before stopping Serve)."""
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, self.open_streams

    async def prometheus(self) -> Response:
        if self.hub is None:
            raise ApiError(503, "metrics are not available in this deployment")
        text = await self.hub.exposition.remote()
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    def count_http(self, route: str, status: int) -> None:
        """One HTTP request answered; starts this replica's pushes to the hub on the first."""
        self.metrics.inc("http_requests", route=route, status=str(status))
        if self._push_task is None and self.hub is not None:
            replica_id = f"ingress-{uuid.uuid4().hex[:12]}"
            self._push_task = asyncio.get_running_loop().create_task(
                push_forever(self.hub, replica_id, self.metrics, METRICS_PUSH_S)
            )

    # ----------------------------------------------------------------- gRPC (method names = RPC names)
    async def Generate(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: ANN401
        async for message in _counted(self, self.grpc.generate(request, grpc_context)):
            yield message

    async def Chat(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: ANN401
        async for message in _counted(self, self.grpc.chat(request, grpc_context)):
            yield message

    async def ModelInfo(self, request: Any, grpc_context: Any) -> Any:  # noqa: ANN401
        return await self.grpc.model_info(request, grpc_context)

    async def Check(self, request: Any, grpc_context: Any) -> Any:  # noqa: ANN401  # grpc.health.v1
        return await self.grpc.health_check(request, grpc_context)

    async def Watch(self, request: Any, grpc_context: Any) -> AsyncIterator[Any]:  # noqa: ANN401
        async for message in self.grpc.health_watch(request, grpc_context):
            yield message


def _replica_name() -> str | None:
    """This replica's actor name (the engine aborts a dead caller's requests), or None outside Serve."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001  # no replica context (tests that build an Ingress directly)
        return None


def _running_engine_replicas() -> int:
    """Running replicas of this app's engine deployment, from Serve's controller (blocking); 1 outside Serve."""
    from ray import serve

    try:
        app = serve.get_replica_context().app_name
        states = serve.status().applications[app].deployments[ENGINE_DEPLOYMENT].replica_states
    except Exception as exc:  # noqa: BLE001  # no replica context or no such app (tests that build an Ingress directly)
        log.warning("could not count the engine replicas (%r): assuming 1", exc)
        return 1
    return max(1, sum(n for state, n in states.items() if state == "RUNNING"))


def default_model_name(model: str | None) -> str:
    from pathlib import Path

    return Path(model).name if model else "qwen3.5-moe-tiny"


def _sse_response(ing: Ingress, body: AsyncIterator[str], streams: list[EngineStream]) -> StreamingResponse:
    """The SSE response of `body`, which reads the engine `streams`, counted in `ing.open_streams`.

    NOTE: a client that leaves before the body's first iteration (the request cancelled between the
    handler's return and the response, or Starlette seeing the disconnect first) means the body never
    runs, so its `finally` never cancels the engine streams: cancel them when the body is dropped.
    """
    weakref.finalize(body, _cancel_all, streams)
    return StreamingResponse(_counted(ing, body), media_type="text/event-stream", headers=_engine_header(streams))


def _engine_header(streams: list[EngineStream]) -> dict[str, str]:
    ids = dict.fromkeys(s.first.engine_id for s in streams if s.first.engine_id)
    return {ENGINE_HEADER: ",".join(ids)} if ids else {}


async def _counted(ing: Ingress, body: AsyncIterator[Any]) -> AsyncIterator[Any]:
    ing.open_streams += 1
    try:
        async for item in body:
            yield item
    finally:
        ing.open_streams -= 1


def _cancel_all(streams: list[EngineStream]) -> None:
    for s in streams:
        s.cancel()


def _stream_error(ev: ChoiceDelta) -> dict[str, Any]:
    assert ev.error is not None
    return ApiError(ev.error.status, ev.error.message, type=_error_type(ev.error)).body()


def _error_type(err: EngineFailure) -> str:
    if err.retriable:
        return "service_unavailable_error"
    return "invalid_request_error" if err.status < 500 else "internal_error"


async def _merge(gens: list[AsyncIterator[ChoiceDelta]], offsets: list[int]) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Interleave several engine streams as deltas arrive; yields (choice index, delta)."""
    if len(gens) == 1:
        async for ev in gens[0]:
            yield offsets[0] + ev.index, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for ev in gens[i]:
                await queue.put((offsets[i] + ev.index, ev))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
    remaining = len(gens)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()


def build_api(instance: Any = None) -> FastAPI:  # noqa: ANN401  # an Ingress (tests) or None (inside Serve)
    """The FastAPI app: the route table, auth and request-id middleware, error handlers.

    Built on each replica (Serve calls it after `Ingress.__init__`); handlers reach the replica's
    `Ingress` through the replica context, or through `instance` when given (tests).
    """
    api = FastAPI(
        title="epserve",
        description="OpenAI-compatible API of an expert-parallel Qwen3.5-MoE server.",
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    # NOTE: no /docs or /redoc: those pages load their JavaScript from a CDN and, with an API key set, the
    # browser fetches /openapi.json without the key. /openapi.json is a route like the others: behind the key.

    # OpenAPI description. Handlers parse raw bodies themselves (one error shape, tests/replicas/test_fuzz.py
    # fuzzes against this document), so request bodies are declared here from the same pydantic models;
    # nested models go to components/schemas so every $ref resolves in the document.
    schemas: dict[str, Any] = {
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        }
    }
    error_text = {
        400: "Invalid request (the message names the parameter).",
        401: "Missing or invalid API key.",
        404: "Unknown model.",
        413: "Request body too large.",
        429: "Engine queue full; see Retry-After.",
        500: "Internal error.",
        503: "Engine unavailable or at capacity; see Retry-After.",
    }

    def errors(*codes: int) -> dict[str, Any]:
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        return {str(c): {"description": error_text[c], "content": {"application/json": {"schema": ref}}} for c in codes}

    def ok(description: str, schema: dict[str, Any], *, stream: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {"application/json": {"schema": schema}}
        if stream:  # OpenAPI 3.1: the schema of an event stream describes one event
            content["text/event-stream"] = {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}},
                    "description": "One chunk object as JSON per event, then `[DONE]`; errors arrive in-band as "
                    "an ErrorResponse event.",
                }
            }
        return {"200": {"description": description, "content": content}}

    def spec(model: type[BaseModel] | None, responses: dict[str, Any]) -> dict[str, Any]:
        """`openapi_extra` of a route: the JSON body of `model` (when given) and the responses."""
        extra: dict[str, Any] = {"responses": responses}
        if model is not None:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            extra["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
            }
        return extra

    def completion_schema(obj: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "object": {"const": obj},
                "choices": {"type": "array", "items": {"type": "object", "required": ["index", "finish_reason"]}},
            },
        }

    def openapi() -> dict[str, Any]:
        doc = FastAPI.openapi(api)
        components = doc.setdefault("components", {})
        components.setdefault("schemas", {}).update(schemas)
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Required on every route but /health when the server has an API key.",
            }
        }
        doc["security"] = [{"bearer": []}]
        return doc

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the document
    generation_errors = (400, 401, 404, 413, 429, 500, 503)

    def ing() -> Ingress:
        if instance is not None:
            return instance
        from ray import serve

        return serve.get_replica_context().servable_object  # type: ignore[return-value]  # Serve types it Callable

    route_paths: set[str] = set()  # filled once the routes below are declared

    @api.middleware("http")
    async def request_id_and_auth(request: Request, call_next):  # noqa: ANN001, ANN202  # Starlette signature
        rid = request.headers.get(REQUEST_ID_HEADER, "")
        if not (0 < len(rid) <= 128 and rid.replace("-", "").replace("_", "").isalnum()):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
        key = ing().api_key
        path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]  # the app's route prefix (Serve's root_path) is not part of the route
        if (
            key
            and path not in PUBLIC_PATHS
            and not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {key}".encode())
        ):
            err = ApiError(
                401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.", type="authentication_error"
            )
            ing().count_http(route_of(path), 401)
            return JSONResponse(err.body(), status_code=401)
        request.state.body_limits = (ing().args.max_request_body_bytes(), ing().args.body_read_timeout_s)
        # Serve's proxy assigns X-Request-Id (reusing the client's) and returns it on every response;
        # handlers put the same id in bodies and logs.
        try:
            response = await call_next(request)
        except Exception:
            ing().count_http(route_of(path), 500)
            raise
        ing().count_http(route_of(path), response.status_code)
        return response

    def route_of(path: str) -> str:
        """The route's path, or "other" (unknown paths would make a label value per URL a client tries)."""
        return path if path in route_paths else "other"

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after is not None else {}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own answers (unknown path 404, wrong method 405) in the OpenAI error body."""
        path = request.scope.get("path", "")
        message, code, kind = {
            404: (f"no route {path}", "not_found", "not_found_error"),
            405: (f"method {request.method} is not allowed on {path}", "method_not_allowed", "invalid_request_error"),
        }.get(exc.status_code, (str(exc.detail), None, "invalid_request_error"))
        err = ApiError(exc.status_code, message, type=kind, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=dict(exc.headers or {}))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", getattr(request.state, "request_id", "?"))
        return JSONResponse(
            ApiError(500, f"internal error: {type(exc).__name__}", type="internal_error").body(), status_code=500
        )

    @api.post(
        "/v1/chat/completions",
        openapi_extra=spec(
            ChatCompletionRequest,
            {
                **ok(
                    "A chat completion, or an SSE stream of chunks with `stream: true`.",
                    completion_schema("chat.completion"),
                    stream=True,
                ),
                **errors(*generation_errors),
            },
        ),
    )
    async def chat(request: Request) -> Response:
        return await ing().chat(request)

    @api.post(
        "/v1/completions",
        openapi_extra=spec(
            CompletionRequest,
            {
                **ok(
                    "A text completion, or an SSE stream of chunks with `stream: true`.",
                    completion_schema("text_completion"),
                    stream=True,
                ),
                **errors(*generation_errors),
            },
        ),
    )
    async def completions(request: Request) -> Response:
        return await ing().completions(request)

    @api.get(
        "/v1/models",
        openapi_extra=spec(
            None,
            {
                **ok(
                    "The served model.",
                    {
                        "type": "object",
                        "required": ["object", "data"],
                        "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
                    },
                ),
                **errors(401),
            },
        ),
    )
    async def models() -> dict[str, Any]:
        return ing().models()

    @api.post(
        "/tokenize",
        openapi_extra=spec(
            TokenizeRequest,
            {
                **ok(
                    "Token ids of a prompt or of rendered chat messages.",
                    {
                        "type": "object",
                        "required": ["count", "max_model_len", "tokens"],
                        "properties": {"tokens": {"type": "array", "items": {"type": "integer"}}},
                    },
                ),
                **errors(400, 401, 404, 413),
            },
        ),
    )
    async def tokenize(request: Request) -> dict[str, Any]:
        return await ing().tokenize(request)

    @api.post(
        "/detokenize",
        openapi_extra=spec(
            DetokenizeRequest,
            {
                **ok(
                    "The text of token ids.",
                    {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                ),
                **errors(400, 401, 404, 413),
            },
        ),
    )
    async def detokenize(request: Request) -> dict[str, Any]:
        return await ing().detokenize(request)

    health_body = {
        "type": "object",
        "required": ["status", "model"],
        "properties": {"status": {"enum": ["ok", "unavailable"]}, "model": {"type": "string"}},
    }

    @api.get(
        "/health",
        openapi_extra={
            "security": [],
            "responses": {
                **ok("Ready: weights loaded and an engine step has run.", health_body),
                "503": {"description": "Not ready.", "content": {"application/json": {"schema": health_body}}},
            },
        },
    )
    async def health() -> Response:
        return await ing().health()

    @api.get(
        "/metrics",
        response_class=PlainTextResponse,
        openapi_extra={
            "responses": {
                "200": {"description": "Prometheus text exposition of every replica's metrics."},
                **errors(401, 503),
            }
        },
    )
    async def metrics() -> Response:
        return await ing().prometheus()

    @api.post(
        "/reset_prefix_cache",
        openapi_extra=spec(
            ResetPrefixCacheRequest,
            {
                **ok(
                    "Admin: every engine replica's prefix cache dropped (vLLM's route). The body may be empty.",
                    {
                        "type": "object",
                        "required": ["object", "complete", "expected_replicas", "dropped", "replicas"],
                        "properties": {
                            "object": {"const": "prefix_cache_reset"},
                            "complete": {"type": "boolean"},
                            "expected_replicas": {"type": "integer"},
                            "dropped": {"type": "object", "additionalProperties": {"type": "integer"}},
                            "replicas": {"type": "array", "items": {"type": "object", "required": ["replica"]}},
                        },
                    },
                ),
                **errors(400, 401, 413, 503),
            },
        ),
    )
    async def reset_prefix_cache(request: Request) -> dict[str, Any]:
        return await ing().reset_prefix_cache(request)

    route_paths.update(r.path for r in api.routes if hasattr(r, "path"))
    return api
