"""Continuous-batching scheduler over the trunk ranks of one group.

Each step, per trunk rank, under a token budget: running decodes first (one token each, a new
KV block when a block fills, preempting the newest running sequence when none is free),
then running prefills, then admission of waiting sequences (FIFO) to the trunk rank with
the most free blocks. Prefill chunks that are not a sequence's last are multiples of 64
tokens, so every resumed prefill starts at a multiple of 64 and stays bit-exact
(model_spec §8). The only per-sequence invariant is num_computed vs num_tokens (vLLM's).
Preempted sequences free their caches and are recomputed from scratch when readmitted.
With a prefix cache (one `PrefixCache` per trunk rank), admission places a sequence on the rank holding its
longest cached prefix (free blocks break ties), shares that prefix's KV blocks, restores its saved state and
starts it there; prefill chunks end exactly where the sequence saves a state for the cache; a pool short of
blocks asks its cache to evict before a running sequence is preempted. `after_step` hands the cache what a step
computed (captured states, prompt blocks).
Per step the work is O(running sequences) in all: the queues are insertion-ordered dicts keyed by
sequence id (release and preemption O(1), no list scans per sequence), and sequences that leave a
trunk rank are listed for the next step's header (`take_released`: the rank drops their state).
Tests: tests/replicas/test_step_protocol.py, tests/replicas/test_prefix_cache.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

from replicas.engine.block_pool import BlockPool
from replicas.engine.prefix_cache import GRID, Hit, PrefixCache
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
    # per trunk: how many of its first entries are decodes its rank continues on its own (the step message's
    # columns, replicas/engine/step_types.py StepRequest.decodes): started, self-fed, no new block
    columnar: list[int] = field(default_factory=list)
    # prefix cache: sequences whose chunk this step computes prompt KV the cache may adopt (and maybe saves a state)
    prefilled: list[Scheduled] = field(default_factory=list)

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
        caches: one `PrefixCache` per trunk rank (over the same pools), or None: no prefix caching.
    """

    def __init__(
        self, config: SchedulerConfig, pools: list[BlockPool], caches: list[PrefixCache] | None = None
    ) -> None:
        self.config = config
        self.pools = pools
        self.caches = caches
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
        pool = self.pools[addr.trunk]
        if seq.saving is not None:  # a state its chunk was to save: never marked ready
            pool.release_checkpoint(seq.saving[1])
            seq.saving = None
        if seq.pinned:
            self._unpin(seq)
        pool.release(slot=addr.slot, blocks=addr.blocks)
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
        if need > pool.free_blocks and self.caches is not None:  # the cache's unused blocks go before any sequence
            self.caches[seq.addr.trunk].evict_blocks(need - pool.free_blocks)
        if need > pool.free_blocks:
            return False
        seq.addr.blocks.extend(pool.take_blocks(need))
        return True

    # ----------------------------------------------------------------- prefix cache
    def _unpin(self, seq: Sequence) -> None:
        assert self.caches is not None and seq.addr is not None and seq.cache_key is not None
        self.caches[seq.addr.trunk].unpin(seq.cache_key, seq.cache_ns, seq.pinned)
        seq.pinned = 0

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """The prefill chunk: as `chunk_len`, ended at the sequence's next capture position."""
        n = chunk_len(seq.remaining, budget)
        caps = seq.captures
        if caps:
            while caps and caps[0].pos <= seq.num_computed:
                caps.pop(0)
            if caps and seq.num_computed + n > caps[0].pos:
                n = caps[0].pos - seq.num_computed
        return n

    def _plan_save(self, sch: Scheduled, out: SchedulerOutput) -> None:
        """The chunk is scheduled: if it ends at a capture position, give it a state checkpoint (evicting the
        least valuable state if none is free; no capture if every state is pinned); list it for `after_step`."""
        seq = sch.seq
        if seq.cache_key is None or sch.start >= seq.prompt_len:
            return
        caps = seq.captures
        if caps and caps[0].pos == sch.start + sch.n:
            cap = caps.pop(0)
            assert self.caches is not None and seq.addr is not None
            pool = self.pools[seq.addr.trunk]
            ckpt = pool.take_checkpoint()
            if ckpt is None and self.caches[seq.addr.trunk].evict_state(provisional_only=cap.provisional) is not None:
                ckpt = pool.take_checkpoint()
            if ckpt is not None:
                seq.saving = (cap.pos, ckpt, cap.provisional)
        out.prefilled.append(sch)

    def after_step(self, out: SchedulerOutput, refused: set[int]) -> None:
        """The step ran: restored states are free to go, saved states become ready, computed prompt chunks join
        the tree. Sequences the ranks refused (`refused`: seq ids) computed nothing: their saves are dropped."""
        caches = self.caches
        if caches is None:
            return
        for sch in out.prefilled:
            seq = sch.seq
            addr = seq.addr
            if addr is None or seq.seq_id in refused or seq.cache_key is None:
                continue  # released (its checkpoint went back with it) or refused (released by the engine next)
            cache = caches[addr.trunk]
            if seq.pinned:
                self._unpin(seq)
            key, ns = seq.cache_key, seq.cache_ns
            upto = min(sch.start + sch.n, ((seq.prompt_len - 1) // GRID) * GRID)
            pos = 0
            if seq.saving is not None:  # the chunk ends at its capture, so this walk adopts the chunk too
                pos, ckpt, provisional = seq.saving
                seq.saving = None
                cache.captured(key, ns, addr.blocks, pos, ckpt, provisional=provisional)
            if upto > pos:
                cache.insert(key, ns, addr.blocks, upto)

    # ----------------------------------------------------------------- the decision
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(per_trunk=[[] for _ in self.pools], columnar=[0] * len(self.pools))
        budgets = [self.config.max_num_batched_tokens] * len(self.pools)
        for t in range(len(self.pools)):
            budgets[t] = self._schedule_running(t, budgets[t], out)
        self._admit(budgets, out)
        return out

    def _schedule_running(self, t: int, budget: int, out: SchedulerOutput) -> int:
        planned: list[Scheduled] = []
        cols: list[Scheduled] = []  # decodes the rank continues on its own: they lead the step (out.columnar)
        prefills: list[Sequence] = []
        lookahead = self.config.lookahead
        block_size = self.pools[t].block_size
        preempted = len(out.preempted)
        new, add_col = _new, cols.append  # (locals: read per running sequence)
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
            elif n == 1 and seq.self_fed and addr.started and addr.blocks_sent == len(addr.blocks):
                add_col(new(Scheduled, (seq, computed, 1, True)))
                budget -= 1
                continue
            planned.append(_new(Scheduled, (seq, computed, n, True)))  # C-built (a NamedTuple's __new__ is Python)
            budget -= n
        for seq in prefills:  # prefills (fresh or resumed), oldest first
            if seq.addr is None:
                continue
            n = self._chunk(seq, budget)
            while n > 0 and not self._grow(seq, seq.num_computed + n + (lookahead if n == seq.remaining else 0)):
                n = ((n - 1) // CHUNK_ALIGN) * CHUNK_ALIGN  # a shorter aligned chunk that fits
            if n <= 0:
                continue
            sch = Scheduled(seq, seq.num_computed, n, n == seq.remaining)
            planned.append(sch)
            if self.caches is not None:
                self._plan_save(sch, out)
            budget -= n
        # a preemption may have removed a sequence already planned: keep only live ones
        if len(out.preempted) > preempted:
            cols = [p for p in cols if p.seq.addr is not None]
            planned = [p for p in planned if p.seq.addr is not None]
        out.per_trunk[t] = cols + planned if planned else cols
        out.columnar[t] = len(cols)
        return budget

    def _admit(self, budgets: list[int], out: SchedulerOutput) -> None:
        while self.waiting:
            seq = next(iter(self.waiting.values()))
            if seq.aborted:
                self.waiting.popitem(last=False)
                seq.status = Status.FINISHED
                continue
            if self.caches is not None and seq.cache_key is not None:
                if not self._admit_cached(seq, budgets, out):
                    return
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
                if self.caches is not None and self._evict_for(seq, budgets):
                    continue
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

    def _evict_for(self, seq: Sequence, budgets: list[int]) -> bool:
        """An uncached sequence fits no rank's free blocks: evict cache blocks on the rank with the most free
        blocks that has room otherwise; True if that made it fit."""
        assert self.caches is not None
        for t in sorted(range(len(self.pools)), key=lambda t: -self.pools[t].free_blocks):
            pool = self.pools[t]
            if pool.free_slots == 0 or len(self.running[t]) >= self.config.max_num_seqs or budgets[t] < 1:
                continue
            n = chunk_len(seq.remaining, budgets[t])
            need = pool.blocks_for(n + (self.config.lookahead if n == seq.remaining else 0))
            if n > 0 and need > pool.free_blocks:
                self.caches[t].evict_blocks(need - pool.free_blocks)
                return need <= pool.free_blocks
        return False

    def _admit_cached(self, seq: Sequence, budgets: list[int], out: SchedulerOutput) -> bool:
        """Admit the head of the queue on the rank with its longest cached prefix (free blocks break ties), with
        that prefix's blocks shared and its state restored; False if no rank can take it now."""
        caches = self.caches
        key, ns = seq.cache_key, seq.cache_ns
        assert caches is not None and key is not None
        lookahead = self.config.lookahead
        candidates: list[tuple[int, int, int, Hit]] = []
        for t, pool in enumerate(self.pools):
            if pool.free_slots == 0 or len(self.running[t]) >= self.config.max_num_seqs:
                continue
            hit = caches[t].match(key, ns, count=False)
            candidates.append((hit.length, pool.available_blocks, t, hit))
        candidates.sort(key=lambda c: (-c[0], -c[1]))
        for _, _, t, hit in candidates:
            pool, cache = self.pools[t], caches[t]
            p = hit.length
            if budgets[t] < CHUNK_ALIGN and budgets[t] < len(seq.token_ids) - p:
                if p:  # the rank holding its prefix has no tokens left this step: it waits a step, not loses the hit
                    return False
                continue
            seq.num_computed = p
            seq.captures = cache.plan_captures(key, ns, seq.req.cache_hints, p)
            n = self._chunk(seq, budgets[t])
            if n <= 0:
                seq.num_computed, seq.captures = 0, []
                continue
            pool.share(hit.blocks)  # held before evicting, so the hit itself is never evicted
            need = pool.blocks_for(p + n + (lookahead if n == seq.remaining else 0)) - len(hit.blocks)
            if need > pool.free_blocks:
                cache.evict_blocks(need - pool.free_blocks)
            if need > pool.free_blocks:
                pool.release_refs(hit.blocks)
                seq.num_computed, seq.captures = 0, []
                continue
            self.waiting.popitem(last=False)
            cache.queries += len(key)
            cache.hits += p
            seq.cached_tokens = p
            seq.addr = CacheAddress(
                trunk=t, slot=pool.take_slot(), blocks=[*hit.blocks, *pool.take_blocks(need)], restore=hit.checkpoint
            )
            if p:
                cache.pin(hit, ns, key)
                seq.pinned = p
            seq.status = Status.RUNNING
            self.running[t][seq.seq_id] = seq
            sch = Scheduled(seq, p, n, n == seq.remaining)
            out.per_trunk[t].append(sch)
            self._plan_save(sch, out)
            budgets[t] -= n
            return True
        return False
