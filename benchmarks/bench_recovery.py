"""Benchmark: recovery of an expert-parallel group after a failed expert rank, before vs after, in one run.

Each code tree (--before: a commit, extracted with `git archive`; --after: this checkout) runs in its own child
process with its own 3-node local Ray cluster (CPU, gloo, fp32, a transformers-saved random checkpoint), a
D = 1 x X = 2 group with the GPU collective deadline (30 s, so the deadline is not what decides). Faults on
expert rank 1, each on a fresh group:
- raise: its 2nd MoE layer of a prefill step raises (patched in through `__ray_call__`, so both trees take it);
- hang: the rank's process is frozen (SIGSTOP) before a step; its peers wait in the step's first collective.
Per fault: seconds from the step's start to GroupFailure ("detect"), of rebuild() ("rebuild"), their sum
("recovery": fault to serving again, an idle step through every rank included), and the global ranks that got
a new process ("replaced", from the actors' pids). The reference figure: seconds to load one expert rank's
weights (a fresh ExpertRankActor until it answers). Target: recovery < load + 10 s.

Usage: python benchmarks/bench_recovery.py [--before REV] [--json out.json]   (about 4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 30.0


def _child(out_path: str) -> None:
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from cluster.local_cluster import start_local_cluster
    from cluster.topology import GroupShape
    from model_shards.sampling import SamplingParams
    from replicas.engine.step_types import SeqStart, SeqStep, StepRequest
    from replicas.ep.actors import CacheSizes, ExpertRankActor
    from replicas.ep.group import ExpertParallelGroup, GroupConfig, GroupFailure
    from tests.hf_oracle import save_random_hf_checkpoint

    folder = save_random_hf_checkpoint(Path(tempfile.mkdtemp()) / "ckpt")
    cluster = start_local_cluster(3, cpus_per_node=6)
    results: dict = {}
    try:

        def new_group() -> ExpertParallelGroup:
            g = ExpertParallelGroup(
                GroupConfig(
                    model_dir=str(folder),
                    shape=GroupShape(1, 2),
                    dtype="float32",
                    deadline_s=DEADLINE_S,
                    caches=CacheSizes(128, 16, 8),
                )
            )
            g.start()
            return g

        def pids(g: ExpertParallelGroup) -> list[int]:
            return ray.get([a.pid.remote() for a in g.trunks + g.experts], timeout=60)

        def prefill(seed: int) -> list[StepRequest]:
            import torch

            ids = torch.randint(0, 1024, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
            start = SeqStart(0, SamplingParams(temperature=0.0), len(ids))
            return [StepRequest((SeqStep(0, 0, tuple(ids), tuple(range(5)), start=start),))]

        def raise_on_second_layer(actor) -> None:  # noqa: ANN001
            def patch(self) -> None:  # noqa: ANN001
                rank, calls = self.rank, [0]
                for name in ("_variable_layer", "_fixed_layer"):
                    orig = getattr(rank, name)

                    def wrapped(*a, _orig=orig, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
                        calls[0] += 1
                        if calls[0] == 2:
                            raise RuntimeError("injected fault in MoE layer 2")
                        return _orig(*a, **k)

                    setattr(rank, name, wrapped)

            # on the control thread: the default one may be the expert rank's step loop
            ray.get(actor.__ray_call__.options(concurrency_group="control").remote(patch), timeout=30)

        # the reference: one expert rank's weight load, on its own (no placement group)
        g = new_group()
        spec_actor = ExpertRankActor.options(num_cpus=0)
        loads = []
        for _ in range(3):
            t0 = time.monotonic()
            spec = ray.get(
                g.experts[1].__ray_call__.options(concurrency_group="control").remote(lambda self: self.spec)
            )
            a = spec_actor.remote(spec)
            ray.get(a.pid.remote(), timeout=300)
            loads.append(time.monotonic() - t0)
            ray.kill(a, no_restart=True)
        results["expert_load_s"] = round(sorted(loads)[1], 3)
        for fault in ("raise", "hang"):
            if fault == "hang":
                g.shutdown()
                g = new_group()
            before = pids(g)
            victim = g.experts[1]
            vpid = before[g.shape.expert_rank(1)]
            if fault == "raise":
                raise_on_second_layer(victim)
            else:
                os.kill(vpid, signal.SIGSTOP)
            t0 = time.monotonic()
            try:
                asyncio.run(g.step(prefill(1)))
                raise AssertionError("the step did not fail")
            except GroupFailure as exc:
                failure = str(exc)
            t1 = time.monotonic()
            g.rebuild()
            t2 = time.monotonic()
            asyncio.run(g.step(prefill(2)))  # serves again
            after = pids(g)
            results[fault] = {
                "detect_s": round(t1 - t0, 3),
                "rebuild_s": round(t2 - t1, 3),
                "recovery_s": round(t2 - t0, 3),
                "replaced": [r for r, (p, q) in enumerate(zip(before, after)) if p != q],
                "failure": failure[:300],
                "phases": getattr(g, "last_recovery", {}),
            }
            print(fault, results[fault], flush=True)
        g.shutdown()
    finally:
        cluster.shutdown()
        Path(out_path).write_text(json.dumps(results))


def _run_tree(tree: Path, label: str) -> dict:
    out = Path(tempfile.mkdtemp()) / "out.json"
    env = dict(os.environ, PYTHONPATH=str(tree))
    print(f"--- {label}: {tree}", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(out)], cwd=tree, env=env, check=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="648b3d9", help="commit of the 'before' tree (default: this branch's base)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return
    before_dir = Path(tempfile.mkdtemp()) / "before"
    before_dir.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(before_dir)], input=archive.stdout, check=True)
    res = {"before": _run_tree(before_dir, f"before ({args.before})"), "after": _run_tree(ROOT, "after")}
    print("\n| tree | fault | detect s | rebuild s | recovery s | replaced ranks | load + 10 s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in res.items():
        for fault in ("raise", "hang"):
            f = r[fault]
            print(
                f"| {label} | {fault} | {f['detect_s']:.1f} | {f['rebuild_s']:.1f} | {f['recovery_s']:.1f} | "
                f"{f['replaced']} | {r['expert_load_s'] + 10:.1f} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
