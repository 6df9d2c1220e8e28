"""The mixer blocks and their small parts: norms, MRoPE, DeltaNet and gated attention over StepBatch.

Proves: the two RMSNorms have the documented formulas (known answers) and equal transformers'
modules bit for bit; our MRoPE equals transformers' rotary embedding + apply_rotary_pos_emb
bit for bit, with 3-row positions that differ per axis; the DeltaNet and attention mixers,
run over packed batches of sequences with different lengths and cached contexts through
`StepBatch` + `CachePools`, equal the per-sequence references in `model_shards/reference.py`
(outputs, conv windows, recurrent states, cached K/V), carry state over prefill + decode
steps, leave other sequences' slots and blocks untouched, and ignore stale cache contents
for a fresh sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.config import ModelConfig, tiny
from model_shards.gated_attention import AttentionWeights, attention_forward
from model_shards.gated_deltanet import DeltaNetWeights, deltanet_forward
from model_shards.norms import rms_norm_gated, rms_norm_zc
from model_shards.reference import attention_reference, causal_conv_reference, deltanet_reference, mrope_reference
from model_shards.rope import apply_partial_rope, inv_frequencies, mrope_cos_sin

# Mixer outputs are O(1) (hidden 128). The batched mixers and the per-token fp32 references
# differ only by fp32 summation order (chunked delta rule, batched matmuls, fused softmax);
# measured max |diff| 3.3e-6 (DeltaNet), 5.4e-7 (attention), 1.2e-6 (cached K/V), so 2e-5
# leaves ~6x headroom while a real bug (wrong head, stale state, shifted position) is O(0.1).
MIXER_FP32_ATOL = 2e-5
# Conv windows are projected inputs (matmuls of different row counts: 1.7e-6 measured);
# recurrent states are O(1) sums over tokens (7e-7 measured).
STATE_FP32_ATOL = 2e-5
# The reference computes each angle on its own instead of through HF's table (measured: 0 diff).
ROPE_REF_FP32_ATOL = 1e-5

BLOCK = 16
NUM_BLOCKS = 48
NUM_SLOTS = 8
LAYER = 0  # the first linear-attention layer of tiny(); attention layer below
ATTN_LAYER = 3


def _report(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"max |diff| {d.max().item():.3g}, mean |diff| {d.mean().item():.3g}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol, rtol=0, msg=lambda _: f"{what}: {_report(got, want)} (atol {atol:g})"
    )


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got, want), f"{what} not bit-identical: {_report(got, want)}"


# ============================================================================== norms
def test_rms_norm_zc_known_answer_uses_one_plus_w() -> None:
    """x = [2, -2, 2, -2]: rms = 2, so rmsnorm(x) = [1, -1, 1, -1]; the zero-centred weight scales by (1 + w)."""
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    plain = rms_norm_zc(x, weight=torch.zeros(4), eps=1e-6)
    _assert_close(plain, torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 1e-6, "weight 0 gives plain rmsnorm")
    scaled = rms_norm_zc(x, weight=torch.tensor([0.0, 1.0, -1.0, 0.5]), eps=1e-6)
    _assert_close(scaled, torch.tensor([[1.0, -2.0, 0.0, -1.5]]), 1e-6, "(1 + w) * rmsnorm(x)")


def test_rms_norm_gated_known_answer_uses_plain_w_and_silu_gate() -> None:
    """Gated norm: w * rmsnorm(x) * silu(z) with the plain weight (w = 0 zeroes the output, unlike 1 + w)."""
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    z = torch.tensor([[1.0, 1.0, 0.0, -2.0]])
    w = torch.tensor([1.0, 0.0, 3.0, 0.5])
    silu = torch.tensor([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-1)), 0.0, -2 / (1 + math.exp(2))])
    want = torch.tensor([[1.0, -1.0, 1.0, -1.0]]) * w * silu
    _assert_close(rms_norm_gated(x, gate=z, weight=w, eps=1e-6), want, 1e-6, "w * rmsnorm(x) * silu(z)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norms_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    """`Qwen3_5MoeRMSNorm` and `Qwen3_5MoeRMSNormGated` with perturbed weights: same bits as ours."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm, Qwen3_5MoeRMSNormGated

    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(10, 48, generator=gen)).to(dtype)
    z = torch.randn(10, 48, generator=gen).to(dtype)
    zc, gated = Qwen3_5MoeRMSNorm(48, eps=1e-6), Qwen3_5MoeRMSNormGated(48, eps=1e-6)
    with torch.no_grad():
        zc.weight.copy_(0.3 * torch.randn(48, generator=gen))
        gated.weight.copy_(1 + 0.3 * torch.randn(48, generator=gen))
    zc, gated = zc.to(dtype), gated.to(dtype)
    with torch.no_grad():
        _assert_equal(rms_norm_zc(x, weight=zc.weight, eps=1e-6), zc(x), "zero-centred norm")
        _assert_equal(rms_norm_gated(x, gate=z, weight=gated.weight, eps=1e-6), gated(x, z), "gated norm")


