"""Block-wise FP8 weights: the in-memory type, dequantisation on use, and quantisation.

Owns: `Fp8Weight` (float8_e4m3fn data + `weight_scale_inv` per [rows x cols] block, kept
FP8 in memory so a rank's bytes match the checkpoint) and `linear()`, the one matmul entry
point that accepts plain or FP8 weights. Must not: hold model structure.
Tests: tests/model_shards/test_quant.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 weight with one scale per block: W ~= data.float() * scale_inv[i // br, j // bc].

    Despite its checkpoint name, `scale_inv` is the multiplier (model_spec §5.3).

    Attributes:
        data: float8_e4m3fn [..., out, in] (leading dims stack experts).
        scale_inv: [..., ceil(out/br), ceil(in/bc)], dtype as stored in the file (bf16 or fp32).
        block: (br, bc), from `quantization_config.weight_block_size`.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale_inv.numel() * self.scale_inv.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blockwise(self.data, self.scale_inv, block=self.block, dtype=dtype)

    def expert(self, e: int) -> Fp8Weight:
        """Expert e of a stacked weight: views of its data and scales (no copy), still FP8."""
        return Fp8Weight(self.data[e], self.scale_inv[e], self.block)

    def select(self, index: torch.Tensor) -> Fp8Weight:
        """Rows of the leading (expert) dim, still FP8."""
        return Fp8Weight(self.data[index], self.scale_inv[index], self.block)


Weight = torch.Tensor | Fp8Weight


def dequantize_blockwise(
    data: torch.Tensor, scale_inv: torch.Tensor, *, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Expand per-block scales and multiply in fp32 (exact: e4m3 x bf16 fits fp32), then cast.

    Args:
        data: float8_e4m3fn [..., out, in].
        scale_inv: [..., ceil(out/br), ceil(in/bc)].
    Returns:
        [..., out, in] in `dtype`.
    """
    out_dim, in_dim = data.shape[-2:]
    br, bc = block
    if out_dim % br == 0 and in_dim % bc == 0:
        # Whole blocks: scale in place through a blocked view, so the only full-size temporary is
        # the fp32 copy itself (same products as the expanded-scale form below, so the same bits).
        w = data.float()
        w.view(*data.shape[:-2], out_dim // br, br, in_dim // bc, bc).mul_(scale_inv.float()[..., :, None, :, None])
        return w.to(dtype)
    scale = scale_inv.float().repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return (data.float() * scale[..., :out_dim, :in_dim]).to(dtype)


def quantize_blockwise(
    weight: torch.Tensor, *, block: tuple[int, int], scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise [..., out, in] to e4m3 with one scale per block (amax / 448, stored in `scale_dtype`).

    The division uses the scale as stored, so dequantising gives the nearest e4m3 grid point
    of each weight under its block's stored scale.
    """
    out_dim, in_dim = weight.shape[-2:]
    br, bc = block
    rows, cols = -(-out_dim // br), -(-in_dim // bc)
    padded = F.pad(weight.float(), (0, cols * bc - in_dim, 0, rows * br - out_dim))
    blocks = padded.unflatten(-2, (rows, br)).unflatten(-1, (cols, bc))  # [..., rows, br, cols, bc]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., rows, cols]
    scale = (amax / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    expanded = scale.float().repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :out_dim, :in_dim]
    data = (weight.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return data, scale


def concat_rows(parts: list[Fp8Weight]) -> Fp8Weight:
    """Concatenate FP8 weights along the output dim (e.g. gate and up of one expert).

    When a part's row count is not a multiple of the block rows, scales are re-expressed on
    the finer block gcd(rows, block_rows) so every row keeps the scale it was quantised with.
    """
    br, bc = parts[0].block
    fine = br
    for p in parts:
        fine = math.gcd(fine, p.data.shape[-2])
    scales = []
    for p in parts:
        rows = p.data.shape[-2]
        s = p.scale_inv.repeat_interleave(br // fine, dim=-2) if fine != br else p.scale_inv
        scales.append(s[..., : -(-rows // fine), :])
    return Fp8Weight(torch.cat([p.data for p in parts], dim=-2), torch.cat(scales, dim=-2), (fine, bc))


def stack(parts: list[Fp8Weight]) -> Fp8Weight:
    """Stack same-shaped FP8 weights along a new leading (expert) dim."""
    return Fp8Weight(torch.stack([p.data for p in parts]), torch.stack([p.scale_inv for p in parts]), parts[0].block)


def dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a plain tensor of `dtype` (dequantised if FP8)."""
    if isinstance(weight, Fp8Weight):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """y = x @ W.T for a plain or block-FP8 weight (FP8 is dequantised block-wise on use)."""
    if isinstance(weight, Fp8Weight):
        return F.linear(x, weight.dequantize(x.dtype))
    return F.linear(x, weight)
