"""Each speed path of the model against the plain path it replaces, bit for bit (fp32 and bf16).

Proves: the decode conv (multiply-adds over the taps) equals F.conv1d's newest position; the
stacked trunk GEMMs the loader builds (q|k|v, in_proj_qkv|z, router|shared gate|up) equal one
GEMM per weight and share the per-weight tensors' memory; the chunked delta rule's underflow
shortcut equals exp of the masked matrix; the one-token recurrent step equals the token loop;
prefill sequences batched by chunk count equal each sequence run alone; a decode step on
consecutive state slots (updated through pool views) equals the same step on scattered slots;
`StepBatch.build` packs what it did before it built index lists in Python.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.config import tiny
from model_shards.delta_rule import _exp_lower, recurrent_gated_delta_rule
from model_shards.gated_deltanet import DeltaNetWeights, _chunk_group, _conv_silu, _conv_silu_last, deltanet_forward
from model_shards.model import LocalModel
from model_shards.quant import linear

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
BLOCK = 16


def _equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    d = (got.float() - want.float()).abs()
    assert torch.equal(got, want), f"{what} not bit-identical: max |diff| {d.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,c", [(1, 384), (8, 512), (32, 1536), (3, 100)], ids=lambda v: str(v))
def test_decode_conv_equals_conv1d_last_position(dtype: torch.dtype, b: int, c: int) -> None:
    gen = torch.Generator().manual_seed(b * c)
    window = torch.randn(b, c, 4, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(c, 4, generator=gen)).to(dtype)
    want = _conv_silu(window, weight, dtype)[:, :, -1]
    got = _conv_silu_last(window, weight.float().unbind(1), weight.dtype, dtype)
    _equal(got, want, "decode conv")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stacked_trunk_gemms_equal_one_gemm_per_weight(dtype: str, hf_checkpoint: Path) -> None:
    model = LocalModel.load(hf_checkpoint, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    for lw in model.trunk.w.layers[:4]:  # three DeltaNet layers and one attention layer
        mixer = lw.mixer
        if isinstance(mixer, DeltaNetWeights):
            stacked, parts = mixer.in_proj_qkvz, [mixer.in_proj_qkv, mixer.in_proj_z]
        else:
            stacked, parts = mixer.qkv_proj, [mixer.q_proj, mixer.k_proj, mixer.v_proj]
        groups = [
            (stacked, parts),
            (lw.moe.router_gate_up, [lw.moe.router, lw.moe.shared_gate_proj, lw.moe.shared_up_proj]),
        ]
        for stacked, parts in groups:
            assert stacked is not None
            assert all(p.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr() for p in parts)
            for rows in (1, 7, 64, 150):
                x = torch.randn(rows, stacked.shape[1], generator=gen).to(stacked.dtype)
                got = linear(x, stacked).split([p.shape[0] for p in parts], dim=-1)
                for g, p in zip(got, parts):
                    _equal(g, F.linear(x, p), f"stacked GEMM part [{p.shape[0]}] of {rows} rows")


def test_exp_lower_equals_masked_exp() -> None:
    gen = torch.Generator().manual_seed(1)
    # values across normal, subnormal-result (-87 .. -104) and underflow (< -104) ranges
    x = -torch.rand(3, 64, 64, generator=gen) * 400.0
    x[0, 5, 3], x[0, 6, 3], x[0, 7, 3] = -103.97, -104.0, -104.01
    upper = torch.ones(64, 64, dtype=torch.bool).triu(1)
    want = x.masked_fill(upper, float("-inf")).exp()
    _equal(_exp_lower(x.clone(), upper), want, "exp below the diagonal")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_token_recurrent_step_equals_token_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    b, hk, h, k, v = 3, 2, 8, 32, 48
    args = dict(
        k_BTHK=torch.randn(b, 1, hk, k, generator=gen).to(dtype),
        v_BTHV=torch.randn(b, 1, h, v, generator=gen).to(dtype),
        g_BTH=-0.1 * torch.rand(b, 1, h, generator=gen),
        beta_BTH=torch.rand(b, 1, h, generator=gen).to(dtype),
        state_BHKV=torch.randn(b, h, k, v, generator=gen),
    )
    q = torch.randn(b, 1, hk, k, generator=gen).to(dtype)
    out, state = recurrent_gated_delta_rule(q, **args)
    loop_out, loop_states = recurrent_gated_delta_rule(q, keep_states=True, **args)  # the token loop
    _equal(out, loop_out, "one-token output")
    _equal(state, loop_states[:, 0], "one-token state")


def _deltanet_setup(dtype: torch.dtype, num_slots: int) -> tuple:
    cfg = tiny()
    g = torch.Generator().manual_seed(3)
    d, h, hv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_dim

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    w = DeltaNetWeights(
        in_proj_qkv=randn(cfg.linear_conv_dim, d, scale=d**-0.5),
        in_proj_z=randn(hv, d, scale=d**-0.5),
        in_proj_b=randn(h, d, scale=d**-0.5),
        in_proj_a=randn(h, d, scale=d**-0.5),
        conv1d=randn(cfg.linear_conv_dim, cfg.linear_conv_kernel_dim, scale=0.5),
        dt_bias=randn(h, scale=0.3),
        A_log=torch.log(0.01 + 1.99 * torch.rand(h, generator=g)).to(dtype),
        norm=(1 + 0.3 * torch.randn(cfg.linear_value_head_dim, generator=g)).to(dtype),
        out_proj=randn(d, hv, scale=hv**-0.5),
    )
    pools = CachePools.allocate(cfg, num_blocks=64, block_size=BLOCK, num_slots=num_slots, dtype=dtype)
    return cfg, w, pools


def _deltanet_step(cfg, w, pools, chunks: list[SeqChunk], x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    conv, rec = pools.state(0)
    return deltanet_forward(
        x, w=w, cfg=cfg, batch=StepBatch.build(chunks, block_size=BLOCK), conv_state=conv, recurrent_state=rec
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_batched_by_chunk_count_equals_each_sequence_alone(dtype: torch.dtype) -> None:
    """Lengths 70, 100, 128 and a 90-token continuation of a 64-token context share 2 chunks: one
    padded batch; 64 and 150 form groups of their own. Same projected inputs, grouped vs alone."""
    cfg, w, pools = _deltanet_setup(dtype, num_slots=6)
    gen = torch.Generator().manual_seed(4)
    lens, ctx = [70, 100, 128, 64, 150, 90], [0, 0, 0, 0, 0, 64]
    table = tuple(range(16))
    pools.conv[0, 5] = torch.randn(pools.conv.shape[2:], generator=gen).to(dtype)  # slot 5's 64-token context
    pools.recurrent[0, 5] = torch.randn(pools.recurrent.shape[2:], generator=gen)
    alone = CachePools.allocate(cfg, num_blocks=1, block_size=BLOCK, num_slots=6, dtype=dtype)
    alone.conv.copy_(pools.conv)
    alone.recurrent.copy_(pools.recurrent)
    batch = StepBatch.build(
        [SeqChunk(tuple(range(n)), c, i, table) for i, (n, c) in enumerate(zip(lens, ctx))], block_size=BLOCK
    )
    assert batch.chunk_groups(64) == ((0, 1, 2, 5), (3,), (4,))
    t, h = sum(lens), cfg.linear_num_value_heads
    qkv = torch.randn(t, cfg.linear_conv_dim, generator=gen).to(dtype)
    g, beta = -0.1 * torch.rand(t, h, generator=gen), torch.rand(t, h, generator=gen).to(dtype)
    out_together = torch.zeros(t, h, cfg.linear_value_head_dim, dtype=dtype)
    out_alone = out_together.clone()
    for groups, out, p in ((batch.chunk_groups(64), out_together, pools), ([(i,) for i in range(6)], out_alone, alone)):
        conv, rec = p.state(0)
        for group in groups:
            _chunk_group(
                group, qkv, g, beta, out_THV=out, batch=batch, w=w, cfg=cfg, conv_state=conv, recurrent_state=rec
            )
    _equal(out_together, out_alone, "outputs")
    _equal(pools.conv, alone.conv, "conv windows")
    _equal(pools.recurrent, alone.recurrent, "recurrent states")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_on_consecutive_slots_equals_scattered_slots(dtype: torch.dtype) -> None:
    cfg, w, pools = _deltanet_setup(dtype, num_slots=8)
    gen = torch.Generator().manual_seed(5)
    pools.conv.copy_(torch.randn(pools.conv.shape, generator=gen).to(dtype))
    pools.recurrent.copy_(torch.randn(pools.recurrent.shape, generator=gen))
    scattered = CachePools.allocate(cfg, num_blocks=1, block_size=BLOCK, num_slots=8, dtype=dtype)
    order = [6, 1, 3, 0]  # scattered slot of sequence i holds what consecutive slot 2 + i holds
    for i, s in enumerate(order):
        scattered.conv[:, s], scattered.recurrent[:, s] = pools.conv[:, 2 + i], pools.recurrent[:, 2 + i]
    x = torch.randn(4, cfg.hidden_size, generator=gen).to(dtype)
    table = (0,)
    run = _deltanet_step(cfg, w, pools, [SeqChunk((1,), 5, 2 + i, table) for i in range(4)], x)
    gathered = _deltanet_step(cfg, w, scattered, [SeqChunk((1,), 5, s, table) for s in order], x)
    _equal(run, gathered, "decode outputs")
    for i, s in enumerate(order):
        _equal(pools.conv[:, 2 + i], scattered.conv[:, s], f"conv window of sequence {i}")
        _equal(pools.recurrent[:, 2 + i], scattered.recurrent[:, s], f"state of sequence {i}")


def test_step_batch_build_fields() -> None:
    image_pos = torch.tensor([[5, 5, 5], [5, 6, 6], [5, 5, 6]])
    seqs = [
        SeqChunk((7, 8, 9), 17, 3, (4, 2), logits="all"),
        SeqChunk((1,), 40, 0, (0, 1, 5)),
        SeqChunk((2, 3, 4), 2, 1, (6,), positions=image_pos, logits="none"),
        SeqChunk((5,), 8, 2, (3,), rope_delta=-3),
    ]
    b = StepBatch.build(seqs, block_size=16)
    assert b.token_ids_T.tolist() == [7, 8, 9, 1, 2, 3, 4, 5]
    assert b.positions_3T.tolist() == [
        [17, 18, 19, 40, 5, 5, 5, 5],
        [17, 18, 19, 40, 5, 6, 6, 5],
        [17, 18, 19, 40, 5, 5, 6, 5],
    ]
    assert b.slot_mapping_T.tolist() == [
        2 * 16 + 1,
        2 * 16 + 2,
        2 * 16 + 3,
        5 * 16 + 8,
        6 * 16 + 2,
        6 * 16 + 3,
        6 * 16 + 4,
        3 * 16 + 8,
    ]
    assert b.block_tables_BN.tolist() == [[4, 2, 0], [0, 1, 5], [6, 0, 0], [3, 0, 0]]
    assert b.logit_rows.tolist() == [0, 1, 2, 3, 7]
    assert b.state_slots_B.tolist() == [3, 0, 1, 2]
    assert b.slot_run((1, 2, 3)) == 0 and b.slot_run((0, 1)) is None
    text_only = StepBatch.build([SeqChunk((1, 2), 3, 0, (0,)), SeqChunk((3,), 9, 1, (1,), rope_delta=2)], block_size=16)
    assert text_only.positions_3T.tolist() == [[3, 4, 11]] * 3