# ============================================================================== rope
def _hf_text_config():  # noqa: ANN202
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=1e7,
            partial_rotary_factor=0.25,
            mrope_section=[3, 3, 2],
            mrope_interleaved=True,
        ),
    )


def _mrope_positions(t: int) -> torch.Tensor:
    """[3, t] positions whose three rows differ (an image-like block after some text)."""
    pos = torch.arange(t).expand(3, t).clone()
    pos[1, 3:] = 3 + torch.arange(t - 3) // 4  # rows of a 4-wide grid
    pos[2, 3:] = 3 + torch.arange(t - 3) % 4  # columns
    pos[0, 3:] = 3
    return pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("positions", ["text", "mrope-3-rows"])
def test_rope_bit_identical_to_transformers(positions: str, dtype: torch.dtype) -> None:
    """`Qwen3_5MoeTextRotaryEmbedding` + `apply_rotary_pos_emb` vs `mrope_cos_sin` + `apply_partial_rope`."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
        Qwen3_5MoeTextRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = tiny()
    t = 40
    pos_3T = torch.arange(t).expand(3, t) + 1000 if positions == "text" else _mrope_positions(t) * 7
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(t, cfg.num_attention_heads, cfg.head_dim, generator=gen).to(dtype)
    k = torch.randn(t, cfg.num_key_value_heads, cfg.head_dim, generator=gen).to(dtype)

    hf_rope = Qwen3_5MoeTextRotaryEmbedding(_hf_text_config())
    hf_cos, hf_sin = hf_rope(q, pos_3T[:, None, :])  # [1, T, rotary_dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)

    inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    _assert_equal(inv_freq, hf_rope.inv_freq, "inverse frequencies")
    cos, sin = mrope_cos_sin(pos_3T, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=dtype)
    _assert_equal(cos, hf_cos[0], "cos table")
    _assert_equal(sin, hf_sin[0], "sin table")
    _assert_equal(apply_partial_rope(q, cos=cos, sin=sin), hf_q[0].transpose(0, 1), "rotated q")
    _assert_equal(apply_partial_rope(k, cos=cos, sin=sin), hf_k[0].transpose(0, 1), "rotated k")


def test_mrope_known_answer_axis_of_each_frequency() -> None:
    """Only H positions non-zero: exactly the frequencies j % 3 == 1, j < 3 * sec_H rotate (j = 1, 4, 7 of 8
    for mrope_section [3, 3, 2]); only W non-zero: j % 3 == 2, j < 3 * sec_W (j = 2, 5); T drives the rest."""
    cfg = tiny()
    inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    half = cfg.rotary_dim // 2
    for axis, want_rotating in ((0, {0, 3, 6}), (1, {1, 4, 7}), (2, {2, 5})):
        pos = torch.zeros(3, 1, dtype=torch.long)
        pos[axis] = 5
        cos, sin = mrope_cos_sin(pos, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=torch.float32)
        rotating = {j for j in range(half) if sin[0, j] != 0}
        assert rotating == want_rotating, f"axis {axis}: frequencies {sorted(rotating)} rotate"
        for j in want_rotating:
            assert sin[0, j].item() == pytest.approx(math.sin(5 * inv_freq[j].item()), abs=1e-6)
            assert cos[0, j + half] == cos[0, j]  # duplicated halves (rotate_half pairs j, j + half)


@pytest.mark.parametrize("positions", ["text", "mrope-3-rows"])
def test_rope_matches_reference(positions: str) -> None:
    cfg = tiny()
    t = 24
    pos_3T = torch.arange(t).expand(3, t) + 500 if positions == "text" else _mrope_positions(t)
    x = torch.randn(t, 4, cfg.head_dim, generator=torch.Generator().manual_seed(2))
    inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    cos, sin = mrope_cos_sin(pos_3T, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=torch.float32)
    want = mrope_reference(
        x, positions_3T=pos_3T, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section
    )
    got = apply_partial_rope(x, cos=cos, sin=sin)
    _assert_close(got, want, ROPE_REF_FP32_ATOL, "rope vs reference")
    _assert_equal(got[..., cfg.rotary_dim :], x[..., cfg.rotary_dim :], "pass-through dims")


# ============================================================================== conv reference
def test_causal_conv_reference_known_answer_with_reset_and_left_context() -> None:
    """Taps [1, 10, 100, 1000] (oldest first) on packed sequences [1, 2] and [3]: the second sequence
    sees zeros, not the first one's inputs; a given left context is used instead of zeros."""
    w = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y, windows = causal_conv_reference(x, weight_CK=w, seq_lens=[2, 1])
    pre = torch.tensor([1000.0 * 1, 100.0 * 1 + 1000.0 * 2, 1000.0 * 3])
    _assert_close(y[:, 0], pre * torch.sigmoid(pre), 1e-3, "silu(conv) with per-sequence reset")
    _assert_equal(windows, torch.tensor([[[0.0, 1.0, 2.0]], [[0.0, 0.0, 3.0]]]), "last K-1 inputs")
    y, windows = causal_conv_reference(x[2:], weight_CK=w, left_context_BCW=torch.tensor([[[4.0, 5.0, 6.0]]]))
    pre = torch.tensor([4.0 + 50.0 + 600.0 + 3000.0])
    _assert_close(y[:, 0], pre * torch.sigmoid(pre), 1e-3, "silu(conv) with left context")
    _assert_equal(windows, torch.tensor([[[5.0, 6.0, 3.0]]]), "window after one token")


