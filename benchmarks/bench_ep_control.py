"""Benchmark: the expert-parallel group driver's control cost per step, before (a Ray call per rank per step) and
after (expert ranks loop on trunk rank 0's step header: a Ray call per trunk rank only), in one run.

A local multi-node Ray cluster (CPU, gloo, the embedded tiny model); for each layout D + X = 8 (D=2 X=6, D=4 X=4)
and each path (`GroupConfig.expert_loop` False = before, True = after), a fresh group whose every rank sleeps
`--sleep-ms` per step (`step_sleep_s`: the host idles while a GPU computes) runs `--steps` idle decode steps (no
sequence: every MoE layer's fixed-capacity exchange still runs, empty) through `ExpertParallelGroup.step`, as the
engine calls it. Per step: wall = the driver's await of `step()`; the slowest rank's step = the longest of the
ranks' own durations of that step (begin to end of their step, sleep and exchanges included, read back from
`RankProgress`); overhead = wall - slowest rank's step: what the driver and Ray add. Prints p50/p90 of each.
Target: overhead p50 <= 1 ms at D + X = 8 with a 1 ms sleep.

Usage: python benchmarks/bench_ep_control.py [--steps 300] [--sleep-ms 1] [--json out.json]   (about 3 min)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

LAYOUTS = ((2, 6), (4, 4))


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def run_layout(d: int, x: int, *, loop: bool, steps: int, warmup: int, sleep_s: float) -> dict:
    import ray

    from cluster.topology import GroupShape
    from replicas.engine.step_types import StepRequest
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=None,
            shape=GroupShape(d, x),
            dtype="float32",
            caches=CacheSizes(num_blocks=16, block_size=16, num_slots=4),
            cpus_per_rank=0.5,
            expert_loop=loop,
            step_sleep_s=sleep_s,
        )
    )
    group.start()
    actors = group.trunks + group.experts
    try:
        reqs = [StepRequest() for _ in range(d)]

        async def drive(n: int) -> list[float]:
            walls = []
            for _ in range(n):
                t0 = time.perf_counter()
                await group.step(reqs)
                walls.append(time.perf_counter() - t0)
            return walls

        asyncio.run(drive(warmup))
        time.sleep(0.2)  # the expert loops finish the last step's bookkeeping
        ray.get([a.take_step_seconds.remote() for a in actors])
        walls = asyncio.run(drive(steps))
        time.sleep(0.2)
        per_rank = ray.get([a.take_step_seconds.remote() for a in actors])
    finally:
        group.shutdown()
    if any(len(r) != steps for r in per_rank):
        raise RuntimeError(f"ranks report {[len(r) for r in per_rank]} steps, the driver ran {steps}")
    slowest = [max(r[i] for r in per_rank) for i in range(steps)]
    over = [w - s for w, s in zip(walls, slowest)]
    ms = 1e3
    return {
        "d": d,
        "x": x,
        "path": "expert loop" if loop else "Ray call per rank",
        "wall_p50_ms": round(_pct(walls, 0.5) * ms, 3),
        "wall_p90_ms": round(_pct(walls, 0.9) * ms, 3),
        "slowest_rank_p50_ms": round(_pct(slowest, 0.5) * ms, 3),
        "overhead_p50_ms": round(_pct(over, 0.5) * ms, 3),
        "overhead_p90_ms": round(_pct(over, 0.9) * ms, 3),
        "overhead_mean_ms": round(statistics.fmean(over) * ms, 3),
        "steps": steps,
    }


def report(rows: list[dict], sleep_ms: float) -> str:
    head = ["D", "X", "path", "wall p50", "wall p90", "slowest rank p50", "overhead p50", "overhead p90"]
    out = [
        f"driver overhead per step (ms; compute = {sleep_ms:g} ms sleep per rank per step; overhead = wall - "
        "slowest rank's step)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        out.append(
            f"| {r['d']} | {r['x']} | {r['path']} | {r['wall_p50_ms']} | {r['wall_p90_ms']} | "
            f"{r['slowest_rank_p50_ms']} | {r['overhead_p50_ms']} | {r['overhead_p90_ms']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--sleep-ms", type=float, default=1.0)
    ap.add_argument("--layouts", default=",".join(f"{d}x{x}" for d, x in LAYOUTS), help="DxX,... (e.g. 2x6,4x4)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from cluster.local_cluster import start_local_cluster

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs visible, python {platform.python_version()}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",") if s]
    cluster = start_local_cluster(2, cpus_per_node=4)
    rows = []
    try:
        for d, x in layouts:
            for loop in (False, True):  # before, then after, on the same cluster
                row = run_layout(d, x, loop=loop, steps=args.steps, warmup=args.warmup, sleep_s=args.sleep_ms / 1e3)
                print(row, flush=True)
                rows.append(row)
    finally:
        cluster.shutdown()
    print(report(rows, args.sleep_ms))
    print(f"load average at end {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
