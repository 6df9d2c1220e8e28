"""Block-wise FP8 (e4m3, one scale per 128 x 128 block): quantise, dequantise, concatenate, stack.

Proves: a round trip stays within the e4m3 rounding bound of every element under its own
block's scale (so per-block scales are really per block), exact grid values survive exactly,
the scale dtype asked for is the one stored, odd shapes (not multiples of the block) work,
and `concat_rows` of parts whose row counts are not block multiples (gate and up of 64 rows
with 128-row blocks) keeps every row's own scale. Dequantisation and `linear` are checked against
`dequant_per_spec` (tests/fp8_spec.py), model_spec §5.3's definition written block by block
(W[i, j] = W_fp8[i, j] * scale_inv[i // br, j // bc]), never against the code's own dequantize.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_shards.quant import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Weight,
    concat_rows,
    dense,
    dequantize_blockwise,
    linear,
    quantize_blockwise,
    stack,
)
from tests.fp8_spec import dequant_per_spec

BLOCK = (128, 128)
# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half an ulp,
# 2^-4 of its magnitude; below the smallest normal (2^-6) the grid step is 2^-9, half of it 2^-10.
# In weight units both scale by the block's stored scale s: |w - deq| <= 2^-4 |w| + 2^-10 s.
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10


def _report(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"max |diff| {d.max().item():.3g}, mean |diff| {d.mean().item():.3g}"


def _blocky_weight(shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """Random weight whose 128 x 128 blocks differ in magnitude by up to 10^6: one scale for the whole
    tensor would flush the small blocks to zero, one per block keeps them."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    rows, cols = -(-shape[-2] // BLOCK[0]), -(-shape[-1] // BLOCK[1])
    mag = 10.0 ** torch.randint(-3, 4, (*shape[:-2], rows, cols), generator=gen).float()
    full = mag.repeat_interleave(BLOCK[0], dim=-2).repeat_interleave(BLOCK[1], dim=-1)
    return w * full[..., : shape[-2], : shape[-1]]


