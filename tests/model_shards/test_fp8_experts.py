"""FP8 routed experts computed one expert at a time (model_shards/fp8_experts.py).

Proves: `expert_ffn` on FP8 weights gives the same bits as the plain grouped GEMM over weights
dequantised by model_spec §5.3 (tests/fp8_spec.py, the independent oracle), for fp32 and bf16
activations, whole-block and odd shapes, experts with no rows, and mixed FP8 / plain weights; it
is within fp32 rounding of a float64 per-expert reference; and the extra memory it holds at once
(tests/live_bytes.py) stays under one expert's dequantised gate_up + down plus its activations,
while dequantising the hit experts up front (the previous code) exceeds that bound. The CUDA
block-scaled GEMM (`scaled_mm_linear`) is checked against the spec where a GPU with FP8 exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_shards.fp8_experts import scaled_mm_linear, sync_free_expert_ffn
from model_shards.moe import expert_ffn
from model_shards.quant import Fp8Weight, Weight, quantize_blockwise
from tests.fp8_spec import dequant_per_spec
from tests.live_bytes import LiveBytes

BLOCK = (128, 128)


def _fp8(w: torch.Tensor, block: tuple[int, int] = BLOCK) -> Fp8Weight:
    return Fp8Weight(*quantize_blockwise(w, block=block), block)


def _spec(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return dequant_per_spec(w.data, w.scale_inv, w.block).to(dtype) if isinstance(w, Fp8Weight) else w.to(dtype)


def _experts(e: int, d: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, d, generator=gen) * d**-0.5, torch.randn(e, d, i, generator=gen) * i**-0.5


def _rows(counts: list[int], d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "dims,fp8_down",
    [((256, 128), True), ((200, 72), True), ((256, 128), False)],
    ids=["whole-blocks", "odd-shapes", "plain-down"],
)
def test_fp8_expert_ffn_equals_grouped_gemm_over_spec_weights(
    dims: tuple[int, int], fp8_down: bool, dtype: torch.dtype
) -> None:
    d, i = dims
    gate_up, down = _experts(6, d, i, seed=1)
    fp8_gate_up = _fp8(gate_up)
    fp8_or_plain_down: Weight = _fp8(down) if fp8_down else down
    counts = [3, 0, 5, 1, 0, 7]  # two experts without rows
    x, counts_E = _rows(counts, d, seed=2)
    x = x.to(dtype)
    got = expert_ffn(x, counts_E=counts_E, gate_up=fp8_gate_up, down=fp8_or_plain_down)
    want = expert_ffn(
        x, counts_E=counts_E, gate_up=_spec(fp8_gate_up, dtype), down=_spec(fp8_or_plain_down, dtype)
    )  # the plain grouped GEMM, weights dequantised by the spec: same bits expected
    assert got.dtype == dtype and torch.equal(got, want), (got.float() - want.float()).abs().max()
    # and the value itself, against float64 per expert (fp32: accumulation rounding; bf16: output rounding)
    gu64, dn64 = _spec(fp8_gate_up, torch.float64), _spec(fp8_or_plain_down, torch.float64)
    start, ref = 0, torch.zeros(x.shape, dtype=torch.float64)
    for e, n in enumerate(counts):
        g, u = F.linear(x[start : start + n].double(), gu64[e]).chunk(2, dim=-1)
        ref[start : start + n] = F.linear(F.silu(g) * u, dn64[e])
        start += n
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_expert_ffn_holds_at_most_one_experts_dequantised_weights(dtype: torch.dtype) -> None:
    """32 experts, every one hit: the extra bytes alive at once stay under one expert's weights
    dequantised to fp32 (the widest temporary) plus the output and a few rows' activations."""
    e, d, i = 32, 256, 128
    gate_up, down = _experts(e, d, i, seed=3)
    fp8_gate_up, fp8_down = _fp8(gate_up), _fp8(down)
    x, counts_E = _rows([2] * e, d, seed=4)
    x = x.to(dtype)
    one_expert_fp32 = (2 * i * d + d * i) * 4
    out_bytes = x.numel() * x.element_size()
    activations = 2 * (2 * i + i + d) * 4 * 4  # the largest expert's rows (2) through gate_up, SwiGLU, down
    bound = one_expert_fp32 + out_bytes + activations
    with LiveBytes() as probe:
        expert_ffn(x, counts_E=counts_E, gate_up=fp8_gate_up, down=fp8_down)
    assert 0 < probe.peak <= bound, f"peak {probe.peak} B > one expert's bound {bound} B"
    # the probe can fail: the previous code dequantised every hit expert before one grouped GEMM
    with LiveBytes() as probe_all:
        all_gate_up, all_down = fp8_gate_up.dequantize(dtype), fp8_down.dequantize(dtype)
        expert_ffn(x, counts_E=counts_E, gate_up=all_gate_up, down=all_down)
    assert probe_all.peak > 4 * bound, f"whole-set dequantise peak {probe_all.peak} B"


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) or not hasattr(F, "scaled_mm"),
    reason="block-scaled FP8 GEMM needs CUDA SM90+ and torch's F.scaled_mm",
)
def test_scaled_mm_linear_matches_spec_within_activation_quantisation() -> None:
    """x @ W.T with e4m3 activations (1 x 128 blocks): each product moves by at most 2^-4 of |x_k w_k|
    (activation rounding) before fp32 accumulation, then one bf16 rounding of the output."""
    gen = torch.Generator().manual_seed(5)
    w = _fp8(torch.randn(384, 256, generator=gen) * 0.05)
    x = torch.randn(13, 256, generator=gen).to(torch.bfloat16)
    w_spec = dequant_per_spec(w.data, w.scale_inv, w.block).double()
    want = x.double() @ w_spec.T
    cuda_w = Fp8Weight(w.data.cuda(), w.scale_inv.cuda(), w.block)
    got = scaled_mm_linear(x.cuda(), cuda_w).cpu().double()
    bound = 2.0**-4 * (x.double().abs() @ w_spec.abs().T) + 2.0**-8 * want.abs() + 1e-6
    assert bool(((got - want).abs() <= bound).all()), ((got - want).abs() / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_sync_free_path_equals_the_per_expert_path(dtype: torch.dtype, chunk: int) -> None:
    """The device path (counts never read on the host: chunks of experts, rows rotated to the front on the
    device, grouped GEMM with device offsets) gives the per-expert path's values, run here on CPU."""
    d, i = 256, 128
    gate_up, down = _experts(6, d, i, seed=3)
    fp8_gate_up, fp8_down = _fp8(gate_up), _fp8(down)
    counts = [3, 0, 5, 1, 0, 7]
    x, counts_E = _rows(counts, d, seed=4)
    x = x.to(dtype)
    want = expert_ffn(x, counts_E=counts_E, gate_up=fp8_gate_up, down=fp8_down)  # per expert (CPU path)
    got = sync_free_expert_ffn(x, counts_E=counts_E, gate_up=fp8_gate_up, down=fp8_down, chunk=chunk)
    atol = 1e-6 if dtype == torch.float32 else 1e-2  # same GEMMs per group; only the grouping differs
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
