"""The Triton grouped block-FP8 expert kernel (model_shards/fp8_grouped_kernel.py) and the path choice.

Proves, on CPU: the tile table (tile -> expert, first row, row end) equals one built by hand from the counts,
and is built without a host sync (fake CUDA tensors under tests/device_ops.py's recorder); the path order of
fp8_experts.py's docstring. Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors; skipped where
triton does not import): the kernel's SwiGLU equals a float64 per-expert SwiGLU over weights dequantised by
model_spec §5.3 (tests/fp8_spec.py) within the error of the per-expert dequantising path (the CPU oracle)
itself, for whole 128 x 128 blocks, tails (dims not multiples of the block or the tile), the finer row block
of separately quantised gate and up, experts without rows, one expert with every row, an empty call, fp32 /
fp16 / bf16 activations, and both e4m3 conversions (Triton's type and the bit arithmetic). On CUDA (skipped
here): the same comparison for the compiled kernel at a Qwen3.5-sized layer slice, and that `expert_ffn`
takes the kernel there.
Tolerances: fp32 activations: |kernel - ref64| <= 1e-5 absolute (fp32 accumulation order only). fp16: the
kernel rounds where the oracle does (weights, gate/up, SiLU, hidden, output) but accumulates in another
order, so a rounding can flip: max |kernel - ref64| <= max |oracle - ref64| + 1 ulp of the output's largest
value. bf16: Triton 3.9's interpreter truncates fp32 -> bf16 casts (compiled kernels round to nearest even;
fp16 casts are numpy's and round), which roughly triples the error here: <= 2 x the oracle's + 2 ulp, the
same bound the CUDA test (rounding to nearest, hidden 4096) uses.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model_shards import fp8_experts
from model_shards.fp8_experts import PER_EXPERT, SCALED_MM, SYNC_FREE, SYNC_FREE_ROWS, TRITON, choose_path
from model_shards.fp8_grouped_kernel import tile_table, triton_fp8_expert_ffn
from model_shards.quant import Fp8Weight, concat_rows, quantize_blockwise, stack
from tests.device_ops import HostSyncRecorder, fake_cuda
from tests.fp8_spec import dequant_per_spec

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreter_ready() -> bool:
    """triton imports and was imported in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1 on
    machines without a GPU before anything imports triton: its library functions are jitted at import)."""
    if not HAS_TRITON:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


needs_interpreter = pytest.mark.skipif(
    not _interpreter_ready(), reason="needs triton (the `test` extra) imported with TRITON_INTERPRET=1 (no GPU)"
)


def _fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> Fp8Weight:
    return Fp8Weight(*quantize_blockwise(w, block=block), block)


def _layer(e: int, d: int, i: int, *, seed: int, separate_gate_up: bool) -> tuple[Fp8Weight, Fp8Weight]:
    """e experts; gate_up either quantised whole or as gate and up apart (the checkpoint's layout: with
    i not a multiple of 128, concat_rows re-expresses the scales on a finer row block)."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, d, generator=gen) * d**-0.5
    down = torch.randn(e, d, i, generator=gen) * i**-0.5
    if separate_gate_up:
        fused = stack([concat_rows([_fp8(gate_up[x, :i]), _fp8(gate_up[x, i:])]) for x in range(e)])
    else:
        fused = _fp8(gate_up)
    return fused, _fp8(down)


def _ref64(x: torch.Tensor, counts: list[int], gate_up: Fp8Weight, down: Fp8Weight) -> torch.Tensor:
    """float64 SwiGLU per expert over the spec-dequantised weights (activations as given)."""
    gu = dequant_per_spec(gate_up.data, gate_up.scale_inv, gate_up.block).double()
    dn = dequant_per_spec(down.data, down.scale_inv, down.block).double()
    out, start = torch.zeros(x.shape, dtype=torch.float64), 0
    for e, n in enumerate(counts):
        g, u = F.linear(x[start : start + n].double(), gu[e]).chunk(2, dim=-1)
        out[start : start + n] = F.linear(F.silu(g) * u, dn[e])
        start += n
    return out


# ------------------------------------------------------------------------------ tile table (pure torch)
def _tiles_by_hand(counts: list[int], block_m: int) -> list[tuple[int, int, int]]:
    tiles, start = [], 0
    for e, n in enumerate(counts):
        for r0 in range(start, start + n, block_m):
            tiles.append((e, r0, start + n))
        start += n
    return tiles


