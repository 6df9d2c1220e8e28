"""Routed-expert SwiGLU over block-FP8 weights, never a dequantised copy of the whole expert set per call.

Owns: `fp8_expert_ffn`, the FP8 branch of `moe.expert_ffn`, and the choice of its path (`fp8_path`), first
that applies:
1. CPU: `PER_EXPERT`. Each hit expert's gate_up and down are dequantised, used and dropped before the next
   expert's (temporaries bounded by one expert; the rows per expert read on the host, no sync on CPU). The
   CPU path and the oracle of every other path.
2. Not a real CUDA tensor (FakeTensor device-path tests, other devices) or `EPSERVE_KERNELS=reference`:
   `SYNC_FREE` for calls of up to `SYNC_FREE_ROWS` rows (every decode step; counts never read on the host:
   chunks of `DEVICE_EXPERT_CHUNK` experts dequantised together, rows rotated to the front on the device,
   one grouped GEMM with device offsets, rows of other experts masked), else `PER_EXPERT`.
3. CUDA, a call above `SYNC_FREE_ROWS` rows (prefill), bf16 activations, SM90+, torch with `F.scaled_mm`,
   128 x 128 blocks and every dim a multiple of 128: `SCALED_MM`, the per-expert loop with the weights
   multiplied as FP8 by torch's block-scaled GEMM (activations quantised per 1 x 128 block; counts read on
   the host once, the call's one named sync; falls back, with a warning, to dequantising if it raises).
4. CUDA with triton importable and both weights FP8: `TRITON`, the grouped block-FP8 kernel
   (model_shards/fp8_grouped_kernel.py: weights dequantised in registers only, bf16 activations not
   quantised, fp32 accumulation, no host sync). Taken for decode even where 3's recipe fits: the
   per-expert scaled GEMM would need the counts on the host. If it fails to compile or launch, a warning,
   and 5 for the rest of the process.
5. Otherwise (CUDA without triton, or one weight plain): `SYNC_FREE` up to `SYNC_FREE_ROWS` rows, else
   `PER_EXPERT`.
Must not: hold weights or know about routing.
Tests: tests/model_shards/test_fp8_experts.py, tests/model_shards/test_fp8_grouped_kernel.py.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from model_shards import fp8_grouped_kernel
from model_shards.kernels import KERNELS_ENV, grouped_mm
from model_shards.quant import FP8_DTYPE, FP8_MAX, Fp8Weight, Weight, dense

SCALED_MM_BLOCK = 128  # the block `F.scaled_mm`'s BlockWise1x128 / BlockWise128x128 recipes use
SYNC_FREE_ROWS = 8192  # on a device, calls of at most this many rows (decode) never read counts on the host
DEVICE_EXPERT_CHUNK = 8  # experts dequantised together by the sync-free path (bounds its temporaries)
PER_EXPERT, SYNC_FREE, SCALED_MM, TRITON = "per_expert", "sync_free", "scaled_mm", "triton"
# The Triton kernel's first failure in this process (compile or launch), if any: it is not tried again.
_TRITON_FAILED: list[str] = []


def choose_path(
    device_type: str, *, fake: bool, reference: bool, rows: int, scaled_mm: bool, triton: bool, both_fp8: bool
) -> str:
    """The path for a call (the module docstring's order). Pure: the unit-tested core of `fp8_path`."""
    if device_type == "cpu":
        return PER_EXPERT
    if device_type == "cuda" and not fake and not reference:
        if rows > SYNC_FREE_ROWS and scaled_mm:
            return SCALED_MM
        if triton and both_fp8:
            return TRITON
    return SYNC_FREE if rows <= SYNC_FREE_ROWS else PER_EXPERT


def fp8_path(x_RD: torch.Tensor, gate_up: Weight, down: Weight) -> str:
    """Which path `fp8_expert_ffn` takes for these operands."""
    from torch._subclasses.fake_tensor import FakeTensor

    fake = isinstance(x_RD, FakeTensor)
    return choose_path(
        x_RD.device.type,
        fake=fake,
        reference=os.environ.get(KERNELS_ENV, "auto").strip().lower() == "reference",
        rows=x_RD.shape[0],
        scaled_mm=not fake and _scaled_mm_applies(x_RD, gate_up, down),
        # imported only where it could run (a real CUDA tensor): triton's import costs every other process 1-2 s
        triton=x_RD.device.type == "cuda" and not fake and not _TRITON_FAILED and fp8_grouped_kernel.triton_available(),
        both_fp8=isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight),
    )


