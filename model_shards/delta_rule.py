"""The gated delta rule: chunked (prefill) and recurrent (decode) forms, batched over sequences.

Legend: B sequences, T tokens (padded per batch), H value heads, Hk key heads, K key dim,
V value dim. State S [B, H, K, V] is fp32.
- `chunk_gated_delta_rule` mirrors HF's `torch_chunk_gated_delta_rule` op for op (C = 64,
  UT transform by `solve_triangular`, q scaled by K**-0.5), so chunk-aligned resumption
  is bit-identical to a one-shot prefill.
- `recurrent_gated_delta_rule` mirrors `torch_recurrent_gated_delta_rule` (q divided by
  sqrt(K); S^T k and S^T q as elementwise products summed over K).
Both give HF's bits with less work: q and k stay on key heads and broadcast over value heads
(HF repeats them), the chunked form is laid out chunk-major and skips exps that underflow to
0, a one-token step skips the time loop.
Sequences shorter than T are right-padded with k = v = 0, beta = 0, g = 0: a padded step
decays by exp(0) = 1 and writes nothing, so the final state is exact.
Naive per-token reference: model_shards/reference.py. Tests: tests/model_shards/test_delta_rule.py
(against HF bit for bit) and test_fast_paths.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64
_EXP_UNDERFLOW = -104.0  # exp(x) rounds to +0 in float32 for every x below this (e^-103.97 = 2^-150)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps): eps inside the rsqrt of the *sum* (FLA's in-kernel l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(
    q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, g_BTH: torch.Tensor, beta_BTH: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Move heads before time, upcast to fp32, l2-normalise q and k.

    q and k stay on their Hk key heads: HF expands them to value heads first, but the row-wise
    l2norm (and any per-element scaling) of a repeated row is the same bits, so callers expand
    (or broadcast) afterwards and do 1/r of the work.
    """
    q, k, v, beta, g = [
        t.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for t in (q_BTHK, k_BTHK, v_BTHV, beta_BTH, g_BTH)
    ]
    return l2norm(q), l2norm(k), v, beta, g


def _exp_lower(x: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """exp(x) below and on the diagonal, 0 above it (HF: masked_fill(upper, -inf).exp()), in place.

    Same bits, faster: every x < -104 (and the masked -inf) has exp(x) == +0 exactly in float32
    (below half the smallest subnormal, in Sleef and in libm), but computing it takes a slow
    underflow path; those entries are set to 0 before the exp and back to +0 after.
    """
    zero = (x < _EXP_UNDERFLOW).logical_or_(upper)
    return x.masked_fill_(zero, 0.0).exp_().masked_fill_(zero, 0.0)


def chunk_gated_delta_rule(
    q_BTHK: torch.Tensor,
    *,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule (prefill and chunked-prefill continuation).

    Args:
        q_BTHK, k_BTHK: [B, T, Hk, K] post-conv query/key (model dtype, not yet normalised).
        v_BTHV: [B, T, H, V].
        g_BTH: [B, T, H] fp32 log-decay (<= 0). beta_BTH: [B, T, H] write strength.
        state_BHKV: [B, H, K, V] fp32 incoming state (zeros for a fresh sequence).
    Returns:
        out_BTHV in q's dtype, final state [B, H, K, V] fp32.
    """
    out_dtype = q_BTHK.dtype
    b, t, hk, kd = q_BTHK.shape
    h, vd = v_BTHV.shape[2:]
    r = h // hk
    pad = (CHUNK - t % CHUNK) % CHUNK
    n = (t + pad) // CHUNK

    def chunk_major(x: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, T, heads, D] (any strides) -> contiguous fp32 [n, B, heads, C, D], time zero-padded to n * C.

        Warning: `.to(float32, memory_format=contiguous_format)` returns an fp32 input as is, strides
        included; reductions over D must see stride 1 (as in HF's layout) to give HF's bits.
        """
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(b, n, CHUNK, heads, -1).permute(1, 0, 3, 2, 4).to(torch.float32).contiguous()

    # Layout [n, B, Hk, r, C, ...]: chunk-major, so the sequential loop reads contiguous chunks; value
    # heads as [Hk, r], so q and k stay on key heads and broadcast over the r value heads of their key
    # head (HF repeats them first; the products are the same, so are the bits). Large temporaries are
    # updated in place.
    q = (l2norm(chunk_major(q_BTHK, hk)) * kd**-0.5).unsqueeze(3)  # [n, B, Hk, 1, C, K]
    k = l2norm(chunk_major(k_BTHK, hk)).unsqueeze(3)
    v = chunk_major(v_BTHV, h).view(n, b, hk, r, CHUNK, vd)
    beta = chunk_major(beta_BTH.unsqueeze(-1), h).view(n, b, hk, r, CHUNK, 1)
    gamma = chunk_major(g_BTH.unsqueeze(-1), h).view(n, b, hk, r, CHUNK).cumsum(dim=-1)  # decay from chunk start
    v_beta = v * beta
    k_beta = k * beta
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)

    decay = gamma.unsqueeze(-1) - gamma.unsqueeze(-2)
    decay = _exp_lower(decay, upper)  # Γ_ij, j <= i
    a_mat = (k_beta @ k.transpose(-1, -2)).mul_(decay)
    qk = (q @ k.transpose(-1, -2)) * decay
    gamma_exp = gamma.exp().unsqueeze(-1)
    # UT transform: (I + strictly_lower(A)) U = βV and (I + strictly_lower(A)) W = βK e^γ.
    u = torch.linalg.solve_triangular(a_mat, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a_mat, k_beta.mul_(gamma_exp), upper=False, unitriangular=True)

    state = state_BHKV.to(torch.float32).view(b, hk, r, kd, vd)
    out = torch.empty_like(u)
    q = q * gamma_exp
    k_t = (k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)).transpose(-1, -2)
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    for i in range(n):
        v_new = u[i] - w[i] @ state
        out[i] = q[i] @ state + qk[i] @ v_new
        state = state * chunk_decay[i] + k_t[i] @ v_new

    out = out.view(n, b, h, CHUNK, vd).permute(1, 0, 3, 2, 4).reshape(b, n * CHUNK, h, vd)[:, :t]
    return out.to(out_dtype, memory_format=torch.contiguous_format), state.view(b, h, kd, vd)