@pytest.mark.parametrize(
    "counts,block_m",
    [([3, 0, 5, 1, 0, 7], 4), ([0, 0, 33, 0], 16), ([16, 16], 16), ([1] * 9, 16), ([0, 5, 0], 64)],
    ids=["mixed", "one-expert-all-rows", "exact-tiles", "one-row-each", "one-partial"],
)
def test_tile_table_matches_the_counts(counts: list[int], block_m: int) -> None:
    rows = sum(counts)
    expert, row0, row_end = tile_table(torch.tensor(counts), rows=rows, block_m=block_m)
    size = -(-rows // block_m) + min(len(counts), rows)
    assert expert.shape == row0.shape == row_end.shape == (size,)  # the host-known bound
    want = _tiles_by_hand(counts, block_m)
    got = list(zip(expert.tolist(), row0.tolist(), row_end.tolist()))
    assert got[: len(want)] == want
    assert all(e == len(counts) for e, _, _ in got[len(want) :])  # the rest: past the last expert, skipped


def test_tile_table_makes_no_host_sync() -> None:
    with fake_cuda():
        counts = torch.zeros(64, dtype=torch.int64, device="cuda")
        with HostSyncRecorder():
            expert, _, _ = tile_table(counts, rows=512, block_m=16)
        assert expert.device.type == "cuda" and expert.shape == (32 + 64,)


class _Launches:
    """The Triton launch replaced at its boundary (fake tensors cannot enter a kernel): records the grids."""

    def __init__(self) -> None:
        self.grids: list[tuple[int, int]] = []

    def __getitem__(self, grid: tuple[int, int]):  # noqa: ANN204  # a launcher, as JITFunction[grid] is
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_kernel_wrapper_makes_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything around the two launches (tile table, buffers, weight views) on fake CUDA tensors: no sync,
    and the grids come from host-known sizes only (512 rows / 16 + 64 experts tiles, I / 64 and D / 64)."""
    from model_shards import fp8_grouped_kernel

    launches = _Launches()
    monkeypatch.setattr(fp8_grouped_kernel, "_kernel", lambda: launches)
    e, d, i = 64, 256, 128
    with fake_cuda():
        gate_up = Fp8Weight(
            torch.empty(e, 2 * i, d, device="cuda").to(torch.float8_e4m3fn),
            torch.empty(e, 2, 2, device="cuda"),
            (128, 128),
        )
        down = Fp8Weight(
            torch.empty(e, d, i, device="cuda").to(torch.float8_e4m3fn), torch.empty(e, 2, 1, device="cuda"), (128, 128)
        )
        x = torch.empty(512, d, device="cuda", dtype=torch.bfloat16)
        counts = torch.empty(e, device="cuda", dtype=torch.int64)
        with HostSyncRecorder():
            y = triton_fp8_expert_ffn(x, counts_E=counts, gate_up=gate_up, down=down, native=False)
        assert y.device.type == "cuda" and y.shape == x.shape
    assert launches.grids == [(32 + 64, i // 64), (32 + 64, d // 64)]


# ------------------------------------------------------------------------------ path choice
def test_choose_path_order() -> None:
    def path(device: str, rows: int = 8, **kw: bool) -> str:
        args = {"fake": False, "reference": False, "scaled_mm": False, "triton": True, "both_fp8": True} | kw
        return choose_path(device, rows=rows, **args)

    assert path("cpu") == PER_EXPERT and path("cpu", rows=10**6) == PER_EXPERT  # the CPU path and oracle
    assert path("cuda") == TRITON and path("cuda", rows=10**6) == TRITON
    assert path("cuda", rows=10**6, scaled_mm=True) == SCALED_MM  # prefill where the block recipe fits
    assert path("cuda", scaled_mm=True) == TRITON  # decode: the per-expert scaled GEMM would read counts
    for off in ({"fake": True}, {"reference": True}, {"triton": False}, {"both_fp8": False}):
        assert path("cuda", **off) == SYNC_FREE and path("cuda", rows=SYNC_FREE_ROWS + 1, **off) == PER_EXPERT
    assert path("meta") == SYNC_FREE


def test_cpu_tensors_take_the_per_expert_path() -> None:
    gate_up, down = _layer(2, 128, 128, seed=0, separate_gate_up=False)
    assert fp8_experts.fp8_path(torch.zeros(4, 128), gate_up, down) == PER_EXPERT


# ------------------------------------------------------------------------------ the kernel, interpreted
CASES = {
    # name: (E, D, I, counts, separate gate/up, tile sizes (block_m, block_n, block_k))
    "whole-blocks": (6, 256, 128, [3, 0, 5, 1, 0, 7], False, (16, 64, 64)),
    "tails": (4, 200, 72, [2, 9, 0, 4], False, (16, 32, 64)),
    "fine-row-block": (3, 136, 72, [5, 0, 6], True, (16, 64, 32)),
    "one-expert-all-rows": (4, 128, 64, [0, 0, 37, 0], True, (16, 32, 64)),
    "larger-tiles": (2, 96, 40, [70, 3], False, (64, 32, 32)),
}


# One (activation dtype, e4m3 conversion) per case in the default run (the interpreter costs ~1 s of CPU a
# call); every combination under `slow`.
DEFAULT_RUN = [
    ("whole-blocks", torch.bfloat16, True),
    ("tails", torch.float32, False),
    ("tails", torch.bfloat16, True),
    ("fine-row-block", torch.bfloat16, False),
    ("one-expert-all-rows", torch.float16, True),
    ("larger-tiles", torch.float32, True),
]
ALL = [
    (c, dt, nat)
    for c in sorted(CASES)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
    for nat in (False, True)
]


@needs_interpreter
@pytest.mark.parametrize(
    "case,dtype,native",
    DEFAULT_RUN + [pytest.param(*p, marks=pytest.mark.slow) for p in ALL if p not in DEFAULT_RUN],
    ids=lambda v: str(v).removeprefix("torch.") if not isinstance(v, bool) else ("e4m3" if v else "bits"),
)
def test_interpreted_kernel_matches_the_spec(case: str, dtype: torch.dtype, native: bool) -> None:
    e, d, i, counts, separate, (bm, bn, bk) = CASES[case]
    gate_up, down = _layer(e, d, i, seed=len(case), separate_gate_up=separate)
    x = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(7)).to(dtype)
    counts_E = torch.tensor(counts)
    got = triton_fp8_expert_ffn(
        x, counts_E=counts_E, gate_up=gate_up, down=down, block_m=bm, block_n=bn, block_k=bk, native=native
    )
    assert got.dtype == dtype and got.shape == x.shape
    ref = _ref64(x, counts, gate_up, down)
    err = (got.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5, err
        return
    oracle = fp8_experts.fp8_expert_ffn(x, counts_E=counts_E, gate_up=gate_up, down=down)  # per expert (CPU)
    oracle_err = (oracle.double() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    if dtype == torch.float16:
        assert err <= oracle_err + ulp, (err, oracle_err, ulp)
    else:  # the interpreter's fp32 -> bf16 casts truncate (compiled Triton rounds to nearest even)
        assert err <= 2 * oracle_err + 2 * ulp, (err, oracle_err, ulp)


@needs_interpreter
def test_interpreted_kernel_empty_call() -> None:
    gate_up, down = _layer(3, 128, 64, seed=1, separate_gate_up=False)
    got = triton_fp8_expert_ffn(
        torch.zeros(0, 128), counts_E=torch.zeros(3, dtype=torch.int64), gate_up=gate_up, down=down
    )
    assert got.shape == (0, 128)


def test_kernel_names_a_shape_mismatch() -> None:
    gate_up, down = _layer(3, 128, 64, seed=1, separate_gate_up=False)
    with pytest.raises(ValueError, match="shapes disagree"):
        triton_fp8_expert_ffn(torch.zeros(4, 96), counts_E=torch.tensor([4, 0, 0]), gate_up=gate_up, down=down)


# ------------------------------------------------------------------------------ the kernel, compiled (CUDA)
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("native", [False, True], ids=["bit-convert", "triton-e4m3"])
@pytest.mark.parametrize(
    "counts",
    [[1, 0, 3, 0, 2, 0, 0, 2], [300, 0, 7, 0, 0, 0, 0, 1], [600, 0, 7, 0, 0, 0, 0, 1]],
    ids=["decode", "prefill-16-row-tiles", "prefill-64-row-tiles"],
)
def test_cuda_kernel_matches_the_spec(counts: list[int], native: bool) -> None:
    """A Qwen3.5-397B expert slice (hidden 4096, expert width 1024, separately quantised gate/up), bf16."""
    if native and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton's e4m3 type needs SM89+")
    e, d, i = 8, 4096, 1024
    gate_up, down = _layer(e, d, i, seed=3, separate_gate_up=True)
    x = torch.randn(sum(counts), d, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ref = _ref64(x, counts, gate_up, down)
    oracle = fp8_experts.fp8_expert_ffn(x, counts_E=torch.tensor(counts), gate_up=gate_up, down=down)
    oracle_err = (oracle.double() - ref).abs().max().item()

    def cuda(w: Fp8Weight) -> Fp8Weight:
        return Fp8Weight(w.data.cuda(), w.scale_inv.cuda(), w.block)

    got = triton_fp8_expert_ffn(
        x.cuda(), counts_E=torch.tensor(counts).cuda(), gate_up=cuda(gate_up), down=cuda(down), native=native
    ).cpu()
    err = (got.double() - ref).abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    assert err <= 2 * oracle_err + 2 * ulp, (err, oracle_err, ulp)
    assert fp8_experts.fp8_path(x.cuda()[:8], cuda(gate_up), cuda(down)) == TRITON
