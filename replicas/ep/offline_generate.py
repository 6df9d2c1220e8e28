"""Offline generation: requests run to completion on the serving Engine over an in-process runner.

`epserve generate` (single process: `LocalRunner`; expert-parallel: an `ExpertParallelGroup`) and the
benchmarks use this instead of a step loop of their own: the Engine's scheduler, update, speculation,
thinking budget and stop rules are the ones serving runs. Sizing here is for a few known prompts: one
request's blocks per slot, and a token budget that prefills the longest prompt in one step.
Figures come from the engine: steps from `engine.steps`, draft/accepted counts and TTFT / end-to-end
latency from its metrics registry (the serving metrics), as differences over one request, so one
engine can run several requests in turn.
Tests: tests/replicas/test_offline_generate.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from replicas.engine.block_pool import BlockPool
from replicas.engine.engine import AsyncRunner, Engine
from replicas.engine.engine_types import GenerateRequest
from replicas.engine.prefix_config import PrefixCacheConfig
from replicas.engine.scheduler import CHUNK_ALIGN, SchedulerConfig
from replicas.engine.step_types import TokenLogprobs
from replicas.ep.actors import CacheSizes
from replicas.serving.metrics import MetricsRegistry


class InProcessRunner(AsyncRunner, Protocol):
    """A runner that says how its caches are sized, so the engine's block pools can match them."""

    @property
    def caches(self) -> CacheSizes: ...

    @property
    def num_trunk_ranks(self) -> int: ...


class GenerationFailed(RuntimeError):
    """The engine ended the request with an error event (refused input, a failed group)."""


