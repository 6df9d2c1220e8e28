"""The two RMSNorms of Qwen3.5 (model_spec §2.2), written to HF's exact op order.

- `rms_norm_zc`: zero-centred, y = (x_f32 * rsqrt(mean(x_f32^2) + eps) * (1 + w_f32)).to(x.dtype).
  Mirrors `Qwen3_5MoeRMSNorm` (input/post-attention/final/q/k/MTP norms). `rms_norm_zc_scaled`
  takes the fp32 (1 + w) precomputed (the weights keep it, see `zc_scale`).
- `rms_norm_gated`: y = (w * normed.to(dtype)) * silu(z_f32), cast back. Plain `w`, not `1 + w`.
  Mirrors `Qwen3_5MoeRMSNormGated` (the DeltaNet output norm).
Tests: tests/model_shards/test_blocks.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_zc(x: torch.Tensor, *, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm over the last dim: the (1 + w) multiply happens in fp32 before the cast.

    Args:
        x: [..., D] any float dtype.
        weight: [D], stored zero-centred (values near 0).
    Returns:
        [..., D] in x.dtype.
    """
    return rms_norm_zc_scaled(x, scale=zc_scale(weight), eps=eps)


def zc_scale(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 multiplier (1 + w) of a zero-centred norm weight [D]."""
    return 1.0 + weight.float()


def rms_norm_zc_scaled(x: torch.Tensor, *, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_zc` with `scale` = zc_scale(weight) given.

    NOTE: F.rms_norm on CPU is the composite x * rsqrt(x.pow(2).mean(-1) + eps), the same ops as
    HF's module in one call (bit-identical; tests/model_shards/test_blocks.py checks against HF).
    """
    return (F.rms_norm(x.float(), x.shape[-1:], eps=eps) * scale).type_as(x)


def rms_norm_gated(x: torch.Tensor, *, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gated RMSNorm over the last dim (per DeltaNet value head).

    Warning: the normalised value is rounded to x.dtype *before* the weight multiply (HF order).

    Args:
        x: [..., V] the delta-rule output in model dtype.
        gate: [..., V] z projection.
        weight: [V], initialised to ones.
    Returns:
        [..., V] in x.dtype.
    """
    dtype = x.dtype
    xf = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    y = weight * xf.to(dtype)
    y = y * F.silu(gate.float())
    return y.to(dtype)
