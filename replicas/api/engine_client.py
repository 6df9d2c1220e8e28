"""The front end's client of the engine deployment, shared by the HTTP and gRPC APIs.

Owns: starting a request (waiting for its first item so errors before any token become a status;
one retry of a retriable failure before the first token, which the engine router sends to another
group), turning the engine's token-id items (one per request per step) into per-choice text deltas
(replicas/api/choice_text.py: detokenization, stop strings), telling the engine to stop a choice
that a stop string ended (`EngineServer.finish_choice`, routed to the replica running it; after
the last one the stream is drained in the background, so the engine counts a stop, not an abort),
carrying the prefix cache's count of cached prompt tokens (`EngineStream.cached_tokens`, for usage),
a broken engine stream ending the open choices with a
retriable error (never a silent truncation), cancelling the engine request when the caller leaves,
and readiness. Must not: know HTTP or gRPC (replicas/api/ingress.py, replicas/api/grpc_service.py).
Tests: tests/replicas/test_serving.py, tests/replicas/test_choice_text.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from model_shards.tokenizer import Tokenizer
from replicas.api.choice_text import ChoiceDelta, ChoiceText
from replicas.api.openai_protocol import ApiError, bad_request
from replicas.engine.engine_types import EngineFailure, GenerateRequest, RequestOutput

log = logging.getLogger("ray.serve.epserve.ingress")

# Before the one retry: longer than the engine replicas' routing-stats period (1 s, replicas/serving/app.py), so the
# router already knows the failed group is down and picks another.
RETRY_DELAY_S = 1.5
FINISH_CHOICE_TIMEOUT_S = 30.0
# After the front end stopped a request's last choice: how long its engine stream may take to close on its own (the
# engine answers finish_choice between steps) before it is cancelled (an abort).
DRAIN_S = 5.0


def engine_error(exc: BaseException) -> ApiError:
    """Map engine-side exceptions (re-raised through the Serve handle) to API errors."""
    from replicas.engine.errors import EngineOverloaded, EngineUnavailable, RequestRejected

    exc = getattr(exc, "cause", None) or exc  # Ray wraps the replica's exception; report the original message

    if isinstance(exc, EngineOverloaded):
        return ApiError(429, f"The server is at capacity: {exc}. Retry later.", type="rate_limit_error", retry_after=1)
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc))
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, str(exc), type="service_unavailable_error", retry_after=2)
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return ApiError(503, "The server is at capacity. Retry later.", type="service_unavailable_error", retry_after=1)
    log.error("engine call failed: %r", exc)
    return ApiError(
        503,
        f"The engine is unavailable ({type(exc).__name__}). Retry later.",
        type="service_unavailable_error",
        retry_after=2,
    )


@dataclass
class EngineStream:
    """A started engine request: its Serve stream, the first item (already read) and the request."""

    gen: Any  # DeploymentResponseGenerator
    first: RequestOutput
    req: GenerateRequest
    draining: bool = False  # the front end ended every choice; the engine closes the stream (EngineClient._drain)
    cached_tokens: int = 0  # prompt tokens the prefix cache saved (RequestOutput.cached_tokens; the largest seen)

    def __post_init__(self) -> None:
        self.cached_tokens = max(self.cached_tokens, self.first.cached_tokens)

    def cancel(self) -> None:
        """Abort the engine request (a no-op for a stream already cancelled, finished or draining)."""
        if not self.draining:
            self.gen.cancel()


class EngineClient:
    """Requests to the engine deployment, as text.

    Args:
        engine: a Serve handle to the engine deployment (EngineServer).
        tokenizer: the model's tokenizer.
        caller: returns this replica's actor name (the engine aborts a dead caller's requests), or None.
    """

    def __init__(self, engine: Any, tokenizer: Tokenizer, *, caller: Callable[[], str | None] | None = None) -> None:  # noqa: ANN401  # Serve handle
        self.engine = engine
        self.tokenizer = tokenizer
        self._caller = caller or (lambda: None)
        self._ready_cache: tuple[float, bool] = (0.0, False)
        self._pending: set[asyncio.Task] = set()  # finish_choice calls and drains in flight

    async def start(self, greq: GenerateRequest) -> EngineStream:
        """Start the engine stream and wait for its first item, so errors before any token become a status
        instead of a 200 stream. A request that failed retriably before producing a token is retried once.

        Raises:
            ApiError: 400 (refused input), 429 (at capacity), 503 (unavailable after the retry).
        """
        for attempt in (1, 2):
            gen = self.engine.options(stream=True).generate.remote(greq, self._caller())
            try:
                first: RequestOutput = await gen.__anext__()
            except StopAsyncIteration:
                raise ApiError(503, "the engine ended the request without output", retry_after=1) from None
            except asyncio.CancelledError:
                gen.cancel()
                raise
            except Exception as exc:  # noqa: BLE001  # mapped to a status
                err = engine_error(exc)
                if attempt == 1 and err.status == 503:
                    log.warning("request %s: %s; retrying once", greq.request_id, err.message)
                    await asyncio.sleep(RETRY_DELAY_S)
                    continue
                raise err from None
            errors = [o.error for o in first.outputs if o.error is not None]
            refused = next((e for e in errors if not e.retriable and e.status < 500), None)
            if refused is not None:
                gen.cancel()  # refused on its own input before any token: a 4xx, never retried
                raise ApiError(refused.status, refused.message)
            tokens = any(o.token_ids for o in first.outputs)
            if attempt == 1 and not tokens and any(e.retriable for e in errors):
                gen.cancel()
                log.warning(
                    "request %s: failed before its first token (%s); retrying once", greq.request_id, errors[0].message
                )
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            return EngineStream(gen, first, greq)
        raise AssertionError("unreachable")

    async def deltas(self, stream: EngineStream) -> AsyncIterator[ChoiceDelta]:
        """The request's choices as text deltas (index within the request), in engine order; each choice ends
        with one finished delta. If the engine replica dies mid-stream, every open choice ends with a retriable
        error. Leaving early (or finishing) cancels the engine request."""
        req = stream.req
        texts = [
            ChoiceText(
                self.tokenizer,
                stop=req.stop,
                include_stop=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
                min_tokens=req.min_tokens,
            )
            for _ in range(req.n)
        ]
        open_choices = req.n
        try:
            item: RequestOutput | None = stream.first
            while item is not None:
                if item.cached_tokens > stream.cached_tokens:
                    stream.cached_tokens = item.cached_tokens
                for out in item.outputs:
                    text = texts[out.index]
                    if text.finished:  # ended here by a stop string: the engine's later tokens count nowhere
                        continue
                    delta = text.feed(out)
                    if delta.finished:
                        open_choices -= 1
                        if isinstance(delta.stop_reason, str):  # a stop string found here: the engine runs it still
                            self._finish_choice(item.engine_id, req.request_id, out.index)
                            stream.draining = not open_choices
                    yield delta
                if not open_choices:
                    return
                try:
                    item = await stream.gen.__anext__()
                except StopAsyncIteration:
                    item = None
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001  # the engine replica or its group is gone
            log.error("request %s: engine stream broke: %r", req.request_id, exc)
            failure = EngineFailure(
                f"the engine serving this request failed ({type(exc).__name__}); retry", retriable=True
            )
            for index, text in enumerate(texts):
                if not text.finished:
                    text.finished = True
                    yield ChoiceDelta(index=index, error=failure)
        finally:
            if stream.draining:
                self._spawn(self._drain(stream))
            else:
                stream.cancel()  # caller gone or stream done: make sure the engine request is aborted

    def _finish_choice(self, engine_id: str, request_id: str, index: int) -> None:
        """Tell the engine running the request to stop a choice (fire and forget: until it arrives, the choice's
        further tokens are ignored here)."""

        async def call() -> None:
            try:
                await asyncio.wait_for(
                    self.engine.finish_choice.remote(engine_id, request_id, index), FINISH_CHOICE_TIMEOUT_S
                )
            except Exception as exc:  # noqa: BLE001  # the choice runs on to its own end; only compute is lost
                log.warning("request %s: finish_choice(%d) failed: %r", request_id, index, exc)

        self._spawn(call())

    async def _drain(self, stream: EngineStream) -> None:
        """Read the rest of a stream whose choices the front end all ended, until the engine closes it; cancel it
        if that takes longer than DRAIN_S."""

        async def read_all() -> None:
            async for _ in stream.gen:
                pass

        try:
            await asyncio.wait_for(read_all(), DRAIN_S)
        except Exception:  # noqa: BLE001  # timeout or a broken stream: nothing more to read
            stream.draining = False
            stream.cancel()

    def _spawn(self, coro: Any) -> None:  # noqa: ANN401  # a coroutine
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def reset_prefix_cache(self, replicas: int, timeout_s: float) -> list[dict[str, Any]]:
        """Drop the prefix cache of each of the `replicas` engine replicas (EngineServer.reset_prefix_cache). Calls are
        routed, not addressed: repeat them, each replica answering once (those done only say so), until all have
        or `timeout_s` passed. Returns the answers: {"replica": id, what was dropped...} or {"replica", "error"}."""
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(done) < replicas and (left := deadline - time.monotonic()) > 0:
            try:
                out = await asyncio.wait_for(self.engine.reset_prefix_cache.remote(list(done)), left)
            except TimeoutError:
                break
            except Exception as exc:  # noqa: BLE001  # a replica going away: the others still get theirs
                log.warning("prefix cache reset: %r", exc)
                await asyncio.sleep(0.2)
                continue
            if not out.get("skipped"):
                done[out["replica"]] = out
        return list(done.values())

    async def ready(self) -> bool:
        """Weights loaded and a step has run on some engine replica (cached for 2 s)."""
        stamp, value = self._ready_cache
        if time.monotonic() - stamp < 2.0:
            return value
        try:
            value = bool(await asyncio.wait_for(self.engine.ready.remote(), timeout=10))
        except Exception:  # noqa: BLE001  # unreachable engine = not ready
            value = False
        self._ready_cache = (time.monotonic(), value)
        return value
