"""Continuous-batching scheduler over the trunk ranks of one group.

Each step, per trunk rank, under a token budget: running decodes first (one token each, a new
KV block when a block fills, preempting the newest running sequence when none is free),
then running prefills, then admission of waiting sequences (FIFO) to the trunk rank with
the most free blocks. Prefill chunks that are not a sequence's last are multiples of 64
tokens, so every resumed prefill starts at a multiple of 64 and stays bit-exact
(model_spec §8). The only per-sequence invariant is num_computed vs num_tokens (vLLM's).
Preempted sequences free their caches and are recomputed from scratch when readmitted.
Per step the work is O(running sequences) in all: the queues are insertion-ordered dicts keyed by
sequence id (release and preemption O(1), no list scans per sequence), and sequences that leave a
trunk rank are listed for the next step's header (`take_released`: the rank drops their state).
Tests: tests/replicas/test_step_protocol.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from replicas.engine.block_pool import BlockPool
from replicas.engine.sequence import CacheAddress, Sequence, Status

CHUNK_ALIGN = 64
_new = tuple.__new__


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


class Scheduled(NamedTuple):
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
        self.waiting: OrderedDict[int, Sequence] = OrderedDict()  # seq_id -> sequence, FIFO
        self.running: list[dict[int, Sequence]] = [{} for _ in pools]  # per trunk rank, oldest admitted first
        self.released: list[list[int]] = [[] for _ in pools]  # per trunk rank: ids it holds state of that left
        self.num_preemptions = 0

    # ----------------------------------------------------------------- bookkeeping
    def add(self, seq: Sequence) -> None:
        self.waiting[seq.seq_id] = seq

    def take_released(self, trunk: int) -> tuple[int, ...]:
        """Sequences that left `trunk` since the last call (for the next step's header)."""
        out = self.released[trunk]
        if not out:
            return ()
        self.released[trunk] = []
        return tuple(out)

    def _free(self, seq: Sequence) -> None:
        """Return a running sequence's caches to its pool and take it off its rank."""
        addr = seq.addr
        assert addr is not None
        self.pools[addr.trunk].release(slot=addr.slot, blocks=addr.blocks)
        del self.running[addr.trunk][seq.seq_id]
        if addr.started:
            self.released[addr.trunk].append(seq.seq_id)
        seq.addr = None

    def fits_ever(self, total_tokens: int) -> bool:
        """Whether a sequence of this many tokens can be held by one trunk rank at all."""
        return any(p.blocks_for(total_tokens + self.config.lookahead) <= p.num_blocks for p in self.pools)

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def release(self, seq: Sequence) -> None:
        """Return a finished or aborted sequence's caches and drop it from the queues."""
        if seq.addr is not None:
            self._free(seq)
        else:
            self.waiting.pop(seq.seq_id, None)
        seq.status = Status.FINISHED

    def _preempt(self, trunk: int, out: SchedulerOutput) -> Sequence:
        victim = next(reversed(self.running[trunk].values()))  # newest admitted: least progress lost
        self._free(victim)
        victim.reset_for_recompute()
        self.waiting[victim.seq_id] = victim
        self.waiting.move_to_end(victim.seq_id, last=False)
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
        prefills: list[Sequence] = []
        lookahead = self.config.lookahead
        block_size = self.pools[t].block_size
        preempted = len(out.preempted)
        for seq in list(self.running[t].values()):  # decodes, oldest first
            addr = seq.addr
            if addr is None:  # preempted by an older one's growth
                break
            computed = seq.num_computed
            if len(seq.token_ids) - computed != 1 or computed == 0:
                prefills.append(seq)
                continue
            n = 1 + len(seq.drafts)  # the new token, and drafts to verify after it
            if budget < n:
                continue
            if computed + 1 + lookahead > len(addr.blocks) * block_size:  # it needs a new block
                while not self._grow(seq, computed + 1 + lookahead):
                    if self._preempt(t, out) is seq:
                        break
                if seq.addr is None:  # it preempted itself (and every newer one before it)
                    break
            planned.append(_new(Scheduled, (seq, computed, n, True)))  # C-built (a NamedTuple's __new__ is Python)
            budget -= n
        for seq in prefills:  # prefills (fresh or resumed), oldest first
            if seq.addr is None:
                continue
            n = chunk_len(seq.remaining, budget)
            while n > 0 and not self._grow(seq, seq.num_computed + n + (lookahead if n == seq.remaining else 0)):
                n = ((n - 1) // CHUNK_ALIGN) * CHUNK_ALIGN  # a shorter aligned chunk that fits
            if n <= 0:
                continue
            planned.append(Scheduled(seq, seq.num_computed, n, n == seq.remaining))
            budget -= n
        # a preemption may have removed a sequence already planned: keep only live ones
        out.per_trunk[t] = [p for p in planned if p.seq.addr is not None] if len(out.preempted) > preempted else planned
        return budget

    def _admit(self, budgets: list[int], out: SchedulerOutput) -> None:
        while self.waiting:
            seq = next(iter(self.waiting.values()))
            if seq.aborted:
                self.waiting.popitem(last=False)
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
            self.waiting.popitem(last=False)
            need = pool.blocks_for(n + (self.config.lookahead if n == seq.remaining else 0))
            seq.addr = CacheAddress(trunk=best, slot=pool.take_slot(), blocks=pool.take_blocks(need))
            seq.status = Status.RUNNING
            self.running[best][seq.seq_id] = seq
            out.per_trunk[best].append(Scheduled(seq, 0, n, n == seq.remaining))
            budgets[best] -= n
