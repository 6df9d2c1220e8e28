"""Naive references for the model's blocks: the oracle every optimised path is tested against.

Owns one plain function per op: the causal conv with per-sequence reset, the gated delta
rule, a whole DeltaNet mixer, gated attention with interleaved MRoPE, and the MoE block
(router, routed experts, shared expert). Everything runs in float32, loops over sequences,
tokens and heads, and uses explicit 2-D matmuls, so that each line reads as model_spec §2.
Must not: be imported by serving code, be optimised, or copy the batched code it checks.
Legend: T tokens, C conv channels, W = kernel - 1, H heads, Hk key heads, K key dim, V value
dim, D hidden, S keys, E experts, k top-k. Tests: tests/model_shards/test_{blocks,delta_rule,moe}.py.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from model_shards.config import ModelConfig
from model_shards.gated_attention import AttentionWeights
from model_shards.gated_deltanet import DeltaNetWeights
from model_shards.moe import SharedMoEWeights
from model_shards.quant import Weight, dense


# ------------------------------------------------------------------------------ small helpers
def _f32(w: Weight) -> torch.Tensor:
    """Any weight (plain or FP8) as a float32 matrix."""
    return dense(w, torch.float32)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), written so that large x does not overflow."""
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim."""
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)


def _l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps): the eps sits inside the root of the *sum* (FLA's in-kernel l2norm)."""
    return x / torch.sqrt((x * x).sum() + eps)


