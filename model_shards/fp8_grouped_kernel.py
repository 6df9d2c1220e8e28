"""Triton grouped block-FP8 expert SwiGLU: rows grouped by expert, FP8 weights dequantised in registers only.

Owns: `triton_fp8_expert_ffn` (the CUDA path of `fp8_experts.fp8_expert_ffn` where torch's block-scaled GEMM
does not apply), the device-side tile table it launches over (`tile_table`) and whether the kernel can run
(`triton_available`). Two launches of one kernel: gate_up with a fused SwiGLU epilogue ([R, 2I] never exists,
only the [R, I] hidden), then down. Numerics (w8a16): activations stay in their dtype (bf16 in serving; no
activation quantisation); each [BLOCK_N, BLOCK_K] weight tile is loaded as e4m3 bits, times its block's
`scale_inv` in fp32, rounded to the activation dtype (exactly the CPU oracle's `dense(w, dtype)`), then one
`tl.dot` with fp32 accumulation; the gate/up outputs are rounded to the activation dtype before
SiLU(gate) * up as the oracle's grouped GEMM does. So the result differs from the per-expert dequantising
path only by fp32 accumulation order. Any weight block shape (including the finer row block `concat_rows`
makes) and any dims (tails masked) are taken: the scale is gathered per element.
No host sync: tiles of BLOCK_M rows never span two experts; the tile -> (expert, first row, row end) table is
built with device ops from `counts_E` (`tile_table`), and the grid is sized from the host-known bound
cdiv(R, BLOCK_M) + min(E, R) (one partial tile per hit expert at most); tiles past the real count return.
Weights go in as their uint8 bits and are converted through Triton's float8e4nv type on SM89+, by bit
arithmetic elsewhere (older GPUs, which Triton's e4m3 type does not support; the interpreter).
Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors: the CI proof) `tl.dot` of bf16 operands is
wrong (checked with triton 3.9), so there both tiles, already rounded to bf16, are widened to fp32 first:
bf16 x bf16 products are exact in fp32, so it is the same sum up to order. The interpreter also truncates
fp32 -> bf16 casts where compiled Triton rounds to nearest even (the tests' bf16 bound says so).
Must not: choose between paths (fp8_experts.py does) or hold weights.
Tests: tests/model_shards/test_fp8_grouped_kernel.py.
"""

# ruff: noqa: ANN001  # the kernel's runtime arguments: Triton reads annotations as specialisation hints
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from model_shards.quant import FP8_DTYPE, Fp8Weight

BLOCK_M_SMALL = 16  # rows per tile for calls with few rows per expert (decode): tl.dot's minimum M
BLOCK_M_LARGE = 64  # rows per tile once experts average at least this many rows (prefill)


# triton.language, bound on first use by `_triton`: importing triton costs 1-2 s of CPU, paid only by the
# processes that run the kernel (a CUDA rank's first FP8 expert call), not by every importer of moe.py.
tl: Any = None


@functools.cache
def _triton() -> Any:  # noqa: ANN401  # the triton module (no triton types here)
    """Import triton (once; binds `tl`), or None where it does not import (CPU-only installs)."""
    global tl
    try:
        import triton
        import triton.language as language
    except Exception:  # noqa: BLE001  # ImportError, or Triton failing at import on a machine without a driver
        return None
    tl = language
    return triton


