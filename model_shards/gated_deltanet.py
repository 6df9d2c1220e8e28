"""Gated DeltaNet mixer (`linear_attn`, model_spec §2.3) over a packed batch with state slots.

Legend: T packed tokens, D hidden, C conv channels [q | k | v], H value heads, Hk key heads,
K key dim, V value dim, B sequences, W = kernel - 1 cached conv inputs.
Per sequence: causal depthwise conv over the pre-split qkv (left context = the slot's last
W inputs, zeros for a fresh sequence) then SiLU; beta = sigmoid(b), g = -exp(A_log) *
softplus(a + dt_bias); the delta rule (recurrent form for one token on a cached state, as
HF does; chunked otherwise); gated RMSNorm with z; out_proj.
Mirrors HF `Qwen3_5MoeGatedDeltaNet` with `causal_conv1d_fn/update` and the torch delta
rules, bit for bit. Decode steps of all sequences run together (the conv's newest position
as multiply-adds, states read and written in place when the slots are consecutive); prefill
sequences whose lengths round up to the same number of 64-token chunks run as one zero-padded
batch (the rule pads each sequence that way anyway). Reference: model_shards/reference.py.
On CUDA the rule and the conv run library kernels where installed (model_shards/kernels.py).
Tests: tests/model_shards/test_blocks.py, test_fast_paths.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from model_shards import kernels
from model_shards.batch import StepBatch
from model_shards.config import ModelConfig
from model_shards.delta_rule import CHUNK
from model_shards.norms import rms_norm_gated
from model_shards.quant import Weight, linear


@dataclass
class DeltaNetWeights:
    """Weights of one DeltaNet mixer (HF names in model_shards/weights.py)."""

    in_proj_qkv: Weight  # [C, D] rows [q (Hk*K) | k (Hk*K) | v (H*V)]
    in_proj_z: Weight  # [H*V, D]
    in_proj_b: Weight  # [H, D]
    in_proj_a: Weight  # [H, D]
    conv1d: torch.Tensor  # [C, kernel] (checkpoint [C, 1, kernel] squeezed)
    dt_bias: torch.Tensor  # [H]
    A_log: torch.Tensor  # [H]
    norm: torch.Tensor  # [V] gated-norm weight (plain w)
    out_proj: Weight  # [D, H*V]
    # [C + H*V, D] in_proj_qkv and in_proj_z stacked (one GEMM, same bits as two); the loader
    # sets it and makes the two fields row views of it. None: two GEMMs.
    in_proj_qkvz: torch.Tensor | None = None

    # Derived on first use and kept (replace the object rather than assigning new weights to it).
    @cached_property
    def neg_decay_rate(self) -> torch.Tensor:
        """[H] fp32 -exp(A_log): g = neg_decay_rate * softplus(a + dt_bias)."""
        return -self.A_log.float().exp()

    @cached_property
    def conv_taps(self) -> tuple[torch.Tensor, ...]:
        """The conv weight's kernel columns, each [C] in fp32 (the decode step's multiply-adds)."""
        return self.conv1d.float().unbind(1)


def _conv_silu(x_BCL: torch.Tensor, weight_CK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Depthwise conv without padding (the left context is already in x), then SiLU."""
    c = x_BCL.shape[1]
    out = F.conv1d(x_BCL.to(weight_CK.dtype), weight_CK.unsqueeze(1), None, padding=0, groups=c)
    return F.silu(out).to(out_dtype)


