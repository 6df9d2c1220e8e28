"""The prefix cache (replicas/engine/prefix_cache.py, its use in the scheduler and engine).

Unit tests of one rank's tree against known answers: admission positions (probes on a new path, the branch point,
hints rounded down to 64, the per-path cap, hits at most prompt_len - 1), eviction order (KV-only leaves first,
states deeper than evicted KV go, probes before claimed states), reference counts (a block a sequence uses is never
freed), salts and the mtp flag as namespaces, reset.
End to end with the Engine over the single-process LocalRunner (fp32 embedded model): the oracle is the same engine
with the cache off (every prompt prefilled from token 0, itself equal to transformers: test_offline_generate.py):
greedy tokens equal and logprobs within 1e-4 for shared system prompts, branches, prompts shorter than 64, requests
at once, n = 2, speculative decoding, repetition / presence / frequency penalties, multi-turn chat rendered with the
real template (cached tokens >= the previous turn's last assistant header, rounded down to 64), salts (no cross-salt
hit), a tiny cache budget (evictions and preemptions); the saved states and shared KV blocks are bit-identical
before and after sequences that hit them ran. A D = 2 x X = 2 expert-parallel group (slow): cached equals uncached,
hits on the rank holding the prefix.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from model_shards.sampling import SamplingParams
from replicas.engine.block_pool import BlockPool
from replicas.engine.engine_types import GenerateRequest
from replicas.engine.prefix_cache import GRID, Capture, PrefixCache
from replicas.engine.prefix_config import PrefixCacheConfig

pytestmark = pytest.mark.timeout(300)

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


def test_a_chat_path_keeps_its_newest_states_within_the_cap() -> None:
    cache = _cache(blocks=128, probe_interval=0, states_per_path=2)
    convo = list(range(1000))
    starts = []
    for turn_end in (300, 500, 700, 900):  # each turn's prompt extends the last; the hint: its last header
        key = convo[:turn_end]
        hit = cache.match(key, NS)
        starts.append(hit.length)
        _prefill(cache, key, cache.plan_captures(key, NS, (turn_end - 10,), hit.length))
        assert cache.num_states <= 2
    assert starts == [0, 256, 448, 640]  # each turn resumes at the previous turn's header (rounded down to 64)


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


def test_an_mtp_hit_needs_the_same_next_token() -> None:
    """The MTP layer's KV row at p - 1 was computed with the saving prompt's token p: in an MTP namespace a prompt
    that differs exactly at p resumes at an earlier state (its drafts would differ from an uncached run's), while a
    plain namespace resumes at p whatever comes next."""
    for mtp in (True, False):
        ns = ("", mtp)
        cache = _cache(probe_interval=64)
        a = list(range(300))
        _prefill(cache, a, cache.plan_captures(a, ns, (), 0), ns=ns)
        b = a[:128] + [9999] + a[129:]  # differs at 128, a state position
        assert cache.match(a, ns).length == 256
        assert cache.match(b, ns).length == (64 if mtp else 128)


def test_a_block_a_sequence_uses_is_never_freed_and_leaves_go_first() -> None:
    cache = _cache(blocks=64, probe_interval=64)
    pool = cache.pool
    a = list(range(320))
    _prefill(cache, a, cache.plan_captures(a, NS, (), 0))  # 5 nodes x 4 blocks, states at 64..256
    assert cache.num_blocks == 16 and pool.free_blocks == 64 - 16  # the path to 256 (< len - 1 = 319)
    assert pool.available_blocks == 64  # held by the cache alone: free for new work (evicted on demand)
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
    assert pool.available_blocks == 64 - 8  # the 8 blocks the sequence uses
    assert cache.num_blocks == 8 and all(pool.refs(x) == 2 for x in hb.blocks)
    assert cache.match(a, NS).length == 128  # states deeper than the evicted KV went with it
    assert cache._leaves == {n for n in cache._nodes() if not n.children}  # the eviction candidates kept up to date
    pool.release_refs(hb.blocks)
    assert cache.evict_blocks(100) == 8 and pool.free_blocks == 64 and cache.num_states == 0


def test_state_eviction_probes_first_pinned_never() -> None:
    cache = _cache(blocks=128, probe_interval=128, states_per_path=4)
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
    # a probe may replace a probe, never a state a hint or branch claimed
    _prefill(cache, a, [plan[2]])
    assert cache.evict_state(provisional_only=True) is None and cache.num_states == 1
    assert cache.evict_state() is not None


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


# ----------------------------------------------------------------------------------------------------------------
# End to end: the Engine over the single-process LocalRunner (fp32 embedded model), cached vs uncached. The oracle
# is the same engine with the prefix cache off (every prompt prefilled from token 0), whose tokens and logprobs
# equal transformers' (tests/replicas/test_offline_generate.py).


class _CountingKey(tuple):
    """A prompt key that counts the chunks read from it (the work of a walk)."""

    reads = 0

    def __getitem__(self, i):  # noqa: ANN001, ANN204  # tuple's signature
        if isinstance(i, slice):
            type(self).reads += 1
        return super().__getitem__(i)


def _tree(cache: PrefixCache) -> set[tuple]:
    """The tree as data: per node, its path of chunk ends and keys, blocks, state."""
    out = set()
    for node in cache._nodes():
        path, up = [], node
        while up is not None and up.parent is not None:
            path.append(up.key)
            up = up.parent
        out.add((node.end, tuple(path), tuple(node.blocks), node.checkpoint, node.provisional))
    return out


def _adopt(cache: PrefixCache, key: tuple, blocks: list[int], upto: int, *, walk: bool, capture: int = 0) -> None:
    """The scheduler's adoption after a chunk (a capture at `capture` first, if any); `walk`: as a walk from the
    root would (every cursor dropped before each call)."""
    if capture:
        if walk:
            cache._cursors.clear()
        ckpt = cache.pool.take_checkpoint()
        assert ckpt is not None
        cache.captured(key, NS, blocks, capture, ckpt, provisional=False)
    if walk:
        cache._cursors.clear()
    cache.insert(key, NS, blocks, upto)


def test_incremental_insert_builds_the_tree_a_walk_from_the_root_builds() -> None:
    """A long prompt adopted chunk by chunk (captures on the way, an n = 2 twin, another prompt branching from it,
    evictions and a reset in between, a recompute) gives the same tree as the same calls each made with a walk
    from the root (every cursor dropped before each call); and its prefill reads each chunk of its key once, not
    once per later chunk."""
    n = 64 * 200 + 30  # 12,830 tokens
    a = list(range(1, n + 1))
    b = a[: 64 * 120] + [90_000 + i for i in range(64 * 50)]
    trees: list[list[set[tuple]]] = []  # per run: the tree after each phase
    for walk in (False, True):
        trees.append([])
        cache = _cache(blocks=4096, checkpoints=16)
        pool = cache.pool
        key_a, key_a2, key_b = _CountingKey(a), _CountingKey(a), _CountingKey(b)
        held = {id(x): pool.take_blocks(pool.blocks_for(len(x))) for x in (key_a, key_a2, key_b)}
        _CountingKey.reads = 0
        for end in range(64 * 3, 64 * 100, 64 * 3):  # prefill chunks of 192 tokens, a and its n = 2 twin alike
            capture = end if end % (64 * 30) == 0 else 0
            _adopt(cache, key_a, held[id(key_a)], end, walk=walk, capture=capture)
            _adopt(cache, key_a2, held[id(key_a2)], end, walk=walk)
        if not walk:
            assert _CountingKey.reads <= 2 * 100, "each chunk of each key read once"
        for end in range(512, 64 * 150 + 1, 512):
            _adopt(cache, key_b, held[id(key_b)], end, walk=walk)
        pool.release(slot=None, blocks=held.pop(id(key_b)))  # b preempted: its own chunks are the tree's alone
        assert cache.evict_blocks(64) >= 64  # b's tail: nodes leave (where b's cursor is), every cursor is stale
        held[id(key_b)] = pool.take_blocks(pool.blocks_for(len(b)))  # b recomputes and goes on to its end
        for end in range(64 * 150, 64 * 170, 64 * 4):
            _adopt(cache, key_b, held[id(key_b)], end, walk=walk)
        trees[-1].append(_tree(cache))
        pool.release(slot=None, blocks=held.pop(id(key_b)))  # b finished
        for end in range(64 * 100, n, 64 * 7):  # a goes on (a walk from the root once, then its cursor)
            _adopt(cache, key_a, held[id(key_a)], end, walk=walk)
        trees[-1].append(_tree(cache))
        cache.reset()  # what no sequence uses goes (the rest of b's branch)
        for end in range(64, 64 * 40, 64 * 5):  # a recompute after a preemption adopts its path again
            _adopt(cache, key_a, held[id(key_a)], end, walk=walk)
        _adopt(cache, key_a, held[id(key_a)], ((n - 1) // 64) * 64, walk=walk)
        assert id(key_a) not in cache._cursors, "a key adopted to its end leaves no cursor"
        trees[-1].append(_tree(cache))
    for phase, (got, want) in enumerate(zip(*trees, strict=True)):
        assert got == want, f"phase {phase}"
    assert len(trees[0][-1]) == (n - 1) // 64  # a's whole path, b's branch gone


BLOCK = 16
MAX_TOKENS = 5
GREEDY = SamplingParams(temperature=0.0, logprobs=0)


def _ids(seed: int, n: int) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1000, 150_000) for _ in range(n)]


@pytest.fixture(scope="module")
def model(one_thread_mtp_model):  # noqa: ANN001, ANN201  # LocalModel (tests/conftest.py)
    return one_thread_mtp_model


class Out(NamedTuple):
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    cached: int


def _serve(  # noqa: ANN202  # whatever body returns
    model,  # noqa: ANN001  # LocalModel
    body,  # noqa: ANN001  # async (Engine, LocalRunner) -> T
    *,
    cache: PrefixCacheConfig | None,
    blocks: int = 160,
    slots: int = 4,
    checkpoints: int = 8,
    budget: int = 512,
    spec_tokens: int = 0,
):
    """Run `await body(engine, runner)` on a started Engine over a fresh LocalRunner (built in the loop that runs
    it, as the engine's events belong to that loop); returns what body returns."""
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner
    from replicas.ep.offline_generate import engine_pools

    sizes = CacheSizes(
        num_blocks=blocks,
        block_size=BLOCK,
        num_slots=slots,
        spec_tokens=spec_tokens,
        state_checkpoints=checkpoints if cache is not None else 0,
    )
    runner = LocalRunner(model, sizes)

    async def main():  # noqa: ANN202
        engine = Engine(
            runner,
            pools=engine_pools(sizes, 1),
            config=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=budget, lookahead=2 * spec_tokens),
            max_waiting=256,
            spec_tokens=spec_tokens,
            vocab_size=model.cfg.vocab_size,
            prefix_cache=cache,
        )
        engine.start()
        try:
            return await body(engine, runner)
        finally:
            await engine.stop()

    try:
        return asyncio.run(main())
    finally:
        runner.close()


async def _one(engine, req: GenerateRequest) -> list[Out]:  # noqa: ANN001
    tokens: dict[int, list[int]] = {}
    lps: dict[int, list[float]] = {}
    cached = 0
    async for item in engine.generate(req):
        cached = item.cached_tokens
        for o in item.outputs:
            assert o.error is None, o.error
            tokens.setdefault(o.index, []).extend(o.token_ids)
            lps.setdefault(o.index, []).extend(lp.logprob for lp in o.logprobs)
    return [Out(tuple(tokens[i]), tuple(lps[i]), cached) for i in sorted(tokens)]


async def _in_turn(engine, reqs: list[GenerateRequest]) -> list[list[Out]]:  # noqa: ANN001
    return [await _one(engine, r) for r in reqs]


async def _at_once(engine, reqs: list[GenerateRequest]) -> list[list[Out]]:  # noqa: ANN001
    return list(await asyncio.gather(*(_one(engine, r) for r in reqs)))


def _req(rid: str, prompt: list[int], **kw: object) -> GenerateRequest:
    return GenerateRequest(rid, tuple(prompt), GREEDY, max_tokens=MAX_TOKENS, **kw)  # type: ignore[arg-type]  # test kwargs


def _assert_same(got: list[list[Out]], want: list[list[Out]]) -> None:
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g, w, strict=True):
            assert gc.tokens == wc.tokens
            torch.testing.assert_close(list(gc.logprobs), list(wc.logprobs), atol=1e-4, rtol=0)