def _expanded(scale_blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return (
        scale_blocks.float()
        .repeat_interleave(BLOCK[0], dim=-2)
        .repeat_interleave(BLOCK[1], dim=-1)[..., : shape[-2], : shape[-1]]
    )


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """[..., ceil(out/128), ceil(in/128)] max |w| of every block, computed block by block."""
    rows, cols = -(-w.shape[-2] // BLOCK[0]), -(-w.shape[-1] // BLOCK[1])
    out = torch.zeros(*w.shape[:-2], rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[..., i * BLOCK[0] : (i + 1) * BLOCK[0], j * BLOCK[1] : (j + 1) * BLOCK[1]]
            out[..., i, j] = blk.abs().amax(dim=(-2, -1))
    return out


@pytest.mark.parametrize(
    "shape",
    [(256, 384), (200, 300), (3, 130, 70), (64, 128), (1, 5)],
    ids=["blocks2x3", "odd200x300", "experts3x130x70", "half-block64x128", "tiny1x5"],
)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=["bf16-scale", "fp32-scale"])
def test_round_trip_within_e4m3_bound(shape: tuple[int, ...], scale_dtype: torch.dtype) -> None:
    """Scale = block amax / 448 (rounded to the scale dtype), and every element within the e4m3 bound of
    its own block (measured worst err / bound 0.94; error <= 0.036 of the block max, well inside 2^-3)."""
    w = _blocky_weight(shape, seed=sum(shape))
    data, scale = quantize_blockwise(w, block=BLOCK, scale_dtype=scale_dtype)
    assert data.dtype == FP8_DTYPE and data.shape == w.shape
    assert scale.dtype == scale_dtype
    assert scale.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    want_scale = _block_amax(w) / FP8_MAX
    rel = 2.0**-8 if scale_dtype == torch.bfloat16 else 1e-7  # one rounding to the scale dtype
    torch.testing.assert_close(scale.float(), want_scale, rtol=rel, atol=0)

    deq = dequantize_blockwise(data, scale, block=BLOCK, dtype=torch.float32)
    assert torch.equal(deq, dequant_per_spec(data, scale, BLOCK)), "dequantize differs from model_spec §5.3"
    bound = E4M3_REL * w.abs() + E4M3_SUBNORMAL_HALF_STEP * _expanded(scale, w.shape)
    err = (deq - w).abs()
    worst = (err / bound).max().item()
    assert bool((err <= bound).all()), f"error exceeds the e4m3 bound (worst err/bound {worst:.3g}); {_report(deq, w)}"
    assert bool((err <= 2.0**-3 * _expanded(_block_amax(w), w.shape)).all()), "error above 2^-3 of the block max"


def test_exact_grid_values_survive_and_scale_is_block_amax_over_448() -> None:
    """A block whose values are e4m3 grid points times 2 (amax 896 -> scale 2) comes back exactly; an
    all-zero block gives zeros (no 0/0)."""
    grid = torch.tensor([448.0, -1.0, 0.5, 3.5, -0.015625, 240.0, 0.0, 1.125])
    w = torch.zeros(128, 256)
    w[0, :8] = 2 * grid
    data, scale = quantize_blockwise(w, block=BLOCK)
    assert scale[0, 0].item() == 2.0  # 896 / 448
    assert scale[0, 1].item() > 0  # all-zero block: clamped, never 0
    deq = dequantize_blockwise(data, scale, block=BLOCK, dtype=torch.float32)
    assert torch.equal(deq, w), _report(deq, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_dtype_and_linear_against_the_spec(dtype: torch.dtype) -> None:
    w = _blocky_weight((192, 160), seed=1)
    fp8 = Fp8Weight(*quantize_blockwise(w, block=BLOCK), BLOCK)
    want = dequant_per_spec(fp8.data, fp8.scale_inv, BLOCK).to(dtype)
    deq = fp8.dequantize(dtype)
    assert deq.dtype == dtype and torch.equal(deq, want)
    assert torch.equal(dense(fp8, dtype), want)
    x = torch.randn(4, 160).to(dtype)
    # y = x W^T with W the spec's dequantised weight in x's dtype (the same torch matmul on both sides)
    assert torch.equal(linear(x, fp8), F.linear(x, want))
    torch.testing.assert_close(linear(x, fp8).double(), x.double() @ want.double().T, **_tol(dtype))
    plain = w.to(dtype)
    assert torch.equal(linear(x, plain), F.linear(x, plain))
    assert fp8.nbytes == 192 * 160 * 1 + 2 * 2 * 2  # fp8 data + 2 x 2 bf16 scales


@pytest.mark.parametrize("shape", [(256, 128), (3, 256, 384)], ids=["2d", "stacked-experts"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_whole_blocks_against_the_spec(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Shapes that are whole blocks take the in-place blocked-view path: still the spec's bits."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, shape[-1])
    fp8 = Fp8Weight(*quantize_blockwise(w, block=BLOCK, scale_dtype=torch.float32), BLOCK)
    want = dequant_per_spec(fp8.data, fp8.scale_inv, BLOCK).to(dtype)
    assert torch.equal(fp8.dequantize(dtype), want), _report(fp8.dequantize(dtype), want)
    if len(shape) == 3:
        assert torch.equal(fp8.expert(1).dequantize(dtype), want[1])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1.0}


@pytest.mark.parametrize(
    "rows",
    [(64, 64), (100, 60), (128, 64), (200, 56)],
    ids=["gate64+up64", "rows100+60", "rows128+64", "rows200+56"],
)
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "stacked-experts"])
def test_concat_rows_keeps_each_parts_scale(rows: tuple[int, int], lead: tuple[int, ...]) -> None:
    """Parts quantised separately (each with its own scales), then concatenated along the output dim:
    the concatenation dequantises to exactly the concatenation of the dequantised parts."""
    parts = [
        Fp8Weight(*quantize_blockwise(_blocky_weight((*lead, r, 200), seed=r + 7 * i), block=BLOCK), BLOCK)
        for i, r in enumerate(rows)
    ]
    cat = concat_rows(parts)
    want = torch.cat([dequant_per_spec(p.data, p.scale_inv, p.block) for p in parts], dim=-2)
    got = dequant_per_spec(cat.data, cat.scale_inv, cat.block)
    assert cat.data.shape == (*lead, sum(rows), 200)
    assert torch.equal(got, want), f"dequant(concat) != concat(dequant): {_report(got, want)}"
    if rows == (64, 64):
        # gate and up of 64 rows each under 128-row blocks: the scales are re-expressed on 64-row blocks
        assert cat.block == (64, 128) and cat.scale_inv.shape == (*lead, 2, 2)


def test_stack_and_select_keep_scales() -> None:
    parts = [Fp8Weight(*quantize_blockwise(_blocky_weight((130, 70), seed=s), block=BLOCK), BLOCK) for s in range(3)]
    stacked = stack(parts)
    assert stacked.data.shape == (3, 130, 70) and stacked.scale_inv.shape == (3, 2, 1)
    picked = stacked.select(torch.tensor([2, 0]))
    got = dequant_per_spec(picked.data, picked.scale_inv, picked.block)
    assert torch.equal(got[0], dequant_per_spec(parts[2].data, parts[2].scale_inv, BLOCK))
    assert torch.equal(got[1], dequant_per_spec(parts[0].data, parts[0].scale_inv, BLOCK))
