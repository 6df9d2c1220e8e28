"""Offline generation of one prompt to completion on a group runner (`epserve generate`).

A runner is anything with `step(list[StepRequest]) -> list[StepResult]` (one request per
trunk rank) and `block_size`: the in-process `LocalRunner` or the expert-parallel driver.
The prompt runs on trunk rank 0 in slot 0; other ranks join each step with no sequences.
With `spec_tokens` k > 0 the MTP head drafts k tokens per step and the next step verifies them
(replicas/ep/speculative.py); greedy output is identical to k = 0.
Tests: tests/model_shards/test_generate_cli.py (tokens equal transformers' generate),
tests/replicas/test_speculative.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from model_shards.cache import CachePools
from model_shards.model import LocalModel
from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult, TokenLogprobs
from replicas.ep.dispatch import LocalDispatcher
from replicas.ep.trunk_rank import TrunkRank


class GroupRunner(Protocol):
    block_size: int
    num_trunk_ranks: int

    def step(self, requests: list[StepRequest]) -> list[StepResult]: ...


class LocalRunner:
    """One trunk rank with every expert in-process (`--expert-ranks 0`)."""

    num_trunk_ranks = 1

    def __init__(
        self, model: LocalModel, *, num_blocks: int, block_size: int = 16, num_slots: int = 1, spec_tokens: int = 0
    ) -> None:
        self.block_size = block_size
        pools = model.allocate(
            num_blocks=num_blocks, block_size=block_size, num_slots=num_slots, spec_tokens=spec_tokens
        )
        self.rank = TrunkRank(
            model.trunk, pools, LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
        )

    @property
    def pools(self) -> CachePools:
        return self.rank.pools

    def step(self, requests: list[StepRequest]) -> list[StepResult]:
        return [self.rank.step(requests[0])]


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (eos) or "length"
    logprobs: tuple[TokenLogprobs | None, ...]
    prefill_s: float
    decode_s: float
    steps: int = 0  # target forwards (with speculation: fewer than tokens)
    draft_tokens: int = 0
    accepted_tokens: int = 0


def generate_one(
    runner: GroupRunner,
    prompt_ids: list[int],
    *,
    params: SamplingParams,
    max_tokens: int,
    eos_token_ids: tuple[int, ...],
    spec_tokens: int = 0,
) -> Generation:
    """Prefill the prompt in one step, then decode until eos or max_tokens: one token per step, or with
    speculation the accepted drafts and one more token per step."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bs = runner.block_size
    table = tuple(range(runner_blocks(len(prompt_ids), max_tokens + 2 * spec_tokens, bs)))
    idle = [StepRequest(mtp_steps=spec_tokens)] * (runner.num_trunk_ranks - 1)
    out: list[int] = []
    logprobs: list[TokenLogprobs | None] = []
    context, new = 0, list(prompt_ids)
    drafts: tuple[int, ...] = ()
    finish = "length"
    steps = drafted = accepted_total = 0
    t0 = time.perf_counter()
    t_first = t0
    while len(out) < max_tokens and finish == "length":
        # the incremental step message (replicas/engine/step_types.py): the first step starts sequence 0
        first = SeqStart(0, params, len(prompt_ids), mtp=spec_tokens > 0) if context == 0 else None
        seq = SeqStep(0, context, tuple(new), table if context == 0 else (), True, len(out), first, drafts=drafts)
        res = runner.step([StepRequest((seq,), mtp_steps=spec_tokens), *idle])[0]
        steps += 1
        token = res.token_ids[0]
        assert token is not None
        if not out:
            t_first = time.perf_counter()
        accepted = res.accepted[0] if res.accepted else ()
        drafted += len(drafts)
        accepted_total += len(accepted)
        lps = (*(res.accepted_logprobs[0] if accepted else ()), res.logprobs[0])
        context += len(new) + len(accepted)
        for t, lp in zip((*accepted, token), lps):
            out.append(t)
            logprobs.append(lp)
            if t in eos_token_ids:
                finish = "stop"
                break
            if len(out) == max_tokens:
                break
        new = [token]
        drafts = res.drafts[0] if res.drafts else ()
    return Generation(
        tuple(out),
        finish,
        tuple(logprobs),
        t_first - t0,
        time.perf_counter() - t_first,
        steps=steps,
        draft_tokens=drafted,
        accepted_tokens=accepted_total,
    )


def runner_blocks(prompt_len: int, max_tokens: int, block_size: int) -> int:
    return -(-(prompt_len + max_tokens) // block_size)