def _uncached(model, reqs: list[GenerateRequest]) -> list[list[Out]]:  # noqa: ANN001
    return _serve(model, lambda engine, _: _in_turn(engine, reqs), cache=None)


SYSTEM = _ids(0, 150)
PROMPTS = [
    SYSTEM + _ids(1, 30),  # a new path: probes at 64 and 128
    SYSTEM + _ids(2, 40),  # leaves it at 128 (the chunk [128, 192) differs): hits the probe at 128
    SYSTEM + _ids(3, 25),
    _ids(4, 40),  # shorter than one chunk: never cached
    SYSTEM[:100] + _ids(5, 60),  # branches inside the system prompt: hits 64, saves the branch point
    SYSTEM + _ids(1, 30),  # a repeat of the first
    SYSTEM[:100] + _ids(6, 30),  # resumes at the branch point
]


def test_shared_system_prompt_branches_and_short_prompts_equal_uncached(model) -> None:  # noqa: ANN001
    reqs = [_req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    want = _uncached(model, reqs)

    async def body(engine, runner) -> None:  # noqa: ANN001
        got = await _in_turn(engine, reqs)
        _assert_same(got, want)
        cached = [o[0].cached for o in got]
        # r1 claims the probe at 128 (where it leaves r0's path; the probe at 64 goes), r4 branches at 64 from
        # scratch and saves it, r6 resumes there
        assert cached == [0, 128, 128, 0, 0, 128, 64]
        stats = engine.stats()
        assert stats["prefix_cache_hits"] == sum(cached)
        assert stats["prefix_cache_queries"] == sum(len(p) for p in PROMPTS)
        assert stats["prefix_cache_states"] >= 2 and stats["prefix_cache_states_stored"] >= 3
        # again, all at once (captures and hits within the same steps), then n = 2
        again = await _at_once(engine, reqs)
        _assert_same(again, want)
        assert all(o[0].cached > 0 for o, p in zip(again, PROMPTS) if len(p) > 64)
        two = await _one(engine, _req("n2", PROMPTS[2], n=2))
        assert two[0].tokens == two[1].tokens == want[2][0].tokens and two[0].cached == 128
        # nothing leaks: the blocks only the cache holds count as free; after a reset the pool has them all back
        assert engine.pool_state()[0]["free_blocks"] == 160 and engine.stats()["prefix_cache_blocks"] > 0
        assert engine.reset_prefix_cache()
        pool = engine.scheduler.pools[0]
        assert engine.stats()["prefix_cache_blocks"] == 0 and pool.free_blocks == pool.num_blocks
        assert pool.free_checkpoints == pool.num_checkpoints

    _serve(model, body, cache=PrefixCacheConfig(probe_interval=64))


def test_salts_are_apart(model) -> None:  # noqa: ANN001
    p = PROMPTS[0]
    reqs = [_req("a1", p, cache_salt="a"), _req("b1", p, cache_salt="b"), _req("a2", p, cache_salt="a"), _req("n", p)]
    want = _uncached(model, reqs)
    got = _serve(model, lambda engine, _: _in_turn(engine, reqs), cache=PrefixCacheConfig(probe_interval=64))
    _assert_same(got, want)
    assert [o[0].cached for o in got] == [0, 0, 128, 0]


def test_eviction_under_a_tiny_budget_never_changes_tokens(model) -> None:  # noqa: ANN001
    # 30 blocks of 16 = 480 tokens for 3 slots, 2 checkpoints: blocks and states are evicted all the time,
    # concurrently running sequences preempt each other
    reqs = [_req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    want = _uncached(model, reqs)

    async def body(engine, runner) -> None:  # noqa: ANN001
        _assert_same(await _in_turn(engine, reqs), want)
        _assert_same(await _at_once(engine, reqs), want)
        stats = engine.stats()
        assert stats["prefix_cache_states_evicted"] > 0 and stats["prefix_cache_hits"] > 0
        pool = engine.scheduler.pools[0]
        engine.reset_prefix_cache()
        assert pool.free_blocks == pool.num_blocks and pool.free_checkpoints == pool.num_checkpoints

    _serve(model, body, cache=PrefixCacheConfig(probe_interval=64), blocks=30, slots=3, checkpoints=2)


def test_cached_state_and_shared_blocks_are_never_written(model) -> None:  # noqa: ANN001
    async def body(engine, runner) -> None:  # noqa: ANN001
        cache = engine.prefix_caches[0]
        first = await _one(engine, _req("a", PROMPTS[0]))
        nodes = cache._nodes()
        ckpts = sorted(n.checkpoint for n in nodes if n.checkpoint is not None)
        blocks = sorted(b for n in nodes for b in n.blocks)
        pools = runner.pools
        assert ckpts and blocks
        before = [t.clone() for t in (pools.ckpt_conv[:, ckpts], pools.ckpt_recurrent[:, ckpts])]
        before += [t.clone() for t in (pools.k[:, blocks], pools.v[:, blocks])]
        rest = await _in_turn(engine, [_req("b", PROMPTS[1]), _req("c", PROMPTS[5])])
        assert [o[0].cached for o in [first, *rest]] == [0, 128, 128]
        after = [pools.ckpt_conv[:, ckpts], pools.ckpt_recurrent[:, ckpts], pools.k[:, blocks], pools.v[:, blocks]]
        for b, a in zip(before, after):
            assert torch.equal(b, a)

    _serve(model, body, cache=PrefixCacheConfig(probe_interval=64))


def test_speculative_decoding_with_hits_equals_plain(model) -> None:  # noqa: ANN001
    reqs = [_req(f"r{i}", PROMPTS[i]) for i in (0, 1, 2, 5)]
    want = _uncached(model, reqs)
    got = _serve(
        model,
        lambda engine, _: _in_turn(engine, reqs),
        cache=PrefixCacheConfig(probe_interval=64),
        spec_tokens=2,
    )
    _assert_same(got, want)
    assert [o[0].cached for o in got] == [0, 128, 128, 128]


# Penalised requests: a repetition penalty below 1 favours every token of the prompt strongly, so greedy tokens come
# from the prompt, many from its cached part only: a rank whose history lacked the cached prompt ids would differ.
PENALISED = [
    SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=0.05),
    SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=0.05, presence_penalty=0.4, frequency_penalty=0.3),
    SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
]


