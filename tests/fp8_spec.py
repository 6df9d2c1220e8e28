"""Block-wise FP8 dequantisation as model_spec §5.3 defines it, written independently of model_shards.quant.

W[..., i, j] = float(W_fp8[..., i, j]) * scale_inv[..., i // br, j // bc], computed one block at a time in fp32
(the spec's `.float()`): the oracle for every test of FP8 weights, so none compares the code's dequantize
with itself.
"""

from __future__ import annotations

import torch


def dequant_per_spec(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    out = torch.empty(data.shape, dtype=torch.float32)
    for i in range(-(-data.shape[-2] // br)):
        for j in range(-(-data.shape[-1] // bc)):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[..., rows, cols] = data[..., rows, cols].float() * scale_inv[..., i, j, None, None].float()
    return out