def recurrent_gated_delta_rule(
    q_BTHK: torch.Tensor,
    *,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
    keep_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token gated delta rule (decode; also speculative verification).

    Same arguments as `chunk_gated_delta_rule`. Value heads are viewed as [Hk, r] so q and k
    broadcast over the r value heads of their key head instead of being repeated (the same
    elementwise products and K-sums as HF's repeated heads, so the same bits).
    Args:
        keep_states: return the state after *every* token, [B, T, H, K, V], instead of the last
            one (what speculative decoding rolls back to).
    Returns:
        out_BTHV in q's dtype, state [B, H, K, V] (or [B, T, H, K, V] with keep_states), fp32.
    """
    out_dtype = q_BTHK.dtype
    b, t, hk, kd = q_BTHK.shape
    h, vd = v_BTHV.shape[2:]
    r = h // hk
    if t == 1 and not keep_states:
        return _recurrent_one_token(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV)
    q, k, v, beta, g = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)
    q = (q / (kd**0.5)).view(b, hk, 1, t, kd, 1)
    k = k.view(b, hk, 1, t, kd, 1)
    v, beta = v.view(b, hk, r, t, vd), beta.view(b, hk, r, t, 1)
    g = g.view(b, hk, r, t, 1, 1)
    state = state_BHKV.to(v).view(b, hk, r, kd, vd)
    outs, kept = [], []
    for i in range(t):
        state = state * g[:, :, :, i].exp()
        predicted = (state * k[:, :, :, i]).sum(dim=-2)  # S^T k
        delta = (v[:, :, :, i] - predicted) * beta[:, :, :, i]
        state = state + k[:, :, :, i] * delta.unsqueeze(-2)
        outs.append((state * q[:, :, :, i]).sum(dim=-2))  # [B, Hk, r, V]
        if keep_states:
            kept.append(state.view(b, h, kd, vd))
    out = outs[0].view(b, 1, h, vd) if t == 1 else torch.stack(outs, dim=1).view(b, t, h, vd)
    return out.to(out_dtype), (torch.stack(kept, dim=1) if keep_states else state.view(b, h, kd, vd))


def _recurrent_one_token(
    q_B1HK: torch.Tensor,
    k_B1HK: torch.Tensor,
    v_B1HV: torch.Tensor,
    g_B1H: torch.Tensor,
    beta_B1H: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`recurrent_gated_delta_rule` for T = 1 (a decode step): the loop body once, with no time axis
    to move, the new state updated in place and one scratch tensor for the three state-sized
    products (same ops on the same values, so the same bits)."""
    b, _, hk, kd = q_B1HK.shape
    h, vd = v_B1HV.shape[2:]
    r = h // hk
    q = (l2norm(q_B1HK.float()) / (kd**0.5)).view(b, hk, 1, kd, 1)
    k = l2norm(k_B1HK.float()).view(b, hk, 1, kd, 1)
    state = state_BHKV.to(torch.float32).view(b, hk, r, kd, vd) * g_B1H.float().exp().view(b, hk, r, 1, 1)
    scratch = torch.mul(state, k)
    predicted = scratch.sum(dim=-2)  # S^T k
    delta = (v_B1HV.float().view(b, hk, r, vd) - predicted) * beta_B1H.float().view(b, hk, r, 1)
    state.add_(torch.mul(k, delta.unsqueeze(-2), out=scratch))
    out = torch.mul(state, q, out=scratch).sum(dim=-2)  # [B, Hk, r, V]
    return out.view(b, 1, h, vd).to(q_B1HK.dtype), state.view(b, h, kd, vd)
