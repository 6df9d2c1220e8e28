"""Gated DeltaNet mixer (`linear_attn`, model_spec §2.3) over a packed batch with state slots.

Legend: T packed tokens, D hidden, C conv channels [q | k | v], H value heads, Hk key heads,
K key dim, V value dim, B sequences, W = kernel - 1 cached conv inputs.
Per sequence: causal depthwise conv over the pre-split qkv (left context = the slot's last
W inputs, zeros for a fresh sequence) then SiLU; beta = sigmoid(b), g = -exp(A_log) *
softplus(a + dt_bias); the delta rule (recurrent form for one token on a cached state, as
HF does; chunked otherwise); gated RMSNorm with z; out_proj.
Mirrors HF `Qwen3_5MoeGatedDeltaNet` with `causal_conv1d_fn/update` and the torch delta
rules. Reference: model_shards/reference.py. Tests: tests/model_shards/test_blocks.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.batch import StepBatch
from model_shards.config import ModelConfig
from model_shards.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
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


def _conv_silu(x_BCL: torch.Tensor, weight_CK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Depthwise conv without padding (the left context is already in x), then SiLU."""
    c = x_BCL.shape[1]
    out = F.conv1d(x_BCL.to(weight_CK.dtype), weight_CK.unsqueeze(1), None, padding=0, groups=c)
    return F.silu(out).to(out_dtype)


def _gates(a_TH: torch.Tensor, b_TH: torch.Tensor, w: DeltaNetWeights) -> tuple[torch.Tensor, torch.Tensor]:
    beta = b_TH.sigmoid()
    g = -w.A_log.float().exp() * F.softplus(a_TH.float() + w.dt_bias)
    return beta, g


def deltanet_forward(
    x_TD: torch.Tensor,
    *,
    w: DeltaNetWeights,
    cfg: ModelConfig,
    batch: StepBatch,
    conv_state: torch.Tensor,
    recurrent_state: torch.Tensor,
) -> torch.Tensor:
    """One DeltaNet mixer over all sequences of a step; updates the state slots in place.

    Args:
        x_TD: [T, D] normed hidden states (model dtype).
        conv_state: [num_slots, C, W] this layer's conv windows (model dtype).
        recurrent_state: [num_slots, H, K, V] fp32.
    Returns:
        [T, D] mixer output.
    """
    t = x_TD.shape[0]
    h, kd, vd, hk = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_num_key_heads
    qkv_TC = linear(x_TD, w.in_proj_qkv)
    z_THV = linear(x_TD, w.in_proj_z).view(t, h, vd)
    beta_TH, g_TH = _gates(linear(x_TD, w.in_proj_a), linear(x_TD, w.in_proj_b), w)
    core_THV = torch.empty(t, h, vd, dtype=x_TD.dtype, device=x_TD.device)

    if batch.recurrent_seqs:
        seqs = batch.recurrent_seqs
        rows, slots = batch.seq_rows(seqs), batch.state_slots_B[batch.index_of(seqs)]
        window = torch.cat([conv_state[slots], qkv_TC[rows].unsqueeze(-1)], dim=-1)  # [B, C, W + 1]
        conv_state[slots] = window[:, :, 1:].to(conv_state.dtype)
        mixed = _conv_silu(window, w.conv1d, x_TD.dtype)[:, :, -1]  # [B, C]
        q, k, v = _split_heads(mixed.unsqueeze(1), cfg)
        out, state = recurrent_gated_delta_rule(
            q, k_BTHK=k, v_BTHV=v, g_BTH=g_TH[rows].unsqueeze(1), beta_BTH=beta_TH[rows].unsqueeze(1),
            state_BHKV=recurrent_state[slots],
        )
        recurrent_state[slots] = state
        core_THV[rows] = out[:, 0]

    for i in batch.chunk_seqs:
        # One sequence at a time: no padding waste between prompts of different lengths, and
        # each sequence's arithmetic does not depend on what else is in the batch.
        start, n, slot = batch.starts[i], batch.query_lens[i], int(batch.state_slots_B[i])
        fresh = batch.context_lens[i] == 0
        left = conv_state.new_zeros(conv_state.shape[1:]) if fresh else conv_state[slot]
        window = torch.cat([left.to(qkv_TC.dtype), qkv_TC[start:start + n].T], dim=-1)[None]  # [1, C, W + n]
        conv_state[slot] = window[0, :, n:].to(conv_state.dtype)
        mixed = _conv_silu(window, w.conv1d, x_TD.dtype).transpose(1, 2)  # [1, n, C]
        q, k, v = _split_heads(mixed, cfg)
        init = recurrent_state.new_zeros(recurrent_state.shape[1:]) if fresh else recurrent_state[slot]
        out, state = chunk_gated_delta_rule(
            q, k_BTHK=k, v_BTHV=v, g_BTH=g_TH[None, start:start + n], beta_BTH=beta_TH[None, start:start + n],
            state_BHKV=init[None],
        )
        recurrent_state[slot] = state[0]
        core_THV[start:start + n] = out[0]

    normed = rms_norm_gated(core_THV.reshape(-1, vd), gate=z_THV.reshape(-1, vd), weight=w.norm, eps=cfg.rms_norm_eps)
    return linear(normed.reshape(t, h * vd), w.out_proj)


def _split_heads(mixed_BLC: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, l = mixed_BLC.shape[:2]
    q, k, v = torch.split(mixed_BLC, [cfg.linear_key_dim, cfg.linear_key_dim, cfg.linear_value_dim], dim=-1)
    return (
        q.reshape(b, l, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
        k.reshape(b, l, cfg.linear_num_key_heads, cfg.linear_key_head_dim),
        v.reshape(b, l, cfg.linear_num_value_heads, cfg.linear_value_head_dim),
    )
