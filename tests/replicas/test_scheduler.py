"""The continuous-batching scheduler, driven through its public API with fake step results.

Known answers worked out by hand in each test (block size 16, so a block holds 16 positions):
admission is FIFO to the trunk rank with the most free blocks, decodes go before prefills under
the token budget, non-final prefill chunks are multiples of 64, preemption takes the newest
running sequence first and the victim is recomputed from token 0, max_num_seqs caps a rank, and
release returns every block and slot.

`_complete` plays the group: it does to each scheduled sequence what the engine does with a
step's results (the chunk is now in the caches; a sampled chunk yields one token).
"""

from __future__ import annotations

import pytest

from model_shards.sampling import SamplingParams
from replicas.engine.block_pool import BlockPool
from replicas.engine.engine_types import GenerateRequest
from replicas.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from replicas.engine.sequence import Sequence

BLOCK = 16
TOKEN = 7  # what every fake step samples


def _seq(seq_id: int, prompt_len: int) -> Sequence:
    req = GenerateRequest(
        request_id=f"r{seq_id}",
        prompt_ids=tuple(range(1, prompt_len + 1)),
        params=SamplingParams(temperature=0.0),
        max_tokens=1000,
    )
    return Sequence(req, 0, seq_id)


def _pools(*num_blocks: int, slots: int = 8) -> list[BlockPool]:
    return [BlockPool(num_blocks=n, num_slots=slots, block_size=BLOCK) for n in num_blocks]


def _plan(out: SchedulerOutput) -> list[list[tuple[str, int, int, bool]]]:
    """Per trunk rank: (request id, start, n, sample) of each scheduled part, in order."""
    return [[(s.seq.req.request_id, s.start, s.n, s.sample) for s in trunk] for trunk in out.per_trunk]


def _complete(out: SchedulerOutput) -> None:
    for trunk in out.per_trunk:
        for s in trunk:
            s.seq.num_computed = s.start + s.n
            if s.sample:
                s.seq.append(TOKEN)


def test_config_bounds() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 64"):
        SchedulerConfig(max_num_batched_tokens=63)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(max_num_seqs=0)


def test_admission_goes_fifo_to_the_rank_with_most_free_blocks() -> None:
    pools = _pools(8, 10)
    sch = Scheduler(SchedulerConfig(), pools)
    for i in range(3):
        sch.add(_seq(i, 40))  # 40 tokens: 3 blocks each
    out = sch.schedule()
    # r0 -> rank 1 (10 free > 8), leaving 7; r1 -> rank 0 (8 > 7), leaving 5; r2 -> rank 1 (7 > 5), leaving 4
    assert _plan(out) == [[("r1", 0, 40, True)], [("r0", 0, 40, True), ("r2", 0, 40, True)]]
    assert [p.free_blocks for p in pools] == [5, 4]
    assert out.num_tokens == 120 and not out.preempted


def test_nobody_overtakes_the_head_of_the_queue() -> None:
    pools = _pools(2)
    sch = Scheduler(SchedulerConfig(), pools)
    sch.add(_seq(0, 40))  # needs 3 blocks: never fits now
    sch.add(_seq(1, 10))  # needs 1 block: would fit, but waits behind r0
    out = sch.schedule()
    assert out.empty and sch.num_running == 0
    assert pools[0].free_blocks == 2


def test_decodes_first_then_prefill_chunks_of_64_under_the_budget() -> None:
    pools = _pools(64)
    sch = Scheduler(SchedulerConfig(max_num_batched_tokens=128), pools)
    a = _seq(0, 10)
    sch.add(a)
    out = sch.schedule()
    assert _plan(out) == [[("r0", 0, 10, True)]]
    _complete(out)
    sch.add(_seq(1, 300))
    plans = []
    for _ in range(4):
        out = sch.schedule()
        plans.append(_plan(out)[0])
        _complete(out)
    # the decode (1 token) comes first; 127 left: prefill chunks of 64 (the largest multiple of 64 that
    # fits) until the remaining 300 - 192 = 108 fit whole, and only that last chunk samples
    assert plans == [
        [("r0", 10, 1, True), ("r1", 0, 64, False)],
        [("r0", 11, 1, True), ("r1", 64, 64, False)],
        [("r0", 12, 1, True), ("r1", 128, 64, False)],
        [("r0", 13, 1, True), ("r1", 192, 108, True)],
    ]


def test_a_prefill_waits_when_decodes_leave_less_than_a_chunk() -> None:
    pools = _pools(64)
    sch = Scheduler(SchedulerConfig(max_num_batched_tokens=64), pools)
    sch.add(_seq(0, 5))
    sch.add(_seq(1, 5))
    _complete(sch.schedule())
    sch.add(_seq(2, 100))
    out = sch.schedule()
    # two decodes leave 62 tokens: no multiple of 64 fits and 100 tokens do not fit whole
    assert _plan(out) == [[("r0", 5, 1, True), ("r1", 5, 1, True)]]
    assert len(sch.waiting) == 1
    # a short prompt that fits whole is admitted with the same 62
    sch2 = Scheduler(SchedulerConfig(max_num_batched_tokens=64), _pools(64))
    sch2.add(_seq(0, 5))
    sch2.add(_seq(1, 5))
    _complete(sch2.schedule())
    sch2.add(_seq(2, 62))
    assert _plan(sch2.schedule()) == [[("r0", 5, 1, True), ("r1", 5, 1, True), ("r2", 0, 62, True)]]