# ============================================================================== mixers over StepBatch
def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


def _deltanet_weights(cfg: ModelConfig, seed: int = 0) -> DeltaNetWeights:
    """Random fp32 weights with the checkpoint's structure; decays A in (0.01, 2) so state survives chunks."""
    g = torch.Generator().manual_seed(seed)
    d, h, hv = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_dim
    return DeltaNetWeights(
        in_proj_qkv=_randn(g, cfg.linear_conv_dim, d, scale=d**-0.5),
        in_proj_z=_randn(g, hv, d, scale=d**-0.5),
        in_proj_b=_randn(g, h, d, scale=d**-0.5),
        in_proj_a=_randn(g, h, d, scale=d**-0.5),
        conv1d=_randn(g, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim, scale=0.5),
        dt_bias=_randn(g, h, scale=0.3),
        A_log=torch.log(0.01 + 1.99 * torch.rand(h, generator=g)),
        norm=1 + _randn(g, cfg.linear_value_head_dim, scale=0.3),
        out_proj=_randn(g, d, hv, scale=hv**-0.5),
    )


def _attention_weights(cfg: ModelConfig, seed: int = 0) -> AttentionWeights:
    g = torch.Generator().manual_seed(seed)
    d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return AttentionWeights(
        q_proj=_randn(g, h * 2 * hd, d, scale=d**-0.5),
        k_proj=_randn(g, hkv * hd, d, scale=d**-0.5),
        v_proj=_randn(g, hkv * hd, d, scale=d**-0.5),
        o_proj=_randn(g, d, h * hd, scale=(h * hd) ** -0.5),
        q_norm=_randn(g, hd, scale=0.3),
        k_norm=_randn(g, hd, scale=0.3),
    )


@dataclass
class Seq:
    """One test sequence: its hidden states (all tokens), positions, slot and KV blocks."""

    x_TD: torch.Tensor
    positions_3T: torch.Tensor
    slot: int
    table: tuple[int, ...]

    def chunk(self, start: int, stop: int) -> SeqChunk:
        return SeqChunk(
            token_ids=tuple(range(stop - start)),
            context_len=start,
            state_slot=self.slot,
            block_table=self.table,
            positions=self.positions_3T[:, start:stop],
        )


