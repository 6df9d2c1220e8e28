"""Peak extra memory and time of one FP8 routed-expert call: dequantise-all (before) vs one expert at a time (after).

One call of `expert_ffn` on a layer of E experts (hidden D, expert width I) stored as block-FP8
(128 x 128 blocks, bf16 scales, gate and up quantised separately as the checkpoint does), T tokens
routed top-k uniformly at random, rows already grouped by expert. "before" is the code as of commit
c6d6c3e, kept here verbatim in `_before`: select the hit experts, dequantise them all through an
expanded fp32 scale, one grouped GEMM. "after" is today's `moe.expert_ffn`. Peak extra = the most
bytes of tensors created during the call alive at once (tests/live_bytes.py, aten-op level, output
included; weights and inputs excluded). Time = median wall time of --iters calls, without the probe.

Usage: python benchmarks/bench_fp8_experts.py [--experts 64] [--hidden 512] [--moe 256] [--tokens 256]
    [--top-k 8] [--dtype bfloat16] [--iters 5] [--threads N] [--device auto|cpu|cuda[:N]]
`--device` (model_shards/device.py): weights, counts and rows are drawn on the host (the same numbers on every
device) and moved there once before measuring; on cuda each timed call ends with `torch.cuda.synchronize`, and
"after" takes the path `fp8_experts.fp8_path` picks there (the Triton grouped kernel where triton imports).
Results: benchmarks/RESULTS-fp8.md. Tests: tests/model_shards/test_fp8_experts.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_shards.device import DEVICE_CHOICES, resolve_device  # noqa: E402  # after the sys.path line above
from model_shards.moe import expert_ffn  # noqa: E402
from model_shards.quant import Fp8Weight, concat_rows, quantize_blockwise, stack  # noqa: E402
from tests.live_bytes import LiveBytes  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK = (128, 128)


def _old_dequantize(w: Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    out_dim, in_dim = w.data.shape[-2:]
    br, bc = w.block
    scale = w.scale_inv.float().repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return (w.data.float() * scale[..., :out_dim, :in_dim]).to(dtype)


def _before(x_RD: torch.Tensor, counts_E: torch.Tensor, gate_up: Fp8Weight, down: Fp8Weight) -> torch.Tensor:
    """`moe.expert_ffn`'s FP8 branch as of commit c6d6c3e."""
    hit = torch.nonzero(counts_E, as_tuple=True)[0]
    counts_E = counts_E[hit]
    gate_up_w = _old_dequantize(gate_up.select(hit), x_RD.dtype)
    down_w = _old_dequantize(down.select(hit), x_RD.dtype)
    offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    gu = F.grouped_mm(x_RD.to(gate_up_w.dtype), gate_up_w.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, down_w.transpose(-2, -1), offs=offs).to(x_RD.dtype)


def _after(x_RD: torch.Tensor, counts_E: torch.Tensor, gate_up: Fp8Weight, down: Fp8Weight) -> torch.Tensor:
    return expert_ffn(x_RD, counts_E=counts_E, gate_up=gate_up, down=down)


def _on(w: Fp8Weight, device: torch.device) -> Fp8Weight:
    return Fp8Weight(w.data.to(device), w.scale_inv.to(device), w.block)


def _layer(e: int, d: int, i: int, device: torch.device) -> tuple[Fp8Weight, Fp8Weight]:
    gen = torch.Generator().manual_seed(0)
    gate_ups, downs = [], []
    for _ in range(e):
        gate, up, down = (torch.randn(*s, generator=gen) * s[1] ** -0.5 for s in ((i, d), (i, d), (d, i)))
        gate_ups.append(concat_rows([Fp8Weight(*quantize_blockwise(w, block=BLOCK), BLOCK) for w in (gate, up)]))
        downs.append(Fp8Weight(*quantize_blockwise(down, block=BLOCK), BLOCK))
    return _on(stack(gate_ups), device), _on(stack(downs), device)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA call returns before its kernels finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[..., torch.Tensor], args: tuple, iters: int, device: torch.device
) -> tuple[int, float, torch.Tensor]:  # type: ignore[type-arg]  # heterogeneous args
    with LiveBytes() as probe:
        y = fn(*args)
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return probe.peak, statistics.median(times), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: cuda:0 when torch sees a GPU)")
    args = ap.parse_args()
    try:
        dev = resolve_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    e, d, i = args.experts, args.hidden, args.moe
    gate_up, down = _layer(e, d, i, dev)
    gen = torch.Generator().manual_seed(1)
    ids = torch.rand(args.tokens, e, generator=gen).topk(args.top_k, dim=-1).indices.reshape(-1)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=e)
    x = torch.randn(args.tokens, d, generator=gen).to(dtype).repeat_interleave(args.top_k, dim=0)[order].to(dev)
    counts = counts.to(dev)
    one_expert = (2 * i * d + d * i) * dtype.itemsize
    print(
        f"layer: E={e} D={d} I={i}, {args.tokens} tokens x top-{args.top_k} = {x.shape[0]} rows, "
        f"{int((counts > 0).sum())} experts hit, dtype {args.dtype} on {dev}; "
        f"FP8 weights {gate_up.nbytes + down.nbytes:,} B, "
        f"one expert dequantised {one_expert:,} B, {torch.get_num_threads()} threads"
    )
    results = {}
    for name, fn in (("before", _before), ("after", _after)):
        peak, secs, y = measure(fn, (x, counts, gate_up, down), args.iters, dev)
        results[name] = y
        print(
            f"{name:>6}: peak extra {peak / 2**20:8.2f} MiB  ({peak / one_expert:5.1f} x one expert)  "
            f"{secs * 1e3:8.2f} ms/call"
        )
    diff = (results["before"].float() - results["after"].float()).abs().max().item()
    print(f"max |before - after| = {diff:g} (bit-identical: {torch.equal(results['before'], results['after'])})")


if __name__ == "__main__":
    main()