def _conv_silu_last(
    x_BCL: torch.Tensor, taps: tuple[torch.Tensor, ...], conv_dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """`_conv_silu(x)[:, :, -1]` (the newest position only) without a conv kernel call: the taps
    (`DeltaNetWeights.conv_taps`, fp32 [C] each) are summed oldest first in fp32 with fused
    multiply-adds, the depthwise F.conv1d kernel's order (same bits in fp32 and bf16), rounded to
    the conv weight's dtype, then SiLU. Returns [B, C]."""
    xs = x_BCL[..., -len(taps) :].float().unbind(-1)  # (any leading dims: verification passes [G, n, C, W + 1])
    acc = xs[0] * taps[0]
    for x, w in zip(xs[1:], taps[1:]):
        acc = torch.addcmul(acc, x, w)
    return F.silu(acc.to(conv_dtype)).to(out_dtype)


def _gates(a_TH: torch.Tensor, b_TH: torch.Tensor, w: DeltaNetWeights) -> tuple[torch.Tensor, torch.Tensor]:
    beta = b_TH.sigmoid()
    g = w.neg_decay_rate * F.softplus(a_TH.float() + w.dt_bias)
    return beta, g


def deltanet_forward(
    x_TD: torch.Tensor,
    *,
    w: DeltaNetWeights,
    cfg: ModelConfig,
    batch: StepBatch,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
    spec_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One DeltaNet mixer over all sequences of a step; updates the state slots in place.

    Args:
        x_TD: [T, D] normed hidden states (model dtype).
        conv_state: [num_slots, C, W] this layer's conv windows (model dtype).
        recurrent_state: [num_slots, H, K, V] fp32.
        spec_state: ([num_slots, k+1, C, W], [num_slots, k+1, H, K, V]) where verifying sequences
            leave their states after each token (CachePools.rollback picks one).
    Returns:
        [T, D] mixer output.
    """
    t = x_TD.shape[0]
    h, vd = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    if w.in_proj_qkvz is not None:
        qkv_TC, z_TX = linear(x_TD, w.in_proj_qkvz).split([cfg.linear_conv_dim, h * vd], dim=-1)
    else:
        qkv_TC, z_TX = linear(x_TD, w.in_proj_qkv), linear(x_TD, w.in_proj_z)
    beta_TH, g_TH = _gates(linear(x_TD, w.in_proj_a), linear(x_TD, w.in_proj_b), w)
    step: dict[str, Any] = dict(w=w, cfg=cfg, conv_state=conv_state, recurrent_state=recurrent_state)

    if batch.decode_only:  # packed row i is sequence i's token: no gathers
        core_THV = _recurrent_step(
            qkv_TC, g_TH, beta_TH, slots=batch.state_slots_B, first_slot=batch.slot_run(batch.recurrent_seqs), **step
        )
    else:
        core_THV = torch.empty(t, h, vd, dtype=x_TD.dtype, device=x_TD.device)
        if batch.recurrent_seqs:
            seqs = batch.recurrent_seqs
            rows = batch.seq_rows(seqs)
            recurrent = _recurrent_step(
                qkv_TC.index_select(0, rows),
                g_TH.index_select(0, rows),
                beta_TH.index_select(0, rows),
                slots=batch.state_slots_B.index_select(0, batch.index_of(seqs)),
                first_slot=batch.slot_run(seqs),
                **step,
            )
            core_THV.index_copy_(0, rows, recurrent)
        for group in batch.chunk_groups(CHUNK):
            _chunk_group(group, qkv_TC, g_TH, beta_TH, out_THV=core_THV, batch=batch, **step)
        if batch.verify_seqs and spec_state is None:
            raise ValueError("verifying sequences need pools allocated with spec_tokens > 0")
        for group in batch.verify_groups():  # one group per draft count: a fixed number, whatever the batch
            assert spec_state is not None
            _verify_steps(group, qkv_TC, g_TH, beta_TH, out_THV=core_THV, batch=batch, spec_state=spec_state, **step)

    normed = rms_norm_gated(core_THV.reshape(-1, vd), gate=z_TX.reshape(-1, vd), weight=w.norm, eps=cfg.rms_norm_eps)
    return linear(normed.reshape(t, h * vd), w.out_proj)


def _recurrent_step(
    qkv_BC: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    *,
    slots: torch.Tensor,
    first_slot: int | None,
    w: DeltaNetWeights,
    cfg: ModelConfig,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
) -> torch.Tensor:
    """One new token on a cached state for each of B sequences (HF's recurrent path). Returns [B, H, V].

    Slots that form one run (`first_slot` not None) are read and written through views of the
    pools; otherwise they are gathered and scattered back.
    """
    b = qkv_BC.shape[0]
    if first_slot is not None:
        conv_old, rec_old = conv_state.narrow(0, first_slot, b), recurrent_state.narrow(0, first_slot, b)
    else:
        conv_old, rec_old = conv_state.index_select(0, slots), recurrent_state.index_select(0, slots)
    window = torch.cat([conv_old, qkv_BC.unsqueeze(-1)], dim=-1)  # [B, C, W + 1] (a copy)
    if kernels.conv_backend(window) != kernels.TORCH:
        mixed = kernels.conv_silu_last(window, w.conv1d, qkv_BC.dtype)
    else:
        mixed = _conv_silu_last(window, w.conv_taps, w.conv1d.dtype, qkv_BC.dtype)  # [B, C]
    q, k, v = _split_heads(mixed.unsqueeze(1), cfg)
    out, state = kernels.recurrent_gated_delta_rule(
        q,
        k_BTHK=k,
        v_BTHV=v,
        g_BTH=g_BH.unsqueeze(1),
        beta_BTH=beta_BH.unsqueeze(1),
        state_BHKV=rec_old,
    )
    if first_slot is not None:
        conv_old.copy_(window[:, :, 1:])
        rec_old.copy_(state)
    else:
        conv_state.index_copy_(0, slots, window[:, :, 1:].to(conv_state.dtype))
        recurrent_state.index_copy_(0, slots, state)
    return out[:, 0]


def _verify_steps(
    group: tuple[int, ...],
    qkv_TC: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    *,
    out_THV: torch.Tensor,
    batch: StepBatch,
    spec_state: tuple[torch.Tensor, torch.Tensor],
    w: DeltaNetWeights,
    cfg: ModelConfig,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
) -> None:
    """Verifying sequences with n tokens each, as one batch: each sequence's tokens run as n consecutive
    recurrent steps (the same arithmetic as n decode steps), keeping the conv window and recurrent state after
    each token in `spec_state`; the slots are left at the last token's states (rolled back by
    CachePools.rollback_many when drafts are rejected). A fixed number of ops for any number of sequences."""
    n = batch.query_lens[group[0]]
    g = len(group)
    nw = conv_state.shape[-1]
    flat = batch.memo(  # [G * n] packed rows, sequence by sequence (built once per step, shared by the layers)
        ("verify_rows", group),
        lambda: torch.tensor(
            [batch.starts[i] + j for i in group for j in range(n)], dtype=torch.long, device=qkv_TC.device
        ),
    )
    slots = batch.state_slots_B.index_select(0, batch.index_of(group))
    new = qkv_TC.index_select(0, flat).view(g, n, -1).transpose(1, 2).to(conv_state.dtype)  # [G, C, n]
    window = torch.cat([conv_state.index_select(0, slots), new], dim=-1)  # [G, C, W + n]
    # every token's kernel-wide window, [G, n, C, W + 1] (a strided view, no copy): the decode step's conv
    views = window.unfold(2, nw + 1, 1).permute(0, 2, 1, 3)
    mixed = _conv_silu_last(views, w.conv_taps, w.conv1d.dtype, qkv_TC.dtype)  # [G, n, C]
    q, k, v = _split_heads(mixed, cfg)
    out, states = kernels.recurrent_gated_delta_rule(
        q,
        k_BTHK=k,
        v_BTHV=v,
        g_BTH=g_TH.index_select(0, flat).view(g, n, -1),
        beta_BTH=beta_TH.index_select(0, flat).view(g, n, -1),
        state_BHKV=recurrent_state.index_select(0, slots),
        keep_states=True,
    )  # out [G, n, H, V], states [G, n, H, K, V]
    spec_conv, spec_rec = spec_state
    after = window.unfold(2, nw, 1).narrow(2, 1, n).permute(0, 2, 1, 3)  # [G, n, C, W]: the window after token j
    spec_conv.narrow(1, 0, n).index_copy_(0, slots, after.to(spec_conv.dtype))
    spec_rec.narrow(1, 0, n).index_copy_(0, slots, states.to(spec_rec.dtype))
    conv_state.index_copy_(0, slots, window.narrow(2, n, nw))
    recurrent_state.index_copy_(0, slots, states[:, -1])
    out_THV.index_copy_(0, flat, out.reshape(g * n, *out.shape[2:]).to(out_THV.dtype))


def _chunk_group(
    group: tuple[int, ...],
    qkv_TC: torch.Tensor,
    g_TH: torch.Tensor,
    beta_TH: torch.Tensor,
    *,
    out_THV: torch.Tensor,
    batch: StepBatch,
    w: DeltaNetWeights,
    cfg: ModelConfig,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
) -> None:
    """Chunked path for sequences with the same number of 64-token chunks, as one batch.

    NOTE: every sequence is right-padded to the group's length and its padded rows are zeroed
    after the conv (q = k = v = 0, g = 0, beta = 0), exactly the padding the chunked rule gives a
    lone sequence; the depthwise conv and the rule compute each batch row on its own (checked bit
    for bit), so a sequence's outputs and states do not depend on its group.
    """
    lens = [batch.query_lens[i] for i in group]
    tpad = lens[0] if len(group) == 1 else -(-max(lens) // CHUNK) * CHUNK
    nw = conv_state.shape[-1]  # W cached conv inputs
    window = qkv_TC.new_zeros(len(group), qkv_TC.shape[1], nw + tpad)  # [G, C, W + tpad], fresh: zero left context
    g = g_TH.new_zeros(len(group), tpad, g_TH.shape[1])
    beta = beta_TH.new_zeros(len(group), tpad, beta_TH.shape[1])
    init = recurrent_state.new_zeros(len(group), *recurrent_state.shape[1:])
    slots = [batch.state_slots[i] for i in group]
    for j, (i, n, slot) in enumerate(zip(group, lens, slots)):
        start = batch.starts[i]
        if batch.context_lens[i] > 0:
            window[j, :, :nw] = conv_state[slot]
            init[j] = recurrent_state[slot]
        window[j, :, nw : nw + n] = qkv_TC[start : start + n].T
        g[j, :n], beta[j, :n] = g_TH[start : start + n], beta_TH[start : start + n]
        conv_state[slot] = window[j, :, n : n + nw]
    if kernels.conv_backend(window) != kernels.TORCH:
        mixed = kernels.conv_silu(window, w.conv1d, qkv_TC.dtype)
    else:
        mixed = _conv_silu(window, w.conv1d, qkv_TC.dtype)  # [G, C, tpad]
    for j, n in enumerate(lens):
        if n < tpad:
            mixed[j, :, n:] = 0
    q, k, v = _split_heads(mixed.transpose(1, 2), cfg)
    out, state = kernels.chunk_gated_delta_rule(q, k_BTHK=k, v_BTHV=v, g_BTH=g, beta_BTH=beta, state_BHKV=init)
    for j, (i, n, slot) in enumerate(zip(group, lens, slots)):
        recurrent_state[slot] = state[j]
        out_THV[batch.starts[i] : batch.starts[i] + n] = out[j, :n]


def _split_heads(mixed_BLC: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, l = mixed_BLC.shape[:2]  # noqa: E741  # L of the _BLC legend
    q, k, v = torch.split(mixed_BLC, [cfg.linear_key_dim, cfg.linear_key_dim, cfg.linear_value_dim], dim=-1)
    return (
        q.reshape(b, l, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
        k.reshape(b, l, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
        v.reshape(b, l, cfg.linear_num_value_heads, cfg.linear_value_head_dim),
    )