def _make_seqs(cfg: ModelConfig, lengths: list[int], *, seed: int, slots: list[int], mrope_index: int = 2) -> list[Seq]:
    """Sequences with random hidden states; block tables are scattered, non-contiguous blocks.
    Sequence `mrope_index` gets 3-row positions that differ per axis (image-like)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    seqs, used = [], 0
    for i, n in enumerate(lengths):
        blocks = -(-n // BLOCK)
        pos = _mrope_positions(n) if i == mrope_index else torch.arange(n).expand(3, n).clone()
        seqs.append(
            Seq(torch.randn(n, cfg.hidden_size, generator=gen), pos, slots[i], tuple(perm[used : used + blocks]))
        )
        used += blocks
    assert used <= NUM_BLOCKS
    return seqs


def _pools(cfg: ModelConfig, *, seed: int = 99) -> CachePools:
    """Pools full of stale garbage: NaN in DeltaNet slots (a fresh sequence must never read them),
    large finite values in KV blocks (finite: masked attention multiplies them by exactly 0)."""
    pools = CachePools.allocate(cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_slots=NUM_SLOTS, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    pools.conv.fill_(float("nan"))
    pools.recurrent.fill_(float("nan"))
    pools.k.copy_(_randn(gen, *pools.k.shape, scale=100.0))
    pools.v.copy_(_randn(gen, *pools.v.shape, scale=100.0))
    return pools


def _run_deltanet(
    step: list[tuple[Seq, int, int]], *, cfg: ModelConfig, w: DeltaNetWeights, pools: CachePools
) -> list[torch.Tensor]:
    """One mixer step over packed sequences; returns each sequence's output rows."""
    batch = StepBatch.build([s.chunk(a, b) for s, a, b in step], block_size=BLOCK)
    x = torch.cat([s.x_TD[a:b] for s, a, b in step])
    conv, rec = pools.state(LAYER)
    out = deltanet_forward(x, w=w, cfg=cfg, batch=batch, conv_state=conv, recurrent_state=rec)
    return list(out.split(batch.query_lens))


def _run_attention(
    step: list[tuple[Seq, int, int]], *, cfg: ModelConfig, w: AttentionWeights, pools: CachePools
) -> list[torch.Tensor]:
    batch = StepBatch.build([s.chunk(a, b) for s, a, b in step], block_size=BLOCK)
    x = torch.cat([s.x_TD[a:b] for s, a, b in step])
    inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
    cos, sin = mrope_cos_sin(batch.positions_3T, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=x.dtype)
    k_pool, v_pool = pools.kv(ATTN_LAYER)
    out = attention_forward(x, w=w, cfg=cfg, batch=batch, cos=cos, sin=sin, k_pool=k_pool, v_pool=v_pool)
    return list(out.split(batch.query_lens))


# (context_len, new tokens) per sequence: a long fresh prefill, a fresh single token (chunk path),
# a prefill resumed at 64, a decode token (recurrent path), a context shorter than the conv window,
# a prefill resumed off the chunk grid.
MIXED = [(0, 150), (0, 1), (64, 86), (5, 1), (2, 5), (37, 30)]
MIXED_SLOTS = [5, 0, 3, 7, 2, 6]  # scattered; slots 1 and 4 belong to nobody


def _check_deltanet_states(
    seqs: list[Seq],
    ends: list[int],
    *,
    cfg: ModelConfig,
    w: DeltaNetWeights,
    pools: CachePools,
    outputs: list[torch.Tensor],
    starts: list[int],
) -> None:
    conv, rec = pools.state(LAYER)
    for s, start, end, got in zip(seqs, starts, ends, outputs):
        want, window, state = deltanet_reference(s.x_TD[:end], w=w, cfg=cfg)
        _assert_close(got, want[start:end], MIXER_FP32_ATOL, f"DeltaNet output, slot {s.slot}, tokens {start}:{end}")
        _assert_close(conv[s.slot], window, STATE_FP32_ATOL, f"conv window, slot {s.slot}")
        _assert_close(rec[s.slot], state, STATE_FP32_ATOL, f"recurrent state, slot {s.slot}")


