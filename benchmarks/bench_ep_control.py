"""Benchmark: the expert-parallel group driver's control cost per step, path by path, in one run.

Paths (`--paths`, GroupConfig flags): `ray` = a Ray call per rank per step (expert_loop and trunk_loop off);
`expert` = expert ranks loop on trunk rank 0's step header, a Ray call per trunk rank per step (expert_loop on,
trunk_loop off: main before the trunk stream); `stream` = trunk ranks loop on the driver's step stream too
(replicas/ep/step_channel.py: no Ray call per step at all; the default). `--rounds` repeats each layout's paths,
alternating their order (A B, B A, ...) so a drift in the machine's load hits both; the table pools the rounds.

A local multi-node Ray cluster (CPU, gloo, the embedded tiny model); for each layout (default D=1 X=1, D=2 X=6,
D=4 X=4) and each path, a fresh group whose every rank sleeps
`--sleep-ms` per step (`step_sleep_s`: the host idles while a GPU computes) runs `--steps` idle decode steps (no
sequence: every MoE layer's fixed-capacity exchange still runs, empty) through `ExpertParallelGroup.step`, as the
engine calls it. Per step: wall = the driver's await of `step()`; the slowest rank's step = the longest of the
ranks' own durations of that step (begin to end of their step, sleep and exchanges included, read back from
`RankProgress`); overhead = wall - slowest rank's step: what the driver and Ray add. Prints p50/p90 of each.
Target: overhead p50 <= 1 ms at D + X = 8 with a 1 ms sleep.

Usage: python benchmarks/bench_ep_control.py [--steps 300] [--sleep-ms 1] [--paths expert,stream] [--rounds 2]
    [--layouts 1x1,2x6,4x4] [--json out.json]   (about 10 min with the defaults)
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

LAYOUTS = ((1, 1), (2, 6), (4, 4))
# path -> (expert_loop, trunk_loop)
PATHS = {"ray": (False, False), "expert": (True, False), "stream": (True, True)}
PATH_NAMES = {
    "ray": "Ray call per rank",
    "expert": "expert loop, Ray call per trunk",
    "stream": "expert loop + trunk step stream",
}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def run_layout(d: int, x: int, *, path: str, steps: int, warmup: int, sleep_s: float) -> dict:
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
            expert_loop=PATHS[path][0],
            trunk_loop=PATHS[path][1],
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
    return summary(d, x, path, walls, slowest)


def summary(d: int, x: int, path: str, walls: list[float], slowest: list[float]) -> dict:
    over = [w - s for w, s in zip(walls, slowest)]
    ms = 1e3
    return {
        "d": d,
        "x": x,
        "path": PATH_NAMES[path],
        "wall_p50_ms": round(_pct(walls, 0.5) * ms, 3),
        "wall_p90_ms": round(_pct(walls, 0.9) * ms, 3),
        "slowest_rank_p50_ms": round(_pct(slowest, 0.5) * ms, 3),
        "overhead_p50_ms": round(_pct(over, 0.5) * ms, 3),
        "overhead_p90_ms": round(_pct(over, 0.9) * ms, 3),
        "overhead_mean_ms": round(statistics.fmean(over) * ms, 3),
        "steps": len(walls),
        "walls": walls,
        "slowest": slowest,
    }


def report(rows: list[dict], sleep_ms: float) -> str:
    head = [
        "D",
        "X",
        "path",
        "wall p50",
        "wall p90",
        "slowest rank p50",
        "overhead p50",
        "overhead p90",
        "per round p50",
    ]
    out = [
        f"driver overhead per step (ms; compute = {sleep_ms:g} ms sleep per rank per step; overhead = wall - "
        "slowest rank's step)",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        out.append(
            f"| {r['d']} | {r['x']} | {r['path']} | {r['wall_p50_ms']} | {r['wall_p90_ms']} | "
            f"{r['slowest_rank_p50_ms']} | {r['overhead_p50_ms']} | {r['overhead_p90_ms']} | "
            f"{', '.join(str(v) for v in r.get('round_overhead_p50_ms', []))} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--sleep-ms", type=float, default=1.0)
    ap.add_argument("--layouts", default=",".join(f"{d}x{x}" for d, x in LAYOUTS), help="DxX,... (e.g. 2x6,4x4)")
    ap.add_argument("--paths", default="expert,stream", help=f"comma-separated, of {sorted(PATHS)}")
    ap.add_argument("--rounds", type=int, default=2, help="each layout's paths this many times, order alternating")
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
    paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in paths if p not in PATHS]:
        ap.error(f"--paths: unknown {unknown}; choose from {sorted(PATHS)}")
    cluster = start_local_cluster(2, cpus_per_node=4)
    rows = []
    try:
        for d, x in layouts:
            runs: dict[str, list[dict]] = {p: [] for p in paths}
            for k in range(args.rounds):  # alternating order on the same cluster
                for p in paths if k % 2 == 0 else paths[::-1]:
                    run = run_layout(d, x, path=p, steps=args.steps, warmup=args.warmup, sleep_s=args.sleep_ms / 1e3)
                    print({k: v for k, v in run.items() if k not in ("walls", "slowest")}, flush=True)
                    runs[p].append(run)
            for p in paths:
                walls = [w for r in runs[p] for w in r["walls"]]
                slowest = [s for r in runs[p] for s in r["slowest"]]
                row = summary(d, x, p, walls, slowest)
                row["round_overhead_p50_ms"] = [r["overhead_p50_ms"] for r in runs[p]]
                rows.append(row)
    finally:
        cluster.shutdown()
    for r in rows:
        del r["walls"], r["slowest"]
    print(report(rows, args.sleep_ms))
    print(f"load average at end {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
