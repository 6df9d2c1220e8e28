"""One generated sequence (a choice of a request): its tokens and cache addresses.

Owns: the scheduler's invariant (`num_computed` of `len(all_ids)` tokens are in the caches),
the cache addresses the engine assigned (trunk rank, state slot, KV blocks), and what ends a
choice on token ids: eos, stop token ids, max_tokens, min_tokens, the thinking budget.
Must not: schedule; know text (the front end decodes and checks stop strings).
Tests: tests/replicas/test_engine.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest

if TYPE_CHECKING:  # annotations only: torch and llguidance load where they are used
    import torch

    from replicas.engine.structured_output import GrammarMatcher


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CacheAddress:
    """Where a running sequence's state lives: a trunk rank, its DeltaNet slot, its KV blocks."""

    trunk: int
    slot: int
    blocks: list[int] = field(default_factory=list)


class Sequence:
    """A choice being generated.

    Args:
        req: the request it belongs to. index: its choice index. seq_id: unique within the engine.
    """

    def __init__(self, req: GenerateRequest, index: int, seq_id: int) -> None:
        self.req = req
        self.index = index
        self.seq_id = seq_id
        self.params: SamplingParams = _with_seed(req.params, index)
        self.prompt_ids = list(req.prompt_ids)
        self.output_ids: list[int] = []
        self.num_computed = 0
        self.status = Status.WAITING
        self.addr: CacheAddress | None = None
        self.aborted = False
        self.end_reason = "abort"  # what ended an aborted sequence: "abort", or "stop" (the front end's stop string)
        self.num_preemptions = 0
        self.mm = req.mm  # replicas.api.media.MultimodalPrompt or None
        self.rope_delta = req.mm.rope_delta if req.mm is not None else 0
        self.matcher: GrammarMatcher | None = None  # set when the request is constrained
        self.drafts: list[int] = []  # MTP drafts to verify in the next step
        self.speculate = False  # set by the engine: this sequence drafts with the MTP head
        # Thinking budget: reasoning tokens so far, whether the budget still counts, and the tokens to force next.
        self.reasoning_tokens = 0
        budget = req.max_thinking_tokens
        self._thinking = budget is not None and budget > 0 and bool(req.thinking_end_ids)
        self._forced: list[int] = list(req.thinking_end_ids) if budget == 0 else []
        self.t_arrival = req.arrival_time or time.monotonic()
        self.t_scheduled: float | None = None
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None

    # ----------------------------------------------------------------- scheduler view
    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to be computed before the next sample."""
        return self.num_tokens - self.num_computed

    def chunk_vision(self, start: int, n: int) -> tuple[torch.Tensor | None, tuple[int, ...], int]:
        """For tokens [start, start + n): their [3, n] MRoPE positions (None for plain text), the rows that
        take vision embeddings, and the index of the first such embedding."""
        if self.mm is None:
            return None, (), 0
        prompt = len(self.prompt_ids)
        import torch

        text = torch.arange(start, start + n, dtype=torch.long) + self.rope_delta
        positions = text.expand(3, n).clone()
        end = min(start + n, prompt)
        if start < end:
            positions[:, : end - start] = self.mm.positions[:, start:end]
        pads = set(self.mm.pad_ids)
        rows = tuple(i for i, t in enumerate(self.prompt_ids[start:end]) if t in pads)
        first = sum(1 for t in self.prompt_ids[:start] if t in pads)
        return positions, rows, first

    def suppressed_ids(self) -> tuple[int, ...]:
        """Tokens that may not be sampled yet (min_tokens keeps eos and stop tokens out)."""
        if len(self.output_ids) >= self.req.min_tokens:
            return ()
        eos = () if self.req.ignore_eos else self.req.eos_token_ids
        return tuple(eos) + tuple(self.req.stop_token_ids)

    def forced_token(self) -> int | None:
        """The token the next sample must be (the thinking budget is spent and `</think>` is not yet out), or None."""
        return self._forced[0] if self._forced else None

    def free_tokens(self) -> int | None:
        """Tokens that may still be sampled before a forced one (None: no bound). A step that verifies k drafts
        emits up to k + 1 tokens, so it may carry at most free_tokens() - 1 drafts."""
        if self._forced:
            return 0
        if not self._thinking:
            return None
        assert self.req.max_thinking_tokens is not None
        return self.req.max_thinking_tokens - self.reasoning_tokens

    def _count_thinking(self, token: int) -> None:
        """Advance the thinking budget by one output token (forced tokens are taken off the queue)."""
        if self._forced:
            if token == self._forced[0]:
                self._forced.pop(0)
            return
        if not self._thinking:
            return
        if token in self.req.thinking_exit_ids:
            self._thinking = False
            return
        self.reasoning_tokens += 1
        if self.reasoning_tokens >= (self.req.max_thinking_tokens or 0):
            self._thinking = False
            self._forced = list(self.req.thinking_end_ids)

    def reset_for_recompute(self) -> None:
        """Preempted: caches are gone; prompt + outputs so far are recomputed when readmitted."""
        self.num_computed = 0
        self.addr = None
        self.status = Status.WAITING
        self.num_preemptions += 1
        self.drafts = []

    # ----------------------------------------------------------------- outputs
    def append(self, token: int) -> tuple[str | None, int | None]:
        """Record a generated token; returns (finish_reason, stop_reason): ("stop", None) for eos, ("stop", token)
        for a stop token id, ("length", None) at max_tokens, (None, None) while it runs on."""
        now = time.monotonic()
        if self.t_first_token is None:
            self.t_first_token = now
        self.t_last_token = now
        self.output_ids.append(token)
        self._count_thinking(token)
        n = len(self.output_ids)
        if n >= self.req.min_tokens:
            if not self.req.ignore_eos and token in self.req.eos_token_ids:
                return "stop", None
            if token in self.req.stop_token_ids:
                return "stop", token
        if n >= self.req.max_tokens:
            return "length", None
        return None, None


def _with_seed(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i draws with seed + i, so n > 1 choices differ yet each is reproducible."""
    return params if index == 0 else replace(params, seed=params.seed + index)