def test_penalised_requests_with_hits_equal_uncached(model) -> None:  # noqa: ANN001
    """Requests with repetition / presence / frequency penalties are cached (a restoring rank gets the cached
    prompt's ids for its penalty history: SeqStart.prefix_ids) and give the uncached run's tokens."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[5]]  # r1 and r2 resume at 128 (r0's path)
    reqs = [
        GenerateRequest(f"p{i}", tuple(p), prm, max_tokens=MAX_TOKENS)
        for i, (p, prm) in enumerate(zip(prompts, PENALISED))
    ]
    want = _uncached(model, reqs)
    got = _serve(model, lambda engine, _: _in_turn(engine, reqs), cache=PrefixCacheConfig(probe_interval=64))
    _assert_same(got, want)
    assert [o[0].cached for o in got] == [0, 128, 128]
    # the cached part of the prompt decides tokens: some come from it and not from the part the rank computed
    from_prefix = [t for (o,), p in zip(got[1:], prompts[1:]) for t in o.tokens if t in p[:128] and t not in p[128:]]
    assert from_prefix, "the test's prompts were meant to make the cached prompt matter to the penalty"


def _chat(model, tokenizer, *, cache: PrefixCacheConfig | None, turns: int) -> list[tuple[list[int], Out]]:  # noqa: ANN001
    """A conversation rendered with the real chat template, each turn's reply (decoded) fed into the next turn;
    the cache hints as the front end computes them: the end of the system preamble, the last assistant header."""
    from model_shards.chat_template import ChatTemplate
    from model_shards.tokenizer_files import chat_template_text

    template = ChatTemplate(chat_template_text())
    im_start = tokenizer.token_to_id("<|im_start|>")
    system = " ".join(f"Rule {i}: answer briefly and cite source {i * 7}." for i in range(24))

    async def body(engine, _runner) -> list[tuple[list[int], Out]]:  # noqa: ANN001
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        out = []
        for t in range(turns):
            messages.append({"role": "user", "content": f"Question {t}: what does rule {t * 3} say about sources?"})
            ids = tokenizer.encode(template.render(messages))
            heads = [i for i, x in enumerate(ids) if x == im_start]
            req = GenerateRequest(f"t{t}", tuple(ids), GREEDY, max_tokens=8, cache_hints=(heads[1], heads[-1]))
            res = (await _one(engine, req))[0]
            out.append((ids, res))
            messages.append({"role": "assistant", "content": tokenizer.decode(res.tokens, skip_special_tokens=True)})
        return out

    return _serve(model, body, cache=cache)


def test_multi_turn_chat_resumes_at_the_previous_assistant_header(model, embedded_model_dir: Path) -> None:  # noqa: ANN001
    from model_shards.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(embedded_model_dir)
    want = _chat(model, tokenizer, cache=None, turns=4)
    got = _chat(model, tokenizer, cache=PrefixCacheConfig(), turns=4)
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert len(want[0][0]) > 300  # a system preamble of several chunks
    for t, ((ids, g), (want_ids, w)) in enumerate(zip(got, want)):
        assert ids == want_ids and g.tokens == w.tokens
        torch.testing.assert_close(list(g.logprobs), list(w.logprobs), atol=1e-4, rtol=0)
        if t:
            prev = got[t - 1][0]
            header = max(i for i, x in enumerate(prev) if x == im_start)
            assert g.cached >= header // GRID * GRID > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_expert_parallel_group_d2_x2_cached_equals_uncached(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    """D = 2 trunk ranks x X = 2 expert ranks: the engine places each sequence on the trunk rank holding its longest
    cached prefix (the other rank's tree is empty of it, so any hit proves the placement); tokens and logprobs equal
    the same group's engine with the cache off."""
    from cluster.topology import GroupShape
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig
    from replicas.ep.offline_generate import engine_pools

    r = random.Random(7)
    system = [r.randrange(0, 1024) for _ in range(150)]
    prompts = [system + [r.randrange(0, 1024) for _ in range(20 + 5 * i)] for i in range(4)]
    prompts.append(system[:100] + [r.randrange(0, 1024) for _ in range(30)])
    reqs = [_req(f"r{i}", p) for i, p in enumerate(prompts)]
    sizes = CacheSizes(num_blocks=128, block_size=BLOCK, num_slots=8, state_checkpoints=8)
    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(hf_checkpoint), shape=GroupShape(2, 2), dtype="float32", deadline_s=20.0, caches=sizes
        )
    )
    group.start()

    async def run(cache: PrefixCacheConfig | None) -> tuple[list[list[Out]], list[list[Out]]]:
        engine = Engine(
            group,
            pools=engine_pools(group.caches, 2),
            config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
            max_waiting=64,
            prefix_cache=cache,
        )
        engine.start()
        try:
            return await _in_turn(engine, reqs), await _at_once(engine, reqs)
        finally:
            await engine.stop()

    try:
        want, want_at_once = asyncio.run(run(None))
        got, got_at_once = asyncio.run(run(PrefixCacheConfig(probe_interval=64)))
    finally:
        group.shutdown()
    _assert_same(want_at_once, want)
    _assert_same(got, want)
    _assert_same(got_at_once, want)
    assert [o[0].cached for o in got] == [0, 128, 128, 128, 0]  # r4 branches at 64 (the probe there went)
    assert all(o[0].cached > 0 for o in got_at_once)  # all on the rank that holds the system prompt (room for all)