# ------------------------------------------------------------------------------ causal conv
def causal_conv_reference(
    x_TC: torch.Tensor,
    *,
    weight_CK: torch.Tensor,
    seq_lens: list[int] | None = None,
    left_context_BCW: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv then SiLU, over sequences packed back to back.

    Per sequence and channel c: y_t = silu(sum_j w[c, j] * x_{t - (K - 1) + j}), where inputs
    before the sequence's first token come from its left context (zeros when none): each
    sequence starts afresh, nothing leaks across the packing boundary.

    Args:
        x_TC: [T, C] packed pre-conv inputs (qkv).
        weight_CK: [C, K] conv taps (checkpoint [C, 1, K] squeezed).
        seq_lens: tokens of each sequence (sum = T); None means one sequence.
        left_context_BCW: [B, C, K - 1] the last K - 1 inputs before each sequence; None = zeros.
    Returns:
        y_TC: [T, C] fp32; windows_BCW: [B, C, K - 1] fp32, the last K - 1 inputs of each
        sequence (left context included when the sequence is shorter than K - 1).
    """
    x_TC, weight_CK = x_TC.float(), weight_CK.float()
    c, kernel = weight_CK.shape
    lens = [x_TC.shape[0]] if seq_lens is None else list(seq_lens)
    y_TC = torch.zeros_like(x_TC)
    windows = []
    start = 0
    for b, n in enumerate(lens):
        left_CW = torch.zeros(c, kernel - 1) if left_context_BCW is None else left_context_BCW[b].float()
        history_CL = torch.cat([left_CW, x_TC[start : start + n].T], dim=1)  # [C, K - 1 + n]
        for t in range(n):
            acc_C = torch.zeros(c)
            for j in range(kernel):
                acc_C = acc_C + weight_CK[:, j] * history_CL[:, t + j]
            y_TC[start + t] = _silu(acc_C)
        windows.append(history_CL[:, history_CL.shape[1] - (kernel - 1) :])
        start += n
    return y_TC, torch.stack(windows)


# ------------------------------------------------------------------------------ delta rule
def gated_delta_rule_reference(
    q_BTHK: torch.Tensor,
    *,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token (model_spec §2.3 step 7); same signature as
    `delta_rule.chunk_gated_delta_rule`.

    Per sequence b, value head h (which reads key head h // (H / Hk)) and token t, with
    q and k l2-normalised and q scaled by K**-0.5, on the [K, V] state S:
        S   <- exp(g_t) * S
        u_t  = beta_t * (v_t - S^T k_t)
        S   <- S + k_t u_t^T
        o_t  = S^T q_t

    Args:
        q_BTHK, k_BTHK: [B, T, Hk, K]; v_BTHV: [B, T, H, V]; g_BTH, beta_BTH: [B, T, H].
        state_BHKV: [B, H, K, V] incoming state.
    Returns:
        out_BTHV fp32, final state [B, H, K, V] fp32.
    """
    b_count, t_count, hk, kd = q_BTHK.shape
    h_count = v_BTHV.shape[2]
    group = h_count // hk
    out_BTHV = torch.zeros(b_count, t_count, h_count, v_BTHV.shape[3])
    state_out = state_BHKV.float().clone()
    for b in range(b_count):
        for h in range(h_count):
            S_KV = state_out[b, h]
            for t in range(t_count):
                q_K1 = _l2_normalize(q_BTHK[b, t, h // group].float())[:, None] * kd**-0.5
                k_K1 = _l2_normalize(k_BTHK[b, t, h // group].float())[:, None]
                v_V1 = v_BTHV[b, t, h].float()[:, None]
                beta, decay = beta_BTH[b, t, h].float(), torch.exp(g_BTH[b, t, h].float())
                S_KV = decay * S_KV
                u_V1 = beta * (v_V1 - S_KV.T @ k_K1)
                S_KV = S_KV + k_K1 @ u_V1.T
                out_BTHV[b, t, h] = (S_KV.T @ q_K1)[:, 0]
            state_out[b, h] = S_KV
    return out_BTHV, state_out


# ------------------------------------------------------------------------------ DeltaNet mixer
def deltanet_reference(
    x_TD: torch.Tensor,
    *,
    w: DeltaNetWeights,
    cfg: ModelConfig,
    conv_window_CW: torch.Tensor | None = None,
    state_HKV: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole Gated DeltaNet mixer for ONE sequence (model_spec §2.3), from its weights.

    qkv = in_proj_qkv x -> causal conv + SiLU (left context = conv_window) -> split q | k | v;
    beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias); the delta rule from `state`;
    per value head o * rsqrt(mean(o^2) + eps) * w * silu(z) (plain w); out_proj.

    Args:
        x_TD: [T, D] normed hidden states of the sequence's new tokens.
        conv_window_CW: [C, W] the last W pre-conv inputs before these tokens; None = zeros.
        state_HKV: [H, K, V] incoming recurrent state; None = zeros.
    Returns:
        out_TD fp32, the new conv window [C, W] and the new state [H, K, V] (both fp32).
    """
    x_TD = x_TD.float()
    t = x_TD.shape[0]
    hk, h = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    kd, vd = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    qkv_TC = x_TD @ _f32(w.in_proj_qkv).T
    z_THV = (x_TD @ _f32(w.in_proj_z).T).view(t, h, vd)
    b_TH = x_TD @ _f32(w.in_proj_b).T
    a_TH = x_TD @ _f32(w.in_proj_a).T

    left = None if conv_window_CW is None else conv_window_CW[None]
    mixed_TC, window_1CW = causal_conv_reference(qkv_TC, weight_CK=w.conv1d, left_context_BCW=left)
    q_THK = mixed_TC[:, : hk * kd].view(t, hk, kd)
    k_THK = mixed_TC[:, hk * kd : 2 * hk * kd].view(t, hk, kd)
    v_THV = mixed_TC[:, 2 * hk * kd :].view(t, h, vd)

    beta_TH = torch.sigmoid(b_TH)
    g_TH = -torch.exp(w.A_log.float()) * _softplus(a_TH + w.dt_bias.float())

    state = torch.zeros(h, kd, vd) if state_HKV is None else state_HKV
    o_1THV, state_1HKV = gated_delta_rule_reference(
        q_THK[None],
        k_BTHK=k_THK[None],
        v_BTHV=v_THV[None],
        g_BTH=g_TH[None],
        beta_BTH=beta_TH[None],
        state_BHKV=state[None],
    )
    normed_THV = _rms_normalize(o_1THV[0], cfg.rms_norm_eps) * w.norm.float() * _silu(z_THV)
    out_TD = normed_THV.reshape(t, h * vd) @ _f32(w.out_proj).T
    return out_TD, window_1CW[0], state_1HKV[0]


# ------------------------------------------------------------------------------ rope
def mrope_reference(
    x_THD: torch.Tensor,
    *,
    positions_3T: torch.Tensor,
    rotary_dim: int,
    theta: float,
    mrope_section: tuple[int, int, int],
) -> torch.Tensor:
    """Partial interleaved MRoPE (model_spec §2.4.3), one frequency at a time.

    Frequency j (of rotary_dim / 2) rotates the pair (j, j + rotary_dim / 2) by
    pos_axis(j) * theta**(-2j / rotary_dim), where axis(j) = H if j % 3 == 1 and j < 3 * sec_H,
    W if j % 3 == 2 and j < 3 * sec_W, else T. Dims from rotary_dim on pass through.

    Args:
        x_THD: [T, H, head_dim]; positions_3T: [3, T] (rows T, H, W).
    Returns:
        [T, H, head_dim] fp32.
    """
    out = x_THD.float().clone()
    half = rotary_dim // 2
    for t in range(x_THD.shape[0]):
        for j in range(half):
            if j % 3 == 1 and j < 3 * mrope_section[1]:
                axis = 1
            elif j % 3 == 2 and j < 3 * mrope_section[2]:
                axis = 2
            else:
                axis = 0
            inv_freq = 1.0 / (theta ** (torch.tensor(2 * j, dtype=torch.float32) / rotary_dim))
            angle = positions_3T[axis, t].float() * inv_freq
            cos, sin = torch.cos(angle), torch.sin(angle)
            x1, x2 = x_THD[t, :, j].float(), x_THD[t, :, j + half].float()
            out[t, :, j] = x1 * cos - x2 * sin
            out[t, :, j + half] = x2 * cos + x1 * sin
    return out


# ------------------------------------------------------------------------------ attention
def attention_reference(
    x_TD: torch.Tensor,
    *,
    w: AttentionWeights,
    cfg: ModelConfig,
    positions_3T: torch.Tensor,
    past_k_SHD: torch.Tensor | None = None,
    past_v_SHD: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated attention for ONE sequence (model_spec §2.4).

    q_proj gives per head [query | gate]; q, k get zero-centred RMSNorm (1 + w) over the head
    dim, then partial MRoPE; query head h uses KV head h // (H / Hkv); each query attends to
    every earlier key (cached ones first) with an explicit softmax; out * sigmoid(gate); o_proj.

    Args:
        x_TD: [T, D] normed hidden states of the new tokens.
        positions_3T: [3, T] MRoPE positions of the new tokens.
        past_k_SHD, past_v_SHD: [S, Hkv, hd] post-RoPE keys / values already cached; None = none.
    Returns:
        out_TD fp32, and all keys / values [S + T, Hkv, hd] (post-RoPE) fp32.
    """
    x_TD = x_TD.float()
    t_count = x_TD.shape[0]
    h, hkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    qg_THD2 = (x_TD @ _f32(w.q_proj).T).view(t_count, h, 2 * hd)
    query_THD, gate_THD = qg_THD2[..., :hd], qg_THD2[..., hd:]
    k_THD = (x_TD @ _f32(w.k_proj).T).view(t_count, hkv, hd)
    v_THD = (x_TD @ _f32(w.v_proj).T).view(t_count, hkv, hd)
    query_THD = _rms_normalize(query_THD, eps) * (1.0 + w.q_norm.float())
    k_THD = _rms_normalize(k_THD, eps) * (1.0 + w.k_norm.float())
    rope: dict[str, Any] = dict(
        positions_3T=positions_3T, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta, mrope_section=cfg.mrope_section
    )
    query_THD, k_THD = mrope_reference(query_THD, **rope), mrope_reference(k_THD, **rope)

    past = 0 if past_k_SHD is None else past_k_SHD.shape[0]
    keys_SHD = k_THD if past_k_SHD is None else torch.cat([past_k_SHD.float(), k_THD])
    values_SHD = v_THD if past_v_SHD is None else torch.cat([past_v_SHD.float(), v_THD])
    group = h // hkv
    out_THD = torch.zeros(t_count, h, hd)
    for t in range(t_count):
        visible = past + t + 1  # causal: keys 0 .. past + t
        for head in range(h):
            kv = head // group
            scores_S = keys_SHD[:visible, kv] @ query_THD[t, head] / math.sqrt(hd)
            probs_S = torch.exp(scores_S - scores_S.max())
            probs_S = probs_S / probs_S.sum()
            out_THD[t, head] = probs_S @ values_SHD[:visible, kv]
    gated = out_THD * torch.sigmoid(gate_THD)
    return gated.reshape(t_count, h * hd) @ _f32(w.o_proj).T, keys_SHD, values_SHD


# ------------------------------------------------------------------------------ MoE
def route_reference(x_TD: torch.Tensor, *, router_ED: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32), the top_k largest in descending order, renormalised.

    Ties go to the lower expert id (a stable sort); random tests avoid ties.
    Returns:
        topk_ids_Tk int64 and topk_weights_Tk fp32 (each row sums to 1).
    """
    logits_TE = x_TD.float() @ router_ED.float().T
    ids, weights = [], []
    for logits_E in logits_TE:
        probs_E = torch.exp(logits_E - logits_E.max())
        probs_E = probs_E / probs_E.sum()
        order = sorted(range(len(probs_E)), key=lambda e: -probs_E[e].item())[:top_k]
        picked = probs_E[order]
        ids.append(order)
        weights.append(picked / picked.sum())
    return torch.tensor(ids, dtype=torch.long), torch.stack(weights)


def expert_reference(x_D: torch.Tensor, *, gate_up_2ID: Weight, down_DI: Weight) -> torch.Tensor:
    """One SwiGLU expert on one token: down(silu(gate x) * up x), gate rows first in gate_up."""
    gate_up = _f32(gate_up_2ID)
    inter = gate_up.shape[0] // 2
    x_D = x_D.float()
    return _f32(down_DI) @ (_silu(gate_up[:inter] @ x_D) * (gate_up[inter:] @ x_D))


def moe_reference(
    x_TD: torch.Tensor,
    *,
    shared: SharedMoEWeights,
    gate_up_E2ID: Weight,
    down_EDI: Weight,
    top_k: int,
) -> torch.Tensor:
    """The whole sparse MoE block (model_spec §2.5), token by token, slot by slot.

    y_t = sum_j w_tj * expert_{e_tj}(x_t) + sigmoid(shared_expert_gate . x_t) * shared(x_t).

    Args:
        x_TD: [T, D] normed hidden states.
        shared: router, shared expert and its gate.
        gate_up_E2ID: [E, 2I, D]; down_EDI: [E, D, I] (plain or FP8).
    Returns:
        [T, D] fp32.
    """
    ids_Tk, weights_Tk = route_reference(x_TD, router_ED=shared.router, top_k=top_k)
    gate_up, down = _f32(gate_up_E2ID), _f32(down_EDI)
    shared_gate_up = torch.cat([_f32(shared.shared_gate_proj), _f32(shared.shared_up_proj)])
    out_TD = torch.zeros(x_TD.shape)
    for t, x_D in enumerate(x_TD.float()):
        for j in range(top_k):
            e = int(ids_Tk[t, j])
            out_TD[t] += weights_Tk[t, j] * expert_reference(x_D, gate_up_2ID=gate_up[e], down_DI=down[e])
        gate = torch.sigmoid(shared.shared_expert_gate.float()[0] @ x_D)
        out_TD[t] += gate * expert_reference(x_D, gate_up_2ID=shared_gate_up, down_DI=shared.shared_down_proj)
    return out_TD