def fp8_expert_ffn(x_RD: torch.Tensor, *, counts_E: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """SwiGLU of rows grouped by expert over FP8 weights, by the path `fp8_path` picks (module docstring).

    Args:
        x_RD: [R, D] rows, expert e's rows contiguous, in expert order.
        counts_E: [E] rows per expert (zeros allowed).
        gate_up: [E, 2I, D]; down: [E, D, I]; either or both FP8.
    Returns:
        [R, D] in x's dtype. The CPU path gives the same bits as dequantising the hit experts and
        running one grouped GEMM over them (same dequantise op order, same per-group GEMM).
    """
    path = fp8_path(x_RD, gate_up, down)
    if path == TRITON:
        assert isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight)  # checked by fp8_path
        try:
            return fp8_grouped_kernel.triton_fp8_expert_ffn(x_RD, counts_E=counts_E, gate_up=gate_up, down=down)
        except ValueError:
            raise  # our own shape check: a caller's bug, not the kernel's
        except Exception as err:  # noqa: BLE001  # Triton's errors (TritonError) are not RuntimeErrors
            # Unverified on this project's hardware (no GPU in CI): a Triton/GPU that fails to compile or launch
            # it falls back, loudly, and the process does not try it again.
            warnings.warn(f"Triton block-FP8 expert kernel failed ({err}); dequantising instead", stacklevel=2)
            _TRITON_FAILED.append(f"{type(err).__name__}: {err}")
            path = SYNC_FREE if x_RD.shape[0] <= SYNC_FREE_ROWS else PER_EXPERT
    if path == SYNC_FREE:
        return sync_free_expert_ffn(x_RD, counts_E=counts_E, gate_up=gate_up, down=down)
    out = torch.empty_like(x_RD)
    block_scaled = path == SCALED_MM
    start = 0
    # The named host read of this path (no sync on CPU; on a device only for calls above SYNC_FREE_ROWS):
    # the row ranges. Experts with no rows are skipped without touching their weights.
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        x = x_RD[start : start + n]
        gate_up_e, down_e = _expert(gate_up, e), _expert(down, e)
        y = None
        if block_scaled:
            assert isinstance(gate_up_e, Fp8Weight) and isinstance(down_e, Fp8Weight)  # checked by _scaled_mm_applies
            try:
                gate, up = scaled_mm_linear(x, gate_up_e).chunk(2, dim=-1)
                y = scaled_mm_linear(F.silu(gate) * up, down_e)
            except (RuntimeError, NotImplementedError) as err:
                # Unverified on this project's hardware: a GPU/torch that rejects the layout falls back, loudly.
                warnings.warn(f"F.scaled_mm block-FP8 path failed ({err}); dequantising per expert", stacklevel=2)
                block_scaled = False
        if y is None:
            y = _dequantised_swiglu(x, gate_up_e, down_e)
        out[start : start + n] = y.to(x_RD.dtype)
        start += n
    return out


def sync_free_expert_ffn(
    x_RD: torch.Tensor, *, counts_E: torch.Tensor, gate_up: Weight, down: Weight, chunk: int = DEVICE_EXPERT_CHUNK
) -> torch.Tensor:
    """`fp8_expert_ffn` without reading `counts_E` on the host (the device path; also runs on CPU).

    For each chunk of `chunk` experts (all of them, hit or not): rotate the rows on the device so the
    chunk's rows come first, dequantise the chunk's weights, one grouped GEMM pair with the chunk's
    counts as device offsets (rows past them are not multiplied), and write back only the chunk's rows.
    Costs per chunk one [R, D] gather and scatter; temporaries bounded by `chunk` experts' weights.
    """
    r = x_RD.shape[0]
    num_experts = counts_E.shape[0]
    counts = counts_E.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts
    ar = torch.arange(r, device=x_RD.device)
    out = torch.zeros_like(x_RD)
    for e0 in range(0, num_experts, chunk):
        e1 = min(e0 + chunk, num_experts)
        n = counts[e0:e1]
        idx = (ar + starts[e0]) % r  # the chunk's rows first (contiguous, in expert order), then the rest
        mine = (ar < n.sum())[:, None]
        offs = torch.cumsum(n, 0).to(torch.int32)
        gate_up_w = _dense_experts(gate_up, e0, e1, x_RD.dtype)
        gu = F.grouped_mm(x_RD.index_select(0, idx).to(gate_up_w.dtype), gate_up_w.transpose(-2, -1), offs=offs)
        del gate_up_w
        gate, up = gu.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        del gu, gate, up
        down_w = _dense_experts(down, e0, e1, x_RD.dtype)
        y = F.grouped_mm(hidden, down_w.transpose(-2, -1), offs=offs).to(x_RD.dtype)
        del hidden, down_w
        out.index_copy_(0, idx, torch.where(mine, y, out.index_select(0, idx)))  # rows past the offsets: garbage
    return out


