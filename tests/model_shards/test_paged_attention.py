"""The paged (tiled online-softmax) attention against the eager oracle, and its chunking invariance.

Proves: prefill and decode over the paged pool equal the eager score-matrix attention (HF's eager
math) within fp32 round-off / bf16 tolerance on random shapes (GQA ratios, head dims, partial last
blocks, contexts crossing several query groups and key tiles, scattered block tables); a whole
mixer step over several sequences of uneven lengths (prefill chunks on cached context, decode rows,
verify rows) equals the same step with eager attention; NaN in blocks a sequence does not own (its
partial last block, table padding) never reaches its output; a prefill resumed at multiples of 64
gives the one-shot prefill's bits; a decode row's bits do not depend on the other rows in the step.
"""

from __future__ import annotations

import pytest
import torch

from model_shards import paged_attention as pa
from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.config import tiny
from model_shards.gated_attention import AttentionWeights, _decode_attention, _prefill_attention, attention_forward
from model_shards.rope import inv_frequencies, mrope_cos_sin

# Outputs are convex combinations of N(0, 1) values (O(1)). Online softmax vs one softmax differ by
# fp32 summation order: measured <= 1e-6, so 1e-5 catches any real bug (wrong key, head, mask: O(0.1)).
FP32_ATOL = 1e-5
# bf16: scores and probabilities rounded to bf16 at different points (per tile vs whole row): a few
# bf16 ulps of O(1) values (measured <= 0.016).
BF16_ATOL = 4e-2


def _tol(dtype: torch.dtype) -> float:
    return FP32_ATOL if dtype == torch.float32 else BF16_ATOL


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    d = (got.float() - want.float()).abs().max().item()
    assert d <= _tol(dtype), f"{what}: max |diff| {d:.3g} > {_tol(dtype):g}"


