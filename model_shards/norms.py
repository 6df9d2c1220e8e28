"""The two RMSNorms of Qwen3.5 (model_spec §2.2), written to HF's exact op order.

- `rms_norm_zc`: zero-centred, y = (x_f32 * rsqrt(mean(x_f32^2) + eps) * (1 + w_f32)).to(x.dtype).
  Mirrors `Qwen3_5MoeRMSNorm` (input/post-attention/final/q/k/MTP norms).
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
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x)


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
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(dtype)
    y = y * F.silu(gate.float())
    return y.to(dtype)
