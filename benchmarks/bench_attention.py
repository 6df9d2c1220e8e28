"""Memory (and time) of one prefill attention call over the paged KV: paged back-end vs the eager oracle.

One call: a CHUNK-token chunk on top of a PREFIX-token cached prefix of one sequence, the embedded tiny
model's attention shapes (8 query / 2 KV heads x 64, bf16, 16-token blocks), scattered block table. The
pools (every layer's KV) are allocated before measuring and excluded; the queries are inputs. "peak" is
the most resident memory the call added at once (Linux VmHWM reset before the call, see `measure`),
its output included. KV read = (prefix + chunk) tokens x Hkv x hd x 2 (K and V) x dtype size.

Usage: python benchmarks/bench_attention.py [--chunk 2048] [--prefix 16384] [--dtype bfloat16] [--eager]
       [--device auto|cpu|cuda[:N]]
(--eager also measures the eager oracle: it builds the full fp32 score matrix and is slow on CPU).
`--device` (model_shards/device.py): pools, table and queries are made there; on cuda "peak" is the most
device memory the call allocated beyond what was allocated before it (`torch.cuda.max_memory_allocated`),
and the time ends with `torch.cuda.synchronize`.
Results: benchmarks/RESULTS-attention.md. Tests: tests/model_shards/test_paged_attention.py.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

import torch

from model_shards.device import DEVICE_CHOICES, resolve_device
from model_shards.gated_attention import _prefill_attention
from model_shards.paged_attention import prefill_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(call: Callable[[], torch.Tensor], device: torch.device) -> tuple[int, float]:
    """(peak bytes the call added to the resident set, seconds). Linux: writing 5 to
    /proc/self/clear_refs resets the high-water mark (VmHWM) to the current RSS, so VmHWM after the
    call minus VmRSS before it is the most memory the call held at once (its output included). glibc
    serves large blocks with fresh mmaps, so the big temporaries (scores, K/V tiles) are all counted.
    On cuda: the allocator's peak during the call minus what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_bytes = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = call()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        del out
        return torch.cuda.max_memory_allocated(device) - base_bytes, seconds
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") - base
    del out
    return peak * 1024, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--prefix", type=int, default=16384)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--eager", action="store_true", help="also measure the eager oracle (full score matrix)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: cuda:0 when torch sees a GPU)")
    args = p.parse_args()
    try:
        dev = resolve_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    dtype, bs = DTYPES[args.dtype], args.block_size
    h, hkv, hd = 8, 2, 64
    s = args.prefix + args.chunk
    nb = -(-s // bs)
    gen = torch.Generator().manual_seed(0)
    # drawn on the host (one seeded generator, the same numbers on every device), then moved once, before timing
    k_pool = torch.randn(nb + 8, bs, hkv, hd, generator=gen, dtype=dtype).to(dev)
    v_pool = torch.randn(nb + 8, bs, hkv, hd, generator=gen, dtype=dtype).to(dev)
    table = torch.randperm(nb + 8, generator=gen)[:nb].to(dev)
    q = torch.randn(args.chunk, h, hd, generator=gen, dtype=dtype).to(dev)
    kv_read = s * hkv * hd * 2 * dtype.itemsize
    kw = dict(table_N=table, context_len=args.prefix, k_pool=k_pool, v_pool=v_pool, scale=hd**-0.5)
    print(f"chunk {args.chunk} over prefix {args.prefix}, {args.dtype} on {dev}, KV read {kv_read / 2**20:.2f} MiB")
    impls: list[tuple[str, Callable[..., torch.Tensor]]] = [("paged", prefill_attention)]
    if args.eager:
        impls.append(("eager", _prefill_attention))
    for name, fn in impls:
        fn(q[:64], **kw)  # warm up: first-call library set-up pages are not the call's memory
        peak, sec = measure(lambda fn=fn: fn(q, **kw), dev)  # type: ignore[misc]  # kwargs of the two match
        print(f"{name:6s} peak {peak / 2**20:9.2f} MiB ({peak / kv_read:7.2f}x KV read)  {sec:7.2f} s")


if __name__ == "__main__":
    main()
