"""One generated sequence (a choice of a request): its tokens and cache addresses.

Owns: its token ids, prompt then output, in one list appended in place (a step reads its chunk in
O(new tokens)); the scheduler's invariant (`num_computed` of `num_tokens` tokens are in the caches),
the cache addresses the engine assigned (trunk rank, state slot, KV blocks, and how much of them the
rank already knows: replicas/engine/step_types.py), and what ends a choice on token ids: eos, stop
token ids, max_tokens, min_tokens, the thinking budget.
Must not: schedule; know text (the front end decodes and checks stop strings).
Tests: tests/replicas/test_step_protocol.py, tests/replicas/test_engine.py, tests/replicas/test_scheduler.py.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest

if TYPE_CHECKING:  # annotations only: llguidance loads where it is used
    from replicas.engine.structured_output import GrammarMatcher


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CacheAddress:
    """Where a running sequence's state lives: a trunk rank, its DeltaNet slot, its KV blocks.

    Attributes:
        started: the rank was sent the sequence's start (it holds state to release when the sequence leaves).
        blocks_sent: how many of `blocks` the rank was sent (later ones go with the next step).
        restore: a prefix-cache hit: the state checkpoint the rank copies into `slot` before the first chunk (the
            first blocks are the cache's, shared); None: a fresh start.
    """

    trunk: int
    slot: int
    blocks: list[int] = field(default_factory=list)
    started: bool = False
    blocks_sent: int = 0
    restore: int | None = None  # a prefix-cache hit: the state checkpoint its first step copies into `slot`


class Sequence:
    """A choice being generated.

    Args:
        req: the request it belongs to. index: its choice index. seq_id: unique within the engine.
    """

    def __init__(self, req: GenerateRequest, index: int, seq_id: int) -> None:
        self.req = req
        self.request_id = req.request_id
        self.index = index
        self.seq_id = seq_id
        self.params: SamplingParams = _with_seed(req.params, index)
        self.prompt_len = len(req.prompt_ids)
        # prompt, then output, appended in place; an array, not a list: the garbage collector does not walk
        # hundreds of 4k-token histories (a full collection at 512 running took milliseconds)
        self.token_ids: array[int] = array("q", req.prompt_ids)
        self.num_computed = 0
        self.status = Status.WAITING
        self.addr: CacheAddress | None = None
        self.aborted = False
        self.end_reason = "abort"  # what ended an aborted sequence: "abort", or "stop" (the front end's stop string)
        self.num_preemptions = 0
        self.mm = req.mm  # replicas.api.media.MultimodalPrompt or None
        self.rope_delta = req.mm.rope_delta if req.mm is not None else 0
        # No grammar, thinking budget or min_tokens: a decode step carries nothing but its token (the hot path).
        self.plain = req.grammar is None and req.max_thinking_tokens is None and req.min_tokens == 0
        # Set by the engine: plain, no speculation, the request's only choice (its update needs no per-step news
        # object: engine.Engine._update). `end_ids`: the tokens that may end it (a hot-path test; `ends` decides).
        self.fast = False
        # Set by the engine: plain and no speculation, so the token it feeds the rank is always the one the rank
        # sampled (a decode goes in the step message's columns: step_types.StepRequest.decodes).
        self.self_fed = False
        self.end_ids = frozenset(req.stop_token_ids) | frozenset(() if req.ignore_eos else req.eos_token_ids)
        self.max_tokens = req.max_tokens
        self.stream: Any = None  # the request's stream buffer (engine._Stream), set by the engine
        self._vision_rows: tuple[int, ...] | None = None
        self.matcher: GrammarMatcher | None = None  # set when the request is constrained
        self.drafts: list[int] = []  # MTP drafts to verify in the next step
        self.speculate = False  # set by the engine: this sequence drafts with the MTP head
        self.delta: Any = None  # the engine's news of this choice in the step being recorded (engine._Delta)
        # Thinking budget: reasoning tokens so far, whether the budget still counts, and the tokens to force next.
        self.reasoning_tokens = 0
        budget = req.max_thinking_tokens
        self._thinking = budget is not None and budget > 0 and bool(req.thinking_end_ids)
        self._forced: list[int] = list(req.thinking_end_ids) if budget == 0 else []
        self.t_arrival = req.arrival_time or time.monotonic()
        # Prefix cache (set by the engine when it caches this sequence: replicas/engine/prefix_cache.py): the tree
        # key and namespace; prompt tokens the last admission found cached; the positions where it saves its state
        # (Capture), the one its current chunk saves (pos, checkpoint, provisional), and the hit it restores (pinned
        # until its first step ran).
        self.cache_key: tuple[int, ...] | None = None
        self.cache_ns: tuple[str, bool] = ("", False)
        self.cached_tokens = 0
        self.captures: list[Any] = []
        self.saving: tuple[int, int, bool] | None = None
        self.pinned = 0
        self.t_scheduled: float | None = None
        self.t_first_token: float | None = None
        self.t_last_token: float | None = None

    # ----------------------------------------------------------------- scheduler view
    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.req.prompt_ids

    @property
    def output_ids(self) -> tuple[int, ...]:
        """A copy (O(output)): the hot path reads `token_ids` and `num_output`."""
        return tuple(self.token_ids[self.prompt_len :])

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def remaining(self) -> int:
        """Tokens still to be computed before the next sample."""
        return len(self.token_ids) - self.num_computed

    def vision_rows(self) -> tuple[int, ...]:
        """Prompt indices that take vision embeddings (its image / video pad tokens), found once."""
        if self._vision_rows is None:
            pads = set(self.mm.pad_ids) if self.mm is not None else set()
            self._vision_rows = tuple(i for i, t in enumerate(self.req.prompt_ids) if t in pads)
        return self._vision_rows

    def suppressed_ids(self) -> tuple[int, ...]:
        """Tokens that may not be sampled yet (min_tokens keeps eos and stop tokens out)."""
        if self.num_output >= self.req.min_tokens:
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
    def append(self, token: int, now: float | None = None) -> tuple[str | None, int | None]:
        """Record a generated token at `now` (the step's clock; read here when None); returns (finish_reason,
        stop_reason): ("stop", None) for eos, ("stop", token) for a stop token id, ("length", None) at max_tokens,
        (None, None) while it runs on."""
        if now is None:
            now = time.monotonic()
        if self.t_first_token is None:
            self.t_first_token = now
        self.t_last_token = now
        self.token_ids.append(token)
        self._count_thinking(token)
        return self.ends(token)

    def ends(self, token: int) -> tuple[str | None, int | None]:
        """Whether the token just appended, `token`, ends the choice: (finish_reason, stop_reason) as `append`."""
        n = self.num_output
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