def test_deltanet_batch_matches_per_sequence_reference() -> None:
    """Contexts are prefilled in one batch, then all new tokens in a second: every sequence's rows,
    conv window and recurrent state equal the reference run on that sequence alone (fp32)."""
    cfg = tiny()
    w = _deltanet_weights(cfg)
    seqs = _make_seqs(cfg, [c + n for c, n in MIXED], seed=1, slots=MIXED_SLOTS)
    pools = _pools(cfg)
    with_ctx = [(s, 0, c) for s, (c, _) in zip(seqs, MIXED) if c > 0]
    _run_deltanet(with_ctx, cfg=cfg, w=w, pools=pools)
    outs = _run_deltanet([(s, c, c + n) for s, (c, n) in zip(seqs, MIXED)], cfg=cfg, w=w, pools=pools)
    _check_deltanet_states(
        seqs, [c + n for c, n in MIXED], cfg=cfg, w=w, pools=pools, outputs=outs, starts=[c for c, _ in MIXED]
    )


def test_deltanet_reference_carries_window_and_state_like_one_call() -> None:
    """The reference itself: two calls chained through (window, state) == one call (the oracle is consistent)."""
    cfg = tiny()
    w = _deltanet_weights(cfg)
    x = torch.randn(20, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    whole, window, state = deltanet_reference(x, w=w, cfg=cfg)
    first, mid_window, mid_state = deltanet_reference(x[:7], w=w, cfg=cfg)
    rest, end_window, end_state = deltanet_reference(
        x[7:], w=w, cfg=cfg, conv_window_CW=mid_window, state_HKV=mid_state
    )
    _assert_close(torch.cat([first, rest]), whole, MIXER_FP32_ATOL, "chained outputs")
    _assert_equal(end_window, window, "chained conv window")
    _assert_close(end_state, state, STATE_FP32_ATOL, "chained state")


def test_deltanet_prefill_then_decode_steps() -> None:
    """Three sequences prefilled together, then 6 decode steps together (recurrent path): each step's
    output and the final windows / states follow the one-shot reference over the whole sequence."""
    cfg = tiny()
    w = _deltanet_weights(cfg, seed=1)
    prompt, steps = [150, 7, 64], 6
    seqs = _make_seqs(cfg, [n + steps for n in prompt], seed=2, slots=[4, 1, 6])
    pools = _pools(cfg)
    outs = _run_deltanet([(s, 0, n) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
    refs = [deltanet_reference(s.x_TD, w=w, cfg=cfg)[0] for s in seqs]
    for s, n, got, want in zip(seqs, prompt, outs, refs):
        _assert_close(got, want[:n], MIXER_FP32_ATOL, f"prefill, slot {s.slot}")
    for i in range(steps):
        outs = _run_deltanet([(s, n + i, n + i + 1) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
        for s, n, got, want in zip(seqs, prompt, outs, refs):
            _assert_close(got, want[n + i : n + i + 1], MIXER_FP32_ATOL, f"decode step {i}, slot {s.slot}")
    _check_deltanet_states(
        seqs,
        [n + steps for n in prompt],
        cfg=cfg,
        w=w,
        pools=pools,
        outputs=outs,
        starts=[n + steps - 1 for n in prompt],
    )


def test_deltanet_leaves_other_slots_untouched() -> None:
    """Slots of sequences not in the step keep their bits (prefill and decode steps)."""
    cfg = tiny()
    w = _deltanet_weights(cfg)
    seqs = _make_seqs(cfg, [20, 9], seed=3, slots=[2, 5])
    pools = _pools(cfg)
    gen = torch.Generator().manual_seed(7)
    pools.conv.copy_(torch.randn(pools.conv.shape, generator=gen))
    pools.recurrent.copy_(torch.randn(pools.recurrent.shape, generator=gen))
    before_conv, before_rec = pools.conv.clone(), pools.recurrent.clone()
    _run_deltanet([(s, 0, 8) for s in seqs], cfg=cfg, w=w, pools=pools)
    _run_deltanet([(s, 8, 9) for s in seqs], cfg=cfg, w=w, pools=pools)
    others = [i for i in range(NUM_SLOTS) if i not in (2, 5)]
    _assert_equal(pools.conv[:, others], before_conv[:, others], "conv windows of other slots")
    _assert_equal(pools.recurrent[:, others], before_rec[:, others], "recurrent states of other slots")
    other_layers = [row for layer, row in pools.linear_layer_rows.items() if layer != LAYER]
    _assert_equal(pools.recurrent[other_layers], before_rec[other_layers], "states of other layers")
    row = pools.linear_layer_rows[LAYER]
    assert not torch.equal(pools.recurrent[row, 2], before_rec[row, 2]), "the step wrote no state at all"


@pytest.mark.parametrize("new_tokens", [1, 70], ids=["single-token", "prefill70"])
def test_deltanet_fresh_sequence_ignores_stale_slot(new_tokens: int) -> None:
    """A sequence with context 0 in a slot holding a previous sequence's state (here NaN or random)
    equals a run on a zeroed slot bit for bit, and the reference from zero state."""
    cfg = tiny()
    w = _deltanet_weights(cfg)
    seq = _make_seqs(cfg, [new_tokens], seed=5, slots=[3])[0]
    stale = _pools(cfg)  # NaN everywhere
    clean = CachePools.allocate(cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_slots=NUM_SLOTS, dtype=torch.float32)
    random_stale = _pools(cfg)
    random_stale.conv.normal_()
    random_stale.recurrent.normal_()
    got = _run_deltanet([(seq, 0, new_tokens)], cfg=cfg, w=w, pools=stale)[0]
    got_random = _run_deltanet([(seq, 0, new_tokens)], cfg=cfg, w=w, pools=random_stale)[0]
    want = _run_deltanet([(seq, 0, new_tokens)], cfg=cfg, w=w, pools=clean)[0]
    _assert_equal(got, want, "fresh sequence on a NaN slot vs a zeroed slot")
    _assert_equal(got_random, want, "fresh sequence on a random slot vs a zeroed slot")
    row = stale.linear_layer_rows[LAYER]
    _assert_equal(stale.recurrent[row, 3], clean.recurrent[row, 3], "new state written over the stale one")
    _assert_equal(stale.conv[row, 3], clean.conv[row, 3], "new conv window written over the stale one")
    _assert_close(got, deltanet_reference(seq.x_TD, w=w, cfg=cfg)[0], MIXER_FP32_ATOL, "vs reference")


# ------------------------------------------------------------------------------ attention
def _kv_of(pools: CachePools, seq: Seq, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n cached K/V rows of a sequence, read through its block table."""
    k_pool, v_pool = pools.kv(ATTN_LAYER)
    rows = torch.tensor([seq.table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
    hkv, hd = k_pool.shape[-2:]
    return k_pool.reshape(-1, hkv, hd)[rows], v_pool.reshape(-1, hkv, hd)[rows]


def test_attention_batch_matches_per_sequence_reference() -> None:
    """Contexts prefilled in one batch, then every new token in a second (prefill chunks on cached
    context, decode rows, an MRoPE sequence): outputs and cached post-RoPE K/V equal the reference."""
    cfg = tiny()
    w = _attention_weights(cfg)
    seqs = _make_seqs(cfg, [c + n for c, n in MIXED], seed=1, slots=MIXED_SLOTS)
    pools = _pools(cfg)
    _run_attention([(s, 0, c) for s, (c, _) in zip(seqs, MIXED) if c > 0], cfg=cfg, w=w, pools=pools)
    outs = _run_attention([(s, c, c + n) for s, (c, n) in zip(seqs, MIXED)], cfg=cfg, w=w, pools=pools)
    for s, (c, n), got in zip(seqs, MIXED, outs):
        want, keys, values = attention_reference(s.x_TD, w=w, cfg=cfg, positions_3T=s.positions_3T)
        _assert_close(got, want[c:], MIXER_FP32_ATOL, f"attention output, context {c}, new {n}")
        k, v = _kv_of(pools, s, c + n)
        _assert_close(k, keys, MIXER_FP32_ATOL, f"cached keys, context {c}")
        _assert_close(v, values, MIXER_FP32_ATOL, f"cached values, context {c}")


def test_attention_reference_with_past_kv_equals_one_call() -> None:
    cfg = tiny()
    w = _attention_weights(cfg)
    s = _make_seqs(cfg, [5, 20], seed=2, slots=[0, 1])[1]
    whole, keys, values = attention_reference(s.x_TD, w=w, cfg=cfg, positions_3T=s.positions_3T)
    _, past_k, past_v = attention_reference(s.x_TD[:9], w=w, cfg=cfg, positions_3T=s.positions_3T[:, :9])
    rest, k2, v2 = attention_reference(
        s.x_TD[9:], w=w, cfg=cfg, positions_3T=s.positions_3T[:, 9:], past_k_SHD=past_k, past_v_SHD=past_v
    )
    _assert_close(rest, whole[9:], MIXER_FP32_ATOL, "resumed reference")
    _assert_close(k2, keys, MIXER_FP32_ATOL, "keys")  # projections of 11 vs 20 rows may round differently


def test_attention_prefill_then_decode_steps() -> None:
    """Prefill 3 sequences of different lengths, then 6 batched decode steps (rows of different
    context lengths in one step): every step follows the one-shot reference."""
    cfg = tiny()
    w = _attention_weights(cfg, seed=3)
    prompt, steps = [150, 7, 33], 6
    seqs = _make_seqs(cfg, [n + steps for n in prompt], seed=4, slots=[0, 1, 2])
    pools = _pools(cfg)
    refs = [attention_reference(s.x_TD, w=w, cfg=cfg, positions_3T=s.positions_3T)[0] for s in seqs]
    outs = _run_attention([(s, 0, n) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
    for n, got, want in zip(prompt, outs, refs):
        _assert_close(got, want[:n], MIXER_FP32_ATOL, f"prefill of {n}")
    for i in range(steps):
        outs = _run_attention([(s, n + i, n + i + 1) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
        for n, got, want in zip(prompt, outs, refs):
            _assert_close(got, want[n + i : n + i + 1], MIXER_FP32_ATOL, f"decode step {i}, prompt {n}")


def test_attention_leaves_other_blocks_untouched_and_ignores_stale_blocks() -> None:
    """Blocks outside the step's tables keep their bits; fresh sequences whose blocks hold stale
    finite garbage give the same bits as on zeroed blocks (a prefill, then a decode step)."""
    cfg = tiny()
    w = _attention_weights(cfg)
    seqs = _make_seqs(cfg, [40, 17], seed=6, slots=[0, 1])

    def prefill_then_decode(pools: CachePools) -> list[torch.Tensor]:
        outs = _run_attention([(s, 0, len(s.x_TD) - 1) for s in seqs], cfg=cfg, w=w, pools=pools)
        return outs + _run_attention([(s, len(s.x_TD) - 1, len(s.x_TD)) for s in seqs], cfg=cfg, w=w, pools=pools)

    stale = _pools(cfg)
    clean = CachePools.allocate(cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_slots=NUM_SLOTS, dtype=torch.float32)
    before_k, before_v = stale.k.clone(), stale.v.clone()
    for got, want in zip(prefill_then_decode(stale), prefill_then_decode(clean)):
        _assert_equal(got, want, "outputs on stale vs zeroed blocks")
    used = sorted({b for s in seqs for b in s.table})
    others = [b for b in range(NUM_BLOCKS) if b not in used]
    _assert_equal(stale.k[:, others], before_k[:, others], "keys of other blocks")
    _assert_equal(stale.v[:, others], before_v[:, others], "values of other blocks")
    row = stale.attn_layer_rows[ATTN_LAYER]
    assert not torch.equal(stale.k[row, used], before_k[row, used]), "the step wrote no keys at all"


def test_attention_decode_ignores_non_finite_data_in_blocks_it_does_not_own() -> None:
    """Two sequences decode together; the shorter one's table is padded with block 0, which belongs to
    neither of them and holds NaN (e.g. left by a request that diverged)."""
    cfg = tiny()
    w = _attention_weights(cfg)
    seqs = _make_seqs(cfg, [40, 17], seed=6, slots=[0, 1])
    assert all(0 not in s.table for s in seqs)  # seeded tables: block 0 belongs to neither sequence
    pools = CachePools.allocate(cfg, num_blocks=NUM_BLOCKS, block_size=BLOCK, num_slots=NUM_SLOTS, dtype=torch.float32)
    pools.k[:, 0], pools.v[:, 0] = float("nan"), float("nan")
    _run_attention([(s, 0, len(s.x_TD) - 1) for s in seqs], cfg=cfg, w=w, pools=pools)
    outs = _run_attention([(s, len(s.x_TD) - 1, len(s.x_TD)) for s in seqs], cfg=cfg, w=w, pools=pools)
    for s, got in zip(seqs, outs):
        want = attention_reference(s.x_TD, w=w, cfg=cfg, positions_3T=s.positions_3T)[0][-1:]
        _assert_close(got, want, MIXER_FP32_ATOL, f"decode of the {len(s.x_TD)}-token sequence")