def triton_available() -> bool:
    return _triton() is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on. Triton reads TRITON_INTERPRET when it jits a function, its own library
    functions included (at its import): set it before triton is imported (tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernel() -> Any:  # noqa: ANN401  # triton's JITFunction (no triton types here)
    """`_grouped_fp8_gemm` jitted on first use (importing this module never imports triton)."""
    triton = _triton()
    if triton is None:
        raise RuntimeError("the Triton block-FP8 expert kernel needs the `triton` package")
    return triton.jit(_grouped_fp8_gemm)


# The kernel is one function: the interpreter re-executes a kernel's source with its module globals, so a
# jitted helper called from it (or a closure) would not resolve there; the gate and up tile loads repeat.
def _grouped_fp8_gemm(
    x_ptr, w_ptr, s_ptr, out_ptr, tile_expert_ptr, tile_row0_ptr, tile_row_end_ptr,
    N, K, stride_xm, stride_om, stride_we, stride_wn, stride_se, stride_sn, num_experts,
    BR: tl.constexpr, BC: tl.constexpr, SWIGLU: tl.constexpr, NATIVE_FP8: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
) -> None:  # fmt: skip
    """out[rows, n] = x[rows] @ W_e[n].T for one (row tile, column tile); with SWIGLU, W_e holds gate rows
    then up rows (N each) and out = SiLU(x @ gate.T) * (x @ up.T), each product rounded to x's dtype first.

    W tiles are loaded as uint8 e4m3 bits [BLOCK_K, BLOCK_N] (W.T), converted (NATIVE_FP8: Triton's
    float8e4nv; else by bits: the magnitude bits shifted into fp16's exponent/mantissa place give the value
    times 2^-8, normals and subnormals alike, e4m3 bias 7 vs fp16 bias 15), times the block's scale in fp32,
    rounded to x's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < num_experts:  # tiles past the real count (the grid is a host-known bound) do nothing
        row0 = tl.load(tile_row0_ptr + pid_m)
        row_end = tl.load(tile_row_end_ptr + pid_m)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        dt = x_ptr.dtype.element_ty
        w_base = w_ptr + e.to(tl.int64) * stride_we
        s_base = s_ptr + e.to(tl.int64) * stride_se
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            mask = k_mask[:, None] & n_mask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_mask[:, None] & k_mask[None, :])
            bits = tl.load(w_base + n[None, :] * stride_wn + k[:, None], mask=mask, other=0)
            if NATIVE_FP8:
                w = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:
                b = bits.to(tl.uint16)
                w = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
            s = tl.load(s_base + (n[None, :] // BR) * stride_sn + k[:, None] // BC, mask=mask, other=0)
            w = (w * s.to(tl.float32)).to(dt)
            if UPCAST_DOT:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
            if SWIGLU:
                bits = tl.load(w_base + (n[None, :] + N) * stride_wn + k[:, None], mask=mask, other=0)
                if NATIVE_FP8:
                    wu = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
                else:
                    b = bits.to(tl.uint16)
                    wu = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
                s = tl.load(s_base + ((n[None, :] + N) // BR) * stride_sn + k[:, None] // BC, mask=mask, other=0)
                wu = (wu * s.to(tl.float32)).to(dt)
                if UPCAST_DOT:
                    wu = wu.to(tl.float32)
                if IEEE:
                    acc_up = tl.dot(x, wu, acc_up, input_precision="ieee")
                else:
                    acc_up = tl.dot(x, wu, acc_up)
        if SWIGLU:
            gate = acc.to(dt).to(tl.float32)
            up = acc_up.to(dt).to(tl.float32)
            # SiLU as torch's CPU kernel writes it; tl.exp, not tl.sigmoid: a jitted library function, which the
            # interpreter cannot call when triton was imported before TRITON_INTERPRET was set (tests set it late)
            out = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
        else:
            out = acc
        tl.store(out_ptr + rows[:, None] * stride_om + n[None, :], out.to(dt), mask=row_mask[:, None] & n_mask[None, :])


def tile_table(counts_E: torch.Tensor, *, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row tile: its expert (E past the last real tile), first row and row end; device ops only.

    Expert e's rows [start_e, start_e + n_e) take cdiv(n_e, block_m) tiles, experts in order. The table has
    the host-known length cdiv(rows, block_m) + min(E, rows), enough for any counts summing to `rows`.
    Returns int32 [T] tensors on counts' device.
    """
    num_experts = counts_E.shape[0]
    counts = counts_E.to(torch.int64)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    tiles_e = (counts + block_m - 1) // block_m
    tile_ends = torch.cumsum(tiles_e, 0)  # tiles before expert e+1
    size = -(-rows // block_m) + min(num_experts, rows)
    t = torch.arange(size, device=counts.device)
    expert = torch.searchsorted(tile_ends, t, right=True)  # E for tiles past the last expert's
    e = expert.clamp(max=num_experts - 1)
    row0 = starts[e] + (t - (tile_ends[e] - tiles_e[e])) * block_m
    return expert.to(torch.int32), row0.to(torch.int32), ends[e].to(torch.int32)


def _weight_args(w: Fp8Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous uint8 bits [E, out, in] and fp32-or-bf16 scales [E, rows, cols] (views where already so)."""
    if w.data.dtype != FP8_DTYPE:
        raise ValueError(f"expected {FP8_DTYPE} weight data, got {w.data.dtype}")
    return w.data.contiguous().view(torch.uint8), w.scale_inv.contiguous()


def native_fp8(device: torch.device) -> bool:
    """Triton's e4m3 conversion on SM89+ CUDA; the bit path elsewhere (older GPUs, the interpreter)."""
    if device.type != "cuda" or interpreting():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def triton_fp8_expert_ffn(
    x_RD: torch.Tensor,
    *,
    counts_E: torch.Tensor,
    gate_up: Fp8Weight,
    down: Fp8Weight,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
    native: bool | None = None,
) -> torch.Tensor:
    """SwiGLU of rows grouped by expert over block-FP8 weights, two launches of the grouped kernel.

    Args:
        x_RD: [R, D] rows, expert e's rows contiguous, in expert order (fp32, fp16 or bf16).
        counts_E: [E] rows per expert on x's device (zeros allowed), summing to R; never read on the host.
        gate_up: FP8 [E, 2I, D] (gate rows then up rows); down: FP8 [E, D, I]; any weight block shape.
        block_m / block_n / block_k: tile sizes (block_m: 16 for decode-sized calls, 64 when experts average
            64+ rows); native: Triton's e4m3 conversion (default: SM89+ CUDA) or the bit path.
    Returns:
        [R, D] in x's dtype.
    """
    r, d = x_RD.shape
    num_experts, two_i, d_w = gate_up.shape
    i = two_i // 2
    if d_w != d or down.shape != (num_experts, d, i) or counts_E.shape != (num_experts,):
        raise ValueError(
            f"shapes disagree: x {tuple(x_RD.shape)}, counts {tuple(counts_E.shape)}, "
            f"gate_up {tuple(gate_up.shape)}, down {tuple(down.shape)}"
        )
    if r == 0:
        return x_RD.new_zeros((0, d))
    if block_m is None:
        block_m = BLOCK_M_LARGE if r >= BLOCK_M_LARGE * num_experts else BLOCK_M_SMALL
    native = native_fp8(x_RD.device) if native is None else native
    kernel = _kernel()
    x = x_RD.contiguous()
    tile_expert, tile_row0, tile_row_end = tile_table(counts_E, rows=r, block_m=block_m)
    common = {
        "NATIVE_FP8": native,
        "UPCAST_DOT": interpreting() and x.dtype != torch.float32,
        "IEEE": x.dtype == torch.float32,  # fp32 activations keep fp32 products (no TF32)
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
    }
    hidden = torch.empty((r, i), dtype=x.dtype, device=x.device)
    out = torch.empty((r, d), dtype=x.dtype, device=x.device)
    for w, src, dst, n_out, k_in, swiglu in ((gate_up, x, hidden, i, d, True), (down, hidden, out, d, i, False)):
        bits, scale = _weight_args(w, x.dtype)
        grid = (tile_expert.shape[0], -(-n_out // block_n))
        kernel[grid](
            src, bits, scale, dst, tile_expert, tile_row0, tile_row_end,
            n_out, k_in, src.stride(0), dst.stride(0), bits.stride(0), bits.stride(1), scale.stride(0),
            scale.stride(1), num_experts,
            BR=w.block[0], BC=w.block[1], SWIGLU=swiglu, **common,
        )  # fmt: skip
    return out
