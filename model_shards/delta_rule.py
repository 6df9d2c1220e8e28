"""The gated delta rule: chunked (prefill) and recurrent (decode) forms, batched over sequences.

Legend: B sequences, T tokens (padded per batch), H value heads, Hk key heads, K key dim,
V value dim. State S [B, H, K, V] is fp32.
- `chunk_gated_delta_rule` mirrors HF's `torch_chunk_gated_delta_rule` op for op (C = 64,
  UT transform by `solve_triangular`, q scaled by K**-0.5), so chunk-aligned resumption
  is bit-identical to a one-shot prefill.
- `recurrent_gated_delta_rule` mirrors `torch_recurrent_gated_delta_rule` (q divided by
  sqrt(K); S^T k and S^T q as elementwise products summed over K).
Sequences shorter than T are right-padded with k = v = 0, beta = 0, g = 0: a padded step
decays by exp(0) = 1 and writes nothing, so the final state is exact.
Naive per-token reference: model_shards/reference.py. Tests: tests/model_shards/test_delta_rule.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64


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
    b, t, hk = q_BTHK.shape[:3]
    q, k, v, beta, g = _prepare(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)
    q = q * (q.shape[-1] ** -0.5)
    h, kd, vd = v.shape[1], q.shape[-1], v.shape[-1]

    pad = (CHUNK - t % CHUNK) % CHUNK
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    n = (t + pad) // CHUNK

    # Q K^T depends on key heads only: one matmul per key head, then repeated (same bits as HF's
    # product of repeated heads).
    q, k = (x.reshape(b, hk, n, CHUNK, kd) for x in (q, k))
    qk = q @ k.transpose(-1, -2)
    if h != hk:
        q, k, qk = (x.repeat_interleave(h // hk, dim=1) for x in (q, k, qk))
    v_beta = v.reshape(b, h, n, CHUNK, vd) * beta.reshape(b, h, n, CHUNK, 1)
    k_beta = k * beta.reshape(b, h, n, CHUNK, 1)
    g = g.reshape(b, h, n, CHUNK)
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)

    gamma = g.cumsum(dim=3)  # log decay from chunk start to each position
    decay = (gamma.unsqueeze(4) - gamma.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()  # Γ_ij, j <= i
    a_mat = (k_beta @ k.transpose(-1, -2)) * decay
    qk = qk * decay
    k_beta_decayed = k_beta * gamma.exp().unsqueeze(-1)
    # UT transform: (I + strictly_lower(A)) U = βV and (I + strictly_lower(A)) W = βK e^γ.
    u = torch.linalg.solve_triangular(a_mat, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a_mat, k_beta_decayed, upper=False, unitriangular=True)

    state = state_BHKV.to(u)
    out = torch.empty_like(u)
    q = q * gamma.exp().unsqueeze(-1)
    k_t = (k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)).transpose(-1, -2)
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + qk[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k_t[:, :, i] @ v_new

    out = out.reshape(b, h, -1, vd)[:, :, :t]
    return out.transpose(1, 2).to(out_dtype, memory_format=torch.contiguous_format), state


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
