"""Continuous-batching scheduler over the trunk ranks of one group.

Each step, per trunk rank, under a token budget: running decodes first (one token each, a new
KV block when a block fills, preempting the newest running sequence when none is free),
then running prefills, then admission of waiting sequences (FIFO) to the trunk rank with
the most free blocks. Prefill chunks that are not a sequence's last are multiples of 64
tokens, so every resumed prefill starts at a multiple of 64 and stays bit-exact
(model_spec §8). The only per-sequence invariant is num_computed vs num_tokens (vLLM's).
Preempted sequences free their caches and are recomputed from scratch when readmitted.
Tests: tests/replicas/test_scheduler.py (driven with fake step results).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from replicas.engine.block_pool import BlockPool
from replicas.engine.sequence import CacheAddress, Sequence, Status

CHUNK_ALIGN = 64


@dataclass(frozen=True)
class SchedulerConfig:
    """Per trunk rank: at most max_num_seqs running, max_num_batched_tokens new tokens per step."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # Speculation: KV positions reserved past a sequence's tokens (verified drafts and MTP drafting
    # write ahead of the accepted prefix): 2k for k draft tokens.
    lookahead: int = 0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < CHUNK_ALIGN:
            raise ValueError(f"max_num_batched_tokens must be >= {CHUNK_ALIGN} (the prefill chunk alignment)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")


@dataclass(frozen=True)
class Scheduled:
    """A sequence's part of a step: tokens [start, start + n) of its ids; sample after them or not."""

    seq: Sequence
    start: int
    n: int
    sample: bool


@dataclass
class SchedulerOutput:
    per_trunk: list[list[Scheduled]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not any(self.per_trunk)

    @property
    def num_tokens(self) -> int:
        return sum(s.n for trunk in self.per_trunk for s in trunk)


def chunk_len(remaining: int, budget: int) -> int:
    """All remaining tokens if they fit the budget, else the largest multiple of 64 that does."""
    if remaining <= budget:
        return remaining
    return (budget // CHUNK_ALIGN) * CHUNK_ALIGN


class Scheduler:
    """Decides each step's work; owns the waiting queue and the running lists.

    Args:
        config: per-rank limits.
        pools: one `BlockPool` per trunk rank (indices into that rank's caches).
    """

    def __init__(self, config: SchedulerConfig, pools: list[BlockPool]) -> None:
        self.config = config
        self.pools = pools
        self.waiting: deque[Sequence] = deque()
        self.running: list[list[Sequence]] = [[] for _ in pools]
        self.num_preemptions = 0

    # ----------------------------------------------------------------- bookkeeping
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def fits_ever(self, total_tokens: int) -> bool:
        """Whether a sequence of this many tokens can be held by one trunk rank at all."""
        return any(p.blocks_for(total_tokens + self.config.lookahead) <= p.num_blocks for p in self.pools)

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def release(self, seq: Sequence) -> None:
        """Return a finished or aborted sequence's caches and drop it from the queues."""
        if seq.addr is not None:
            self.pools[seq.addr.trunk].release(slot=seq.addr.slot, blocks=seq.addr.blocks)
            self.running[seq.addr.trunk].remove(seq)
            seq.addr = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _preempt(self, trunk: int, out: SchedulerOutput) -> Sequence:
        victim = self.running[trunk][-1]  # newest admitted: least progress lost
        self.pools[trunk].release(slot=victim.addr.slot, blocks=victim.addr.blocks)  # type: ignore[union-attr]  # running: addr set
        self.running[trunk].pop()
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        self.num_preemptions += 1
        return victim

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` blocks for `tokens` positions; False if its pool is short."""
        assert seq.addr is not None
        pool = self.pools[seq.addr.trunk]
        need = pool.blocks_for(tokens) - len(seq.addr.blocks)
        if need <= 0:
            return True
        if need > pool.free_blocks:
            return False
        seq.addr.blocks.extend(pool.take_blocks(need))
        return True

    # ----------------------------------------------------------------- the decision
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(per_trunk=[[] for _ in self.pools])
        budgets = [self.config.max_num_batched_tokens] * len(self.pools)
        for t in range(len(self.pools)):
            budgets[t] = self._schedule_running(t, budgets[t], out)
        self._admit(budgets, out)
        return out

    def _schedule_running(self, t: int, budget: int, out: SchedulerOutput) -> int:
        planned: list[Scheduled] = []
        i = 0
        while i < len(self.running[t]):  # decodes, oldest first
            seq = self.running[t][i]
            n = 1 + len(seq.drafts)  # the new token, and drafts to verify after it
            if seq.remaining != 1 or seq.num_computed == 0 or budget < n:
                i += 1
                continue
            while not self._grow(seq, seq.num_tokens + self.config.lookahead):
                if self._preempt(t, out) is seq:
                    break
            if seq.addr is None:  # it preempted itself
                break
            planned.append(Scheduled(seq, seq.num_computed, n, True))
            budget -= n
            i += 1
        for seq in list(self.running[t]):  # prefills (fresh or resumed)
            if seq.remaining == 1 and seq.num_computed > 0:
                continue
            n = chunk_len(seq.remaining, budget)
            while n > 0 and not self._grow(
                seq, seq.num_computed + n + (self.config.lookahead if n == seq.remaining else 0)
            ):
                n = ((n - 1) // CHUNK_ALIGN) * CHUNK_ALIGN  # a shorter aligned chunk that fits
            if n <= 0:
                continue
            planned.append(Scheduled(seq, seq.num_computed, n, n == seq.remaining))
            budget -= n
        # a preemption may have removed a sequence already planned: keep only live ones
        out.per_trunk[t] = [p for p in planned if p.seq.addr is not None]
        return budget

    def _admit(self, budgets: list[int], out: SchedulerOutput) -> None:
        while self.waiting:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                seq.status = Status.FINISHED
                continue
            best, best_free = None, -1
            for t, pool in enumerate(self.pools):
                if pool.free_slots == 0 or len(self.running[t]) >= self.config.max_num_seqs or budgets[t] < 1:
                    continue
                n = chunk_len(seq.remaining, budgets[t])
                need = pool.blocks_for(n + (self.config.lookahead if n == seq.remaining else 0))
                if n > 0 and need <= pool.free_blocks and pool.free_blocks > best_free:
                    best, best_free = t, pool.free_blocks
            if best is None:
                return  # FIFO: nobody overtakes the head of the queue
            pool = self.pools[best]
            n = chunk_len(seq.remaining, budgets[best])
            self.waiting.popleft()
            need = pool.blocks_for(n + (self.config.lookahead if n == seq.remaining else 0))
            seq.addr = CacheAddress(trunk=best, slot=pool.take_slot(), blocks=pool.take_blocks(need))
            seq.status = Status.RUNNING
            self.running[best].append(seq)
            out.per_trunk[best].append(Scheduled(seq, 0, n, n == seq.remaining))
            budgets[best] -= n
