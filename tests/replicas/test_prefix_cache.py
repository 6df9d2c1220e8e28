"""The prefix cache: the tree of one trunk rank (admission positions, eviction order, reference counts, salts,
reset), and end-to-end parity of cached vs uncached generation with the single-process engine.
"""

from __future__ import annotations

import pytest

from replicas.engine.block_pool import BlockPool
from replicas.engine.prefix_cache import GRID, Capture, PrefixCache
from replicas.engine.prefix_config import PrefixCacheConfig

NS = ("", False)


def _cache(blocks: int = 64, checkpoints: int = 8, block_size: int = 16, **cfg: int) -> PrefixCache:
    pool = BlockPool(num_blocks=blocks, num_slots=4, block_size=block_size, num_checkpoints=checkpoints)
    return PrefixCache(pool, PrefixCacheConfig(**cfg))


def _prefill(cache: PrefixCache, key: list[int], captures: list[Capture], ns: tuple[str, bool] = NS) -> list[int]:
    """What the scheduler does for a sequence that prefills `key` from 0: its own blocks, its captures, adoption
    of its prompt path; the sequence then finishes (its references go)."""
    pool = cache.pool
    blocks = pool.take_blocks(pool.blocks_for(len(key)))
    for c in captures:
        ckpt = pool.take_checkpoint()
        assert ckpt is not None
        cache.captured(key, ns, blocks, c.pos, ckpt, provisional=c.provisional)
    cache.insert(key, ns, blocks, ((len(key) - 1) // GRID) * GRID)
    pool.release(slot=None, blocks=blocks)
    return blocks


def test_block_size_must_divide_the_grid() -> None:
    with pytest.raises(ValueError, match="divides 64"):
        _cache(block_size=48)


def test_probes_on_a_new_path_then_a_branch_claims_its_point_and_trims_the_probes() -> None:
    cache = _cache(blocks=256, probe_interval=512, states_per_path=4)
    a = list(range(2048)) + [10_000 + i for i in range(128)]
    plan = cache.plan_captures(a, NS, (), 0)
    assert plan == [Capture(512, True), Capture(1024, True), Capture(1536, True), Capture(2048, True)]
    _prefill(cache, a, plan)
    assert cache.num_states == 4
    b = list(range(2048)) + [20_000 + i for i in range(128)]
    hit = cache.match(b, NS)
    assert hit.length == 2048 and len(hit.blocks) == 2048 // 16
    # the branch point (2048) holds a probe already: it is claimed, the probes before it go
    assert cache.plan_captures(b, NS, (), hit.length) == []
    assert cache.num_states == 1 and cache.states_evicted == 3
    assert cache.match(a, NS).length == 2048  # the old path still resumes at the branch point


def test_branch_point_off_the_probe_grid_is_captured_and_hints_round_down() -> None:
    cache = _cache(probe_interval=512, states_per_path=4)
    a = list(range(1000))
    _prefill(cache, a, cache.plan_captures(a, NS, (), 0))
    b = list(range(700)) + [5000 + i for i in range(300)]
    hit = cache.match(b, NS)
    assert hit.length == 512  # the probe
    plan = cache.plan_captures(b, NS, (900,), hit.length)
    assert plan == [Capture(640, False), Capture(896, False)]  # 700 -> the chunk ending at 640; hint 900 -> 896
    # short prompts: nothing to capture or hit below one chunk
    assert cache.plan_captures(list(range(40)), NS, (30,), 0) == []
    assert cache.match(list(range(40)), NS).length == 0


def test_hit_is_at_most_prompt_len_minus_one() -> None:
    cache = _cache(probe_interval=64)
    a = list(range(256))
    plan = cache.plan_captures(a, NS, (), 0)
    assert [c.pos for c in plan] == [64, 128, 192]  # < len: the last token is always computed
    _prefill(cache, a, plan)
    assert cache.match(a, NS).length == 192
    assert cache.match(a + [7], NS).length == 192  # 256 has no state


def test_states_per_path_caps_the_plan() -> None:
    cache = _cache(probe_interval=64, states_per_path=2)
    plan = cache.plan_captures(list(range(1000)), NS, (300,), 0)
    assert plan == [Capture(64, True), Capture(256, False)]  # the hint first, then probes up to the cap


def test_salts_and_mtp_are_namespaces() -> None:
    cache = _cache(probe_interval=64)
    a = list(range(300))
    _prefill(cache, a, cache.plan_captures(a, ("x", False), (), 0), ns=("x", False))
    assert cache.match(a, ("x", False)).length == 256
    assert cache.match(a, ("y", False)).length == 0
    assert cache.match(a, ("x", True)).length == 0
    assert cache.match(a, NS).length == 0


def test_a_block_a_sequence_uses_is_never_freed_and_leaves_go_first() -> None:
    cache = _cache(blocks=64, probe_interval=64)
    pool = cache.pool
    a = list(range(320))
    _prefill(cache, a, cache.plan_captures(a, NS, (), 0))  # 5 nodes x 4 blocks, states at 64..256
    assert cache.num_blocks == 16 and pool.free_blocks == 64 - 16  # the path to 256 (< len - 1 = 319)
    hit = cache.match(a, NS)
    pool.share(hit.blocks)  # a running sequence on the first 256 tokens
    cache.pin(hit, NS, a)
    assert cache.evict_blocks(100) == 0  # everything is in use (the pinned path)
    cache.unpin(a, NS, hit.length)
    pool.release_refs(hit.blocks)
    b = list(range(128)) + [900 + i for i in range(200)]
    hb = cache.match(b, NS)
    assert hb.length == 128
    pool.share(hb.blocks)
    freed = cache.evict_blocks(100)
    assert freed == 8  # the leaves past 128 (chunks ending at 192 and 256); the used ones stay
    assert cache.num_blocks == 8 and all(pool.refs(x) == 2 for x in hb.blocks)
    assert cache.match(a, NS).length == 128  # states deeper than the evicted KV went with it
    pool.release_refs(hb.blocks)
    assert cache.evict_blocks(100) == 8 and pool.free_blocks == 64 and cache.num_states == 0


def test_state_eviction_probes_first_pinned_never() -> None:
    cache = _cache(probe_interval=128, states_per_path=4)
    a = list(range(600))
    plan = cache.plan_captures(a, NS, (320,), 0)
    assert plan == [Capture(128, True), Capture(256, True), Capture(320, False), Capture(384, True)]
    _prefill(cache, a, plan[:2])  # the probes only
    hit = cache.match(a, NS)
    cache.pin(hit, NS, a)
    ids = {cache.evict_state()}
    assert ids == {0} or ids == {1}
    assert cache.evict_state() is None  # the other is pinned
    cache.unpin(a, NS, hit.length)
    assert cache.evict_state() is not None and cache.num_states == 0
    assert cache.pool.free_checkpoints == 8


def test_reset_drops_what_no_sequence_uses() -> None:
    cache = _cache(probe_interval=64)
    pool = cache.pool
    a = list(range(300))
    _prefill(cache, a, cache.plan_captures(a, NS, (), 0))
    hit = cache.match(a, NS)
    pool.share(hit.blocks[:4])  # a sequence uses the first chunk's blocks
    cache.reset()
    assert cache.num_states == 0 and pool.free_checkpoints == 8
    assert cache.num_blocks == 4  # the used chunk stays, as KV only
    pool.release_refs(hit.blocks[:4])
    cache.reset()
    assert cache.num_blocks == 0 and pool.free_blocks == 64