def _pool(gen: torch.Generator, blocks: int, bs: int, hkv: int, hd: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(blocks, bs, hkv, hd, generator=gen).to(dtype)


@pytest.fixture(params=["default-tiles", "small-tiles"])
def tiles(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the serving tile sizes and with small ones (many groups and key tiles on short inputs)."""
    if request.param == "small-tiles":
        monkeypatch.setattr(pa, "QUERY_TILE", 32)
        monkeypatch.setattr(pa, "KEY_TILE", 64)
    return request.param


# (context, new, block size, Hkv, G, head dim)
PREFILL_SHAPES = [
    (0, 150, 16, 2, 4, 64),  # tiny model's heads, partial last block
    (64, 86, 16, 2, 4, 64),  # resumed at 64
    (37, 300, 16, 1, 8, 32),  # MQA, unaligned context, several query groups
    (500, 60, 32, 4, 1, 16),  # MHA (G = 1), keys past one default key tile
    (700, 1, 16, 2, 4, 64),  # a one-token chunk on a long context
    (0, 1, 16, 2, 2, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "ctx{}-n{}-bs{}-kv{}-g{}-hd{}".format(*s))
def test_prefill_matches_eager(shape: tuple[int, ...], dtype: torch.dtype, tiles: str) -> None:
    ctx, n, bs, hkv, g, hd = shape
    gen = torch.Generator().manual_seed(sum(shape))
    nb = -(-(ctx + n) // bs)
    k_pool, v_pool = _pool(gen, nb + 7, bs, hkv, hd, dtype), _pool(gen, nb + 7, bs, hkv, hd, dtype)
    table = torch.randperm(nb + 7, generator=gen)[:nb]
    q = torch.randn(n, hkv * g, hd, generator=gen).to(dtype)
    kw = dict(table_N=table, context_len=ctx, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    _close(pa.prefill_attention(q, **kw), _prefill_attention(q, **kw), dtype, f"prefill {shape}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_ignores_non_finite_data_past_the_sequence(dtype: torch.dtype, tiles: str) -> None:
    """The partial last block's unused slots, and block 0 that pads the table, hold NaN / inf."""
    gen = torch.Generator().manual_seed(3)
    bs, hkv, hd, n = 16, 2, 64, 150
    k_pool, v_pool = _pool(gen, 20, bs, hkv, hd, dtype), _pool(gen, 20, bs, hkv, hd, dtype)
    table = torch.arange(5, 5 + 10)  # 160 slots for 150 keys
    q = torch.randn(n, 8, hd, generator=gen).to(dtype)
    kw = dict(table_N=table, context_len=0, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    want = _prefill_attention(q, **kw)
    k_pool[14, n % bs :], v_pool[14, n % bs :] = float("nan"), float("inf")
    k_pool[0], v_pool[0] = float("nan"), float("nan")
    got = pa.prefill_attention(q, **kw)
    assert torch.isfinite(got).all()
    _close(got, want, dtype, "prefill next to non-finite slots")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_rows_match_eager_and_do_not_depend_on_the_batch(dtype: torch.dtype, tiles: str) -> None:
    """Rows with key counts 2 .. 700 (uneven, tables scattered and padded with a NaN block 0):
    each equals the eager oracle, and a row run alone gives the same bits as inside the batch."""
    gen = torch.Generator().manual_seed(4)
    bs, hkv, g, hd = 16, 2, 4, 64
    counts = [700, 7, 512, 33, 2, 300]
    nbs = [-(-c // bs) for c in counts]
    k_pool, v_pool = _pool(gen, sum(nbs) + 1, bs, hkv, hd, dtype), _pool(gen, sum(nbs) + 1, bs, hkv, hd, dtype)
    k_pool[0], v_pool[0] = float("nan"), float("nan")
    perm = (1 + torch.randperm(sum(nbs), generator=gen)).tolist()
    seqs, used = [], 0
    for c, nb in zip(counts, nbs):
        seqs.append(SeqChunk((0,), c - 1, 0, tuple(perm[used : used + nb])))
        used += nb
    batch = StepBatch.build(seqs, block_size=bs)
    q = torch.randn(len(counts), hkv * g, hd, generator=gen).to(dtype)
    plan = pa.decode_plan(batch.block_tables_BN, counts, block_size=bs)
    got = pa.decode_attention(q, plan=plan, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    want = _decode_attention(q, batch=batch, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    _close(got, want, dtype, "decode rows")
    for r, c in enumerate(counts):
        alone = pa.decode_plan(batch.block_tables_BN[r : r + 1], [c], block_size=bs)
        one = pa.decode_attention(q[r : r + 1], plan=alone, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
        assert torch.equal(one[0], got[r]), f"row with {c} keys: alone != in the batch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fixed_width_decode_gives_each_row_the_bits_of_the_sorted_plan(dtype: torch.dtype, tiles: str) -> None:
    """The CUDA-graph plan (every row reads the same key tiles, key counts on the device, rows unsorted), two more
    tiles than the longest row needs, a padding row of one key and stale NaN blocks past every row's keys: each
    real row equals `decode_attention`'s bit for bit (fully masked tiles leave a row's softmax state unchanged)."""
    gen = torch.Generator().manual_seed(5)
    bs, hkv, g, hd = 16, 2, 4, 64
    counts = [7, 700, 33, 1]  # the last: a padding row (its one key in a block of its own)
    kt = pa.key_tile(bs)
    tiles_n = -(-max(counts) // kt) + 2
    per_tile = kt // bs
    blocks = sum(-(-c // bs) for c in counts) + 2
    k_pool, v_pool = _pool(gen, blocks, bs, hkv, hd, dtype), _pool(gen, blocks, bs, hkv, hd, dtype)
    k_pool[0], v_pool[0] = float("nan"), float("nan")  # block 0: stale entries past each row's keys
    table = torch.zeros(len(counts), tiles_n * per_tile, dtype=torch.long)
    used = 1
    for r, c in enumerate(counts):
        nb = -(-c // bs)
        table[r, :nb] = torch.arange(used, used + nb)
        used += nb
    q = torch.randn(len(counts), hkv * g, hd, generator=gen).to(dtype)
    got = pa.fixed_decode_attention(
        q,
        tables_RN=table,
        key_counts_R=torch.tensor(counts),
        tiles=tiles_n,
        k_pool=k_pool,
        v_pool=v_pool,
        scale=hd**-0.5,
    )
    assert torch.isfinite(got).all()
    plan = pa.decode_plan(table[:3], counts[:3], block_size=bs)
    want = pa.decode_attention(q[:3], plan=plan, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    for r in range(3):
        assert torch.equal(got[r], want[r]), f"row with {counts[r]} keys"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [(64,), (128, 192), (64, 128, 256)], ids=lambda s: "+".join(map(str, s)))
def test_prefill_resumed_at_multiples_of_64_is_bit_identical(
    dtype: torch.dtype, splits: tuple[int, ...], tiles: str
) -> None:
    """A 300-token prompt prefilled at once vs in chunks cut at `splits` (each chunk's keys are
    written to the pool before it attends, as the mixer does): the same output bits."""
    gen = torch.Generator().manual_seed(5)
    bs, hkv, g, hd, n = 16, 2, 4, 64, 300
    nb = -(-n // bs)
    table = torch.randperm(nb + 3, generator=gen)[:nb]
    keys, values = torch.randn(n, hkv, hd, generator=gen).to(dtype), torch.randn(n, hkv, hd, generator=gen).to(dtype)
    q = torch.randn(n, hkv * g, hd, generator=gen).to(dtype)
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(n)])

    def run(cuts: tuple[int, ...]) -> torch.Tensor:
        k_pool = torch.full((nb + 3, bs, hkv, hd), float("nan"), dtype=dtype)  # nothing stale may leak in
        v_pool = torch.full((nb + 3, bs, hkv, hd), float("nan"), dtype=dtype)
        outs, bounds = [], (0, *cuts, n)
        for lo, hi in zip(bounds, bounds[1:]):
            k_pool.view(-1, hkv, hd)[slots[lo:hi]] = keys[lo:hi]
            v_pool.view(-1, hkv, hd)[slots[lo:hi]] = values[lo:hi]
            outs.append(
                pa.prefill_attention(
                    q[lo:hi], table_N=table, context_len=lo, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5
                )
            )
        return torch.cat(outs)

    whole, chunked = run(()), run(splits)
    assert torch.isfinite(whole).all()
    d = (whole.float() - chunked.float()).abs().max().item()
    assert torch.equal(whole, chunked), f"split at {splits}: max |diff| {d:.3g}"


# ------------------------------------------------------------------ the whole mixer, both back-ends
def _weights(dtype: torch.dtype) -> AttentionWeights:
    cfg = tiny()
    gen = torch.Generator().manual_seed(6)
    d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    return AttentionWeights(
        q_proj=randn(h * 2 * hd, d, scale=d**-0.5),
        k_proj=randn(hkv * hd, d, scale=d**-0.5),
        v_proj=randn(hkv * hd, d, scale=d**-0.5),
        o_proj=randn(d, h * hd, scale=(h * hd) ** -0.5),
        q_norm=randn(hd, scale=0.3),
        k_norm=randn(hd, scale=0.3),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixer_step_over_uneven_sequences_matches_eager(dtype: torch.dtype) -> None:
    """Contexts prefilled, then one step mixing fresh prefills, resumed chunks, decode rows and a
    verify sequence, then two decode steps: paged and eager back-ends agree on outputs and caches."""
    cfg = tiny()
    w = _weights(dtype)
    bs, layer = 16, 3
    inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    # (context, new, verify)
    plan = [(0, 150, False), (64, 86, False), (300, 1, False), (5, 1, False), (37, 30, False), (90, 3, True)]
    gen = torch.Generator().manual_seed(7)
    total = [c + n + 2 for c, n, _ in plan]
    x = [torch.randn(t, cfg.hidden_size, generator=gen).to(dtype) for t in total]
    nbs = [-(-t // bs) for t in total]
    perm = torch.randperm(sum(nbs) + 2, generator=gen).tolist()
    tables, used = [], 0
    for nb in nbs:
        tables.append(tuple(perm[used : used + nb]))
        used += nb

    def step(pools: CachePools, parts: list[tuple[int, int, int, bool]], impl: str) -> torch.Tensor:
        chunks = [SeqChunk(tuple(range(hi - lo)), lo, i, tables[i], verify=v) for i, lo, hi, v in parts]
        batch = StepBatch.build(chunks, block_size=bs)
        cos, sin = mrope_cos_sin(batch.positions_3T, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=dtype)
        xs = torch.cat([x[i][lo:hi] for i, lo, hi, _ in parts])
        k_pool, v_pool = pools.kv(layer)
        return attention_forward(
            xs, w=w, cfg=cfg, batch=batch, cos=cos, sin=sin, k_pool=k_pool, v_pool=v_pool, impl=impl
        )

    results = {}
    for impl in ("paged", "eager"):
        pools = CachePools.allocate(cfg, num_blocks=sum(nbs) + 2, block_size=bs, num_slots=len(plan), dtype=dtype)
        pools.k.fill_(float("nan"))
        pools.v.fill_(float("nan"))
        outs = [step(pools, [(i, 0, c, False) for i, (c, _, _) in enumerate(plan) if c > 0], impl)]
        outs.append(step(pools, [(i, c, c + n, v) for i, (c, n, v) in enumerate(plan)], impl))
        for j in range(2):
            outs.append(step(pools, [(i, c + n + j, c + n + j + 1, False) for i, (c, n, _) in enumerate(plan)], impl))
        results[impl] = outs
    for j, (got, want) in enumerate(zip(results["paged"], results["eager"])):
        assert torch.isfinite(got).all()
        _close(got, want, dtype, f"step {j}")
