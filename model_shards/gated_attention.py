"""Gated full attention (`self_attn`, model_spec §2.4) over a packed batch with a paged KV cache.

Legend: T packed tokens, D hidden, H query heads, G = H / Hkv query heads per KV head,
hd head dim, S keys of a sequence, N blocks x block_size.
q_proj gives per head [query (hd) | gate (hd)]; q/k get zero-centred RMSNorm over hd, then
partial RoPE; new K/V are written to the pool at the step's slot mapping; each query
attends causally to its sequence's cached + new keys; softmax in fp32, cast back before
PV; output * sigmoid(gate); o_proj. q/k/v come from one stacked GEMM when the loader provides it.

Two attention back-ends (`ATTENTION_IMPLS`): "paged" (default, the serving path) reads the paged
pool tile by tile with an online softmax and never builds a score matrix (model_shards/paged_attention.py);
"eager" materialises the fp32 scores and mirrors HF `Qwen3_5MoeAttention` with the eager back-end
(`eager_attention_forward`) bit for bit: the oracle the HF bit-parity tests name.
Tests: tests/model_shards/test_blocks.py, test_fast_paths.py, test_paged_attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from model_shards.batch import StepBatch
from model_shards.config import ModelConfig
from model_shards.norms import rms_norm_zc_scaled, zc_scale
from model_shards.paged_attention import decode_attention, decode_plan, fixed_decode_attention, prefill_attention
from model_shards.quant import Weight, linear
from model_shards.rope import apply_partial_rope

ATTENTION_IMPLS = ("paged", "eager")


@dataclass
class AttentionWeights:
    q_proj: Weight  # [H * 2 * hd, D], per head [query | gate]
    k_proj: Weight  # [Hkv * hd, D]
    v_proj: Weight  # [Hkv * hd, D]
    o_proj: Weight  # [D, H * hd]
    q_norm: torch.Tensor  # [hd] zero-centred
    k_norm: torch.Tensor  # [hd] zero-centred
    # [(2H + 2Hkv) * hd, D] q_proj, k_proj, v_proj stacked (one GEMM, same bits as three); the
    # loader sets it and makes the three fields row views of it. None: three GEMMs.
    qkv_proj: torch.Tensor | None = None

    # fp32 (1 + w) of q_norm / k_norm, computed on first use and kept.
    @cached_property
    def q_scale(self) -> torch.Tensor:
        return zc_scale(self.q_norm)

    @cached_property
    def k_scale(self) -> torch.Tensor:
        return zc_scale(self.k_norm)


def attention_forward(
    x_TD: torch.Tensor,
    *,
    w: AttentionWeights,
    cfg: ModelConfig,
    batch: StepBatch,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    impl: str = "paged",
) -> torch.Tensor:
    """One attention mixer over all sequences of a step; writes this step's K/V into the pool.

    Args:
        x_TD: [T, D] normed hidden states.
        cos, sin: [T, rotary_dim] from `rope.mrope_cos_sin`.
        k_pool, v_pool: [num_blocks, block_size, Hkv, hd] this layer's pool.
        impl: "paged" (tiled online softmax over the pool) or "eager" (HF's eager math, the oracle).
    Returns:
        [T, D].
    """
    t = x_TD.shape[0]
    h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if w.qkv_proj is not None:
        qg, k, v = linear(x_TD, w.qkv_proj).split([h * 2 * hd, hkv * hd, hkv * hd], dim=-1)
    else:
        qg, k, v = linear(x_TD, w.q_proj), linear(x_TD, w.k_proj), linear(x_TD, w.v_proj)
    query, gate = torch.chunk(qg.reshape(t, h, 2 * hd), 2, dim=-1)
    gate = gate.reshape(t, h * hd)
    q = rms_norm_zc_scaled(query, scale=w.q_scale, eps=cfg.rms_norm_eps)
    k = rms_norm_zc_scaled(k.reshape(t, hkv, hd), scale=w.k_scale, eps=cfg.rms_norm_eps)
    v = v.reshape(t, hkv, hd)
    q = apply_partial_rope(q, cos=cos, sin=sin)
    k = apply_partial_rope(k, cos=cos, sin=sin)

    k_pool.view(-1, hkv, hd).index_copy_(0, batch.slot_mapping_T, k.to(k_pool.dtype))
    v_pool.view(-1, hkv, hd).index_copy_(0, batch.slot_mapping_T, v.to(v_pool.dtype))

    out_THD = torch.empty_like(q)
    scale = hd**-0.5
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    eager = impl == "eager"
    fixed = batch.fixed_decode
    if fixed is not None:  # a fixed-shape decode batch (CUDA-graph bucket): row i is sequence i's one token
        if eager:
            raise ValueError("a fixed-shape decode batch needs paged attention (eager reads key counts on the host)")
        out = fixed_decode_attention(
            q,
            tables_RN=batch.block_tables_BN,
            key_counts_R=fixed.key_counts_B,
            tiles=fixed.tiles,
            k_pool=k_pool,
            v_pool=v_pool,
            scale=scale,
        )
        return linear(out.reshape(t, h * hd) * torch.sigmoid(gate), w.o_proj)
    if batch.decode_rows:  # one query per row over its cached context, batched (decode and verification)
        rows = batch.decode_row_ids
        if eager:
            q_rows = q.index_select(0, rows)  # index_select / index_copy_: the same values as q[rows] / out[rows] = ...
            out_THD.index_copy_(
                0, rows, _decode_attention(q_rows, batch=batch, k_pool=k_pool, v_pool=v_pool, scale=scale)
            )
        else:
            bs = k_pool.shape[1]
            plan = batch.memo(("decode_plan", bs), lambda: _decode_plan(batch, bs))
            q_rows = q.index_select(0, rows)
            out_THD.index_copy_(0, rows, decode_attention(q_rows, plan=plan, k_pool=k_pool, v_pool=v_pool, scale=scale))
    prefill = _prefill_attention if eager else prefill_attention
    for i in batch.chunk_seqs:
        start, n, ctx = batch.starts[i], batch.query_lens[i], batch.context_lens[i]
        out_THD[start : start + n] = prefill(
            q[start : start + n],
            table_N=batch.block_tables_BN[i],
            context_len=ctx,
            k_pool=k_pool,
            v_pool=v_pool,
            scale=scale,
        )
    attn = out_THD.reshape(t, h * hd) * torch.sigmoid(gate)
    return linear(attn, w.o_proj)


def _prefill_attention(
    q_THD: torch.Tensor,
    *,
    table_N: torch.Tensor,
    context_len: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of n new queries over context_len cached + n new keys of one sequence."""
    n, h, hd = q_THD.shape
    hkv = k_pool.shape[2]
    s = context_len + n
    bs = k_pool.shape[1]
    blocks = table_N[: -(-s // bs)]
    k = k_pool.index_select(0, blocks).reshape(-1, hkv, hd)[:s]  # [S, Hkv, hd]
    v = v_pool.index_select(0, blocks).reshape(-1, hkv, hd)[:s]
    g = h // hkv
    # [Hkv, G*n, hd] x [Hkv, hd, S]: query head j uses KV head j // G (HF repeat_kv).
    qg = q_THD.view(n, hkv, g, hd).permute(1, 2, 0, 3).reshape(hkv, g * n, hd)
    scores = torch.matmul(qg, k.permute(1, 2, 0)).mul_(scale)  # [Hkv, G*n, S]
    key_pos = torch.arange(s, device=q_THD.device)
    q_pos = torch.arange(context_len, s, device=q_THD.device).repeat(g)
    scores.masked_fill_(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_THD.dtype)
    out = torch.matmul(probs, v.permute(1, 0, 2))  # [Hkv, G*n, hd]
    return out.view(hkv, g, n, hd).permute(2, 0, 1, 3).reshape(n, h, hd)


def _decode_attention(
    q_BHD: torch.Tensor,
    *,
    batch: StepBatch,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row (`batch.decode_rows`) over its keys; key counts padded to the longest, masked."""
    b, h, hd = q_BHD.shape
    hkv, bs = k_pool.shape[2], k_pool.shape[1]
    blocks, mask = batch.memo(("decode_keys", bs), lambda: _decode_keys(batch, bs))
    s = mask.shape[1]
    k = k_pool.index_select(0, blocks).view(b, s, hkv, hd)
    v = v_pool.index_select(0, blocks).view(b, s, hkv, hd)
    g = h // hkv
    qg = q_BHD.view(b, hkv, g, hd)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)).mul_(scale)  # [B, Hkv, G, S]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_BHD.dtype)
    # Padding reads other sequences' blocks: zero them, since 0 * NaN would still poison the sum.
    v.masked_fill_(mask[:, :, None, None], 0)  # v is a gathered copy of the pool
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hkv, G, hd]
    return out.reshape(b, h, hd)


def _decode_keys(batch: StepBatch, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The [B * nblk] block ids (B rows of a table covering the longest context) and the [B, nblk * bs]
    mask of key slots past each row's key count (shared by every attention layer of the step)."""
    seqs = tuple(i for i, _ in batch.decode_rows)
    lens = [n for _, n in batch.decode_rows]
    nblk = -(-max(lens) // bs)
    tables = batch.block_tables_BN[batch.index_of(seqs), :nblk]
    lens_t = torch.tensor(lens, device=tables.device)
    return tables.reshape(-1), torch.arange(nblk * bs, device=tables.device)[None, :] >= lens_t[:, None]


def _decode_plan(batch: StepBatch, bs: int):  # noqa: ANN202  # paged_attention.decode_plan's result
    """`decode_plan` for the step's decode rows (built once per step, shared by every attention layer)."""
    seqs = tuple(i for i, _ in batch.decode_rows)
    return decode_plan(batch.block_tables_BN[batch.index_of(seqs)], [n for _, n in batch.decode_rows], block_size=bs)
