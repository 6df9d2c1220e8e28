"""Rotary position embeddings of the text model: partial, interleaved 3-D MRoPE (model_spec §2.4.3).

Only the first `rotary_dim` dims of each head rotate (NeoX rotate_half inside them); the
frequency j takes its angle from axis H if j % 3 == 1 (j < 3*sec_h), W if j % 3 == 2
(j < 3*sec_w), else T. For text, all three position rows are equal (plain 1-D RoPE).
Mirrors `Qwen3_5MoeTextRotaryEmbedding` + `apply_rotary_pos_emb` (cos/sin computed in fp32,
cast to the model dtype, rotation in the model dtype). Tests: tests/model_shards/test_blocks.py.
"""

from __future__ import annotations

import torch


def inv_frequencies(*, rotary_dim: int, theta: float) -> torch.Tensor:
    """[rotary_dim / 2] fp32 inverse frequencies, same expression as HF's default rope init."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def mrope_cos_sin(
    positions_3T: torch.Tensor, *, inv_freq: torch.Tensor, mrope_section: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for packed tokens.

    Args:
        positions_3T: [3, T] int positions on the (T, H, W) axes.
        inv_freq: [F] fp32, F = rotary_dim / 2.
    Returns:
        cos, sin: [T, rotary_dim] in `dtype`.
    """
    freqs = positions_3T[..., None].float() * inv_freq.to(positions_3T.device)  # [3, T, F]
    return _interleave(freqs.cos(), mrope_section).to(dtype), _interleave(freqs.sin(), mrope_section).to(dtype)


def _interleave(f_3TF: torch.Tensor, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    out = f_3TF[0].clone()
    for axis in (1, 2):
        idx = slice(axis, mrope_section[axis] * 3, 3)
        out[..., idx] = f_3TF[axis, ..., idx]
    return torch.cat((out, out), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rope(x_THD: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim dims of every head; the rest pass through.

    Args:
        x_THD: [T, H, head_dim].
        cos, sin: [T, rotary_dim] in x's dtype.
    """
    rd = cos.shape[-1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rot, rest = x_THD[..., :rd], x_THD[..., rd:]
    return torch.cat(((rot * cos) + (rotate_half(rot) * sin), rest), dim=-1)