@dataclass(frozen=True)
class Completion:
    """One request's output and figures.

    Attributes:
        finish_reason: "stop" (eos or a stop token), "length" (max_tokens), ...
        ttft_s: arrival to first token (prefill); decode_s: first token to the last.
        steps: engine steps while it ran (target forwards: with speculation fewer than tokens).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str
    ttft_s: float
    decode_s: float
    steps: int
    draft_tokens: int
    accepted_tokens: int


def cache_sizes(
    prompt_len: int,
    max_tokens: int,
    *,
    spec_tokens: int = 0,
    block_size: int = 16,
    num_slots: int = 1,
    state_checkpoints: int = 0,
) -> CacheSizes:
    """Caches for `num_slots` sequences of this length at once, with the 2k positions speculation writes ahead,
    and `state_checkpoints` saved states for the prefix cache."""
    per_seq = -(-(prompt_len + max_tokens + 2 * spec_tokens) // block_size)
    return CacheSizes(
        num_blocks=per_seq * num_slots,
        block_size=block_size,
        num_slots=num_slots,
        spec_tokens=spec_tokens,
        state_checkpoints=state_checkpoints,
    )


def engine_pools(caches: CacheSizes, trunk_ranks: int) -> list[BlockPool]:
    """The engine's view of each trunk rank's caches (indices into them)."""
    return [
        BlockPool(
            num_blocks=caches.num_blocks,
            num_slots=caches.num_slots,
            block_size=caches.block_size,
            num_checkpoints=caches.state_checkpoints,
        )
        for _ in range(trunk_ranks)
    ]


def offline_engine(
    runner: InProcessRunner,
    *,
    max_prompt_len: int,
    spec_tokens: int = 0,
    vocab_size: int | None = None,
    metrics: MetricsRegistry | None = None,
    prefix_cache: PrefixCacheConfig | None = None,
) -> Engine:
    """An Engine over `runner`: one running sequence per cache slot, prompts up to `max_prompt_len` prefilled
    in one step, no recovery (a failed group ends the request), the prefix cache as `prefix_cache` says (None:
    off) over the runner's state checkpoints. Build it inside the event loop that runs it."""
    caches = runner.caches
    budget = max(CHUNK_ALIGN, -(-max_prompt_len // CHUNK_ALIGN) * CHUNK_ALIGN)
    return Engine(
        runner,
        pools=engine_pools(caches, runner.num_trunk_ranks),
        config=SchedulerConfig(max_num_seqs=caches.num_slots, max_num_batched_tokens=budget, lookahead=2 * spec_tokens),
        max_waiting=caches.num_slots * runner.num_trunk_ranks,
        metrics=metrics,
        spec_tokens=spec_tokens,
        vocab_size=vocab_size,
        prefix_cache=prefix_cache,
    )


async def run_to_completion(engine: Engine, req: GenerateRequest) -> Completion:
    """Stream `req` (one choice) through a started engine and collect it; raises GenerationFailed on an error."""
    if req.n != 1:
        raise ValueError(f"run_to_completion collects one choice; the request asks for n={req.n}")
    before, steps0 = _figures(engine.metrics), engine.steps
    tokens: list[int] = []
    logprobs: list[TokenLogprobs] = []
    finish: str | None = None
    async for item in engine.generate(req):
        for d in item.outputs:
            if d.error is not None:
                raise GenerationFailed(d.error.message)
            tokens += d.token_ids
            logprobs += d.logprobs
            finish = d.finish_reason or finish
    after = _figures(engine.metrics)
    delta = {k: after[k] - before[k] for k in after}
    ttft = delta["time_to_first_token_seconds"]
    return Completion(
        token_ids=tuple(tokens),
        logprobs=tuple(logprobs),
        finish_reason=finish or "length",
        ttft_s=ttft,
        decode_s=max(0.0, delta["e2e_request_latency_seconds"] - ttft),
        steps=engine.steps - steps0,
        draft_tokens=int(delta["spec_decode_num_draft_tokens"]),
        accepted_tokens=int(delta["spec_decode_num_accepted_tokens"]),
    )


def offline_generate(
    runner: InProcessRunner,
    req: GenerateRequest,
    *,
    spec_tokens: int = 0,
    vocab_size: int | None = None,
    prefix_cache: PrefixCacheConfig | None = None,
) -> Completion:
    """Run one request to completion on a fresh Engine over `runner` (its own event loop)."""
    return asyncio.run(
        _generate_all(runner, [req], spec_tokens=spec_tokens, vocab_size=vocab_size, prefix_cache=prefix_cache)
    )[0]


def generate_each(
    runner: InProcessRunner,
    reqs: Iterable[GenerateRequest],
    *,
    spec_tokens: int = 0,
    vocab_size: int | None = None,
    prefix_cache: PrefixCacheConfig | None = None,
) -> list[Completion]:
    """Run requests one after another (never batched together) on one Engine over `runner`."""
    return asyncio.run(
        _generate_all(runner, list(reqs), spec_tokens=spec_tokens, vocab_size=vocab_size, prefix_cache=prefix_cache)
    )


async def _generate_all(
    runner: InProcessRunner,
    reqs: list[GenerateRequest],
    *,
    spec_tokens: int,
    vocab_size: int | None,
    prefix_cache: PrefixCacheConfig | None = None,
) -> list[Completion]:
    engine = offline_engine(
        runner,
        max_prompt_len=max((len(r.prompt_ids) for r in reqs), default=1),
        spec_tokens=spec_tokens,
        vocab_size=vocab_size,
        prefix_cache=prefix_cache,
    )
    engine.start()
    try:
        return [await run_to_completion(engine, r) for r in reqs]
    finally:
        await engine.stop()


_COUNTERS = ("spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
_LATENCIES = ("time_to_first_token_seconds", "e2e_request_latency_seconds")


def _figures(metrics: MetricsRegistry) -> dict[str, float]:
    """Counter values and latency-histogram sums, over every label set."""
    snap = metrics.snapshot()
    out = dict.fromkeys(_COUNTERS + _LATENCIES, 0.0)
    for (name, _), value in snap.counters.items():
        if name in _COUNTERS:
            out[name] += value
    for (name, _), hist in snap.histograms.items():
        if name in _LATENCIES:
            out[name] += hist.total
    return out