def _dense_experts(w: Weight, e0: int, e1: int, dtype: torch.dtype) -> torch.Tensor:
    """Experts e0..e1-1 of a stacked weight, dequantised if FP8: [e1 - e0, out, in]."""
    return dense(Fp8Weight(w.data[e0:e1], w.scale_inv[e0:e1], w.block) if isinstance(w, Fp8Weight) else w[e0:e1], dtype)


def _expert(w: Weight, e: int) -> Weight:
    """Expert e's [out, in] weight: a view, still FP8 if FP8."""
    return w.expert(e) if isinstance(w, Fp8Weight) else w[e]


def _dequantised_swiglu(x_nD: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """One expert: dequantise its weights, then the same one-group grouped GEMMs `expert_ffn` runs."""
    offs = torch.tensor([x_nD.shape[0]], dtype=torch.int32, device=x_nD.device)
    gate_up_w = dense(gate_up, x_nD.dtype)
    gu = grouped_mm(x_nD.to(gate_up_w.dtype), gate_up_w[None].transpose(-2, -1), offs=offs)
    del gate_up_w  # dropped before down is dequantised: one weight matrix alive at a time
    gate, up = gu.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    del gu, gate, up
    down_w = dense(down, x_nD.dtype)
    return grouped_mm(hidden, down_w[None].transpose(-2, -1), offs=offs)


def _scaled_mm_applies(x: torch.Tensor, gate_up: Weight, down: Weight) -> bool:
    """CUDA SM90+, bf16 activations, torch with `F.scaled_mm`, 128 x 128 blocks, every dim a multiple of 128."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or not hasattr(F, "scaled_mm"):
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):  # cuBLASLt's block-scaled FP8 GEMM: Hopper on
        return False
    if not (isinstance(gate_up, Fp8Weight) and isinstance(down, Fp8Weight)):
        return False
    return all(
        w.block == (SCALED_MM_BLOCK, SCALED_MM_BLOCK) and all(d % SCALED_MM_BLOCK == 0 for d in w.shape[-2:])
        for w in (gate_up, down)
    )


def scaled_mm_linear(x_nK: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """y = x @ W.T on CUDA with torch's block-scaled FP8 GEMM (no dequantised weight).

    The activations are quantised to e4m3 per token per 128 columns (BlockWise1x128, fp32 scales,
    DeepSeek-V3's recipe); the weight keeps its checkpoint bits and 128 x 128 scales (BlockWise128x128).
    Numerics therefore differ from dequantise-then-matmul by the activation quantisation (relative
    error ~2^-4 per element before accumulation). NOT run on this project's CPU CI: written against
    torch 2.11's `F.scaled_mm` contract (cuBLASLt on SM90+: activation scales outer-dim-major with M a
    multiple of 4, weight column-major, weight scale K-blocks a multiple of 4) and checked only where
    a GPU is present.

    Args:
        x_nK: [n, K] bf16 on CUDA. w: [N, K] FP8 with (128, 128) blocks, N and K multiples of 128.
    Returns:
        [n, N] bf16.
    """
    n, k = x_nK.shape
    pad_m = -n % 4
    xp = F.pad(x_nK, (0, 0, 0, pad_m)) if pad_m else x_nK
    groups = xp.float().unflatten(-1, (k // SCALED_MM_BLOCK, SCALED_MM_BLOCK))  # [M, K/128, 128]
    a_scale = (groups.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)  # [M, K/128]
    a = (groups / a_scale[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2).to(FP8_DTYPE)
    kb = k // SCALED_MM_BLOCK
    w_scale = w.scale_inv.float()  # [N/128, K/128]
    if kb % 4:
        w_scale = F.pad(w_scale, (0, -kb % 4))
    y = F.scaled_mm(
        a,
        w.data.t(),  # column-major [K, N] view, no copy
        a_scale.t().contiguous().t(),  # outer-dim-major, as cuBLASLt wants
        F.ScalingType.BlockWise1x128,
        w_scale.t(),
        F.ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )
    return y[:n]