def test_preemption_takes_the_newest_first_and_recomputes_from_scratch() -> None:
    pools = _pools(4)
    sch = Scheduler(SchedulerConfig(), pools)
    a, b, c = _seq(0, 32), _seq(1, 16), _seq(2, 16)  # 2 + 1 + 1 blocks: the pool is full
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert _plan(out) == [[("r0", 0, 32, True), ("r1", 0, 16, True), ("r2", 0, 16, True)]]
    assert pools[0].free_blocks == 0
    _complete(out)  # a: 33 tokens, b and c: 17 tokens; each decode now needs one more block
    out = sch.schedule()
    # a (oldest) needs a 3rd block: c (newest) is preempted and one of its blocks becomes a's 3rd. b then
    # needs a 2nd block, none is free, and the newest running sequence is b itself: preempted too.
    assert [s.req.request_id for s in out.preempted] == ["r2", "r1"]
    assert _plan(out) == [[("r0", 32, 1, True)]]
    assert [s.req.request_id for s in sch.waiting.values()] == ["r1", "r2"]  # back at the head, in arrival order
    assert pools[0].free_blocks == 1  # a holds 3 of 4
    assert sch.num_preemptions == 2
    _complete(out)
    sch.release(a)
    out = sch.schedule()
    # recomputed from token 0: the 16 prompt tokens and the 1 output token, sampling after them
    assert _plan(out) == [[("r1", 0, 17, True), ("r2", 0, 17, True)]]
    assert not out.preempted


def test_max_num_seqs_per_rank_and_free_slots() -> None:
    pools = _pools(64, 64)
    sch = Scheduler(SchedulerConfig(max_num_seqs=1), pools)
    for i in range(3):
        sch.add(_seq(i, 8))
    out = sch.schedule()
    assert _plan(out) == [[("r0", 0, 8, True)], [("r1", 0, 8, True)]]  # r2 waits: each rank runs 1
    assert sch.num_running == 2 and len(sch.waiting) == 1
    _complete(out)
    sch.release(sch.running[0][0])
    assert _plan(sch.schedule()) == [[("r2", 0, 8, True)], [("r1", 8, 1, True)]]
    # state slots bound a rank too: one slot, plenty of blocks
    sch = Scheduler(SchedulerConfig(), _pools(64, slots=1))
    sch.add(_seq(0, 8))
    sch.add(_seq(1, 8))
    assert _plan(sch.schedule()) == [[("r0", 0, 8, True)]]


def test_release_returns_every_block_and_slot() -> None:
    pools = _pools(12, slots=4)
    sch = Scheduler(SchedulerConfig(max_num_batched_tokens=64), pools)
    seqs = [_seq(0, 100), _seq(1, 20), _seq(2, 3)]
    for s in seqs:
        sch.add(s)
    for _ in range(3):  # r0 is mid-prefill after the first step; blocks grow as chunks land
        _complete(sch.schedule())
    assert pools[0].free_blocks < 12 and pools[0].free_slots < 4
    waiting = _seq(3, 8)
    sch.add(waiting)
    for s in [*seqs, waiting]:
        sch.release(s)
    assert (pools[0].free_blocks, pools[0].free_slots) == (12, 4)
    assert sch.num_running == 0 and len(sch.waiting) == 0
    assert sch.schedule().empty


def test_fits_ever_counts_the_speculation_lookahead() -> None:
    sch = Scheduler(SchedulerConfig(), _pools(4))
    assert sch.fits_ever(64) and not sch.fits_ever(65)  # 4 blocks x 16
    sch = Scheduler(SchedulerConfig(lookahead=2), _pools(4))
    assert sch.fits_ever(62) and not sch.fits_ever(63)


def test_decodes_the_rank_continues_alone_lead_the_step() -> None:
    """The step message's columns (StepRequest.decodes) take the decodes of self-fed sequences the rank already
    holds whose block table does not grow: the scheduler puts them first and counts them (`out.columnar`)."""
    sch = Scheduler(SchedulerConfig(max_num_batched_tokens=128), _pools(64))
    a, b, c = _seq(0, 5), _seq(1, 16), _seq(2, 5)  # b's first decode writes position 17: a second block
    a.self_fed = b.self_fed = True  # c is not (a grammar, drafts or forced tokens: its entry is built each step)
    for s in (a, b, c):
        sch.add(s)
    out = sch.schedule()
    assert out.columnar == [0]  # prefills: none has started on the rank
    _complete(out)
    for s in (a, b, c):  # what the engine's step message did: started on the rank, every block sent
        assert s.addr is not None
        s.addr.started, s.addr.blocks_sent = True, len(s.addr.blocks)
    out = sch.schedule()
    assert out.columnar == [1]
    assert _plan(out) == [[("r0", 5, 1, True), ("r1", 16, 1, True), ("r2", 5, 1, True)]]
    assert b.addr is not None and len(b.addr.blocks) == 2 and b.addr.blocks_sent == 1
