"""Benchmark: the expert-parallel exchange and decode step on a 3-node local Ray cluster (CPU, gloo, fp32).

Everything runs in ONE invocation, measurements of the things compared interleaved (A, B, A, B, ...)
so that the noise of a shared machine hits both sides alike; figures are medians and ratios.

1. Exchange per MoE layer, decode sizes (FIXED plan, tokens per trunk T in {1, 8, 32}, D = 1,
   X in {2, 4}), "ours" vs "bare". Both run on the SAME Ray actors (one per global rank, placed
   in a placement group laid out exactly as `ExpertParallelGroup` lays out its ranks: one
   {CPU: 1} bundle per rank, SPREAD over the nodes) sharing ONE gloo process group:
   - ours: `AllToAllDispatcher.__call__` (dispatch + combine, routing bookkeeping included) on
     the trunk rank against `ExpertRank.serve` on the expert ranks, whose shard is an identity
     (no expert compute: the figure is protocol + transport, not FFN work). Timed on the trunk.
   - bare: two `all_to_all_single` calls with preallocated buffers and the same splits: C + 1
     rows of (hidden * 4 + 4) bytes to each expert rank, then C + 1 rows of hidden * 4 bytes back.
   C = `fixed_capacity(T, top_k, X, factor=2.0)`, as `ExpertParallelGroup.plan_for` picks it.
   Each repetition is one Ray call per actor: a barrier, then `--steps` x 8 layers; the trunk
   stamps every layer. Per cell: "mean" = loop time / layers and "med" = the median layer, each
   the median over the repetitions; "ovf" = layers whose random routing exceeds C somewhere (they
   take the overflow path: two more exchanges). Target: ours <= 1.5 x bare.
2. Decode step, D = 1, X in {1, 2, 4} (`ExpertParallelGroup`, real experts) vs the single-process
   model (`LocalModel` loaded in this driver process, stepped through `LocalRunner`: a `TrunkRank` with the
   local dispatcher, the same step code a rank runs), batch B in {1, 8, 32} after a 16-token prefill,
   median over 10 steps. Columns: driver wall time of `await group.step()` (Ray call included),
   the trunk actor's own forward time, and dispatch + combine per layer from the dispatcher's
   always-on timers (this one includes waiting for the expert FFNs).
3. Exchange per layer vs tokens per trunk (1 .. 128), X = 2: FIXED vs VARIABLE (counts exchange +
   uneven splits), identity experts as in 1; bare FIXED-size figure for reference.

Threads: 1 torch thread per rank actor (a {CPU: 1} bundle) and 1 in the driver for the local model.

Usage: python benchmarks/bench_ep.py [--hiddens 256,1024] [--decode-hiddens 256,1024] [--reps 15]
       [--steps 4] [--skip-exchange] [--profile] [--json out.json]
(about 5 minutes with the defaults and --decode-hiddens 256,1024 on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from cluster.placement import ExpertMap, plan_placement  # noqa: E402  # after the sys.path line above
from cluster.process_groups import GroupSpec, free_port, join_group  # noqa: E402
from cluster.topology import GroupShape, Topology  # noqa: E402
from model_shards.moe import Routing  # noqa: E402
from replicas.ep.a2a_protocol import FIXED, StepPlan, fixed_capacity  # noqa: E402

NUM_EXPERTS, TOP_K = 16, 4  # tests/hf_oracle.py TEXT
LAYERS = 8  # MoE layers per step (the tiny config's 8 decoder layers)
CAPACITY_FACTOR = 2.0  # GroupConfig default
DECODE_SIZES = (1, 8, 32)
SWEEP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
TARGET = 1.5
PREFILL = 16
DECODE_WARM, DECODE_STEPS = 2, 10
BLOCK = 16


# ------------------------------------------------------------------------------ exchange micro-benchmark
class _IdentityShard:
    """Stands in for an ExpertShard: every expert returns its input (no compute)."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [None] * num_layers

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return x


def _layer_inputs(tokens: int, hidden: int, seed: int = 0) -> list[tuple[torch.Tensor, Routing]]:
    """Per MoE layer: [T, hidden] tokens and a random top-k routing (distinct experts, weights summing to 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        x = torch.randn(tokens, hidden, generator=g)
        ids = torch.rand(tokens, NUM_EXPERTS, generator=g).topk(TOP_K, dim=1).indices
        w = torch.rand(tokens, TOP_K, generator=g).softmax(dim=1)
        out.append((x, Routing(ids, w)))
    return out


def _overflow_layers(tokens: int, x: int, cap: int, hidden: int) -> int:
    """Layers (of LAYERS) whose routing sends more than C rows to some expert rank (contiguous map): those
    take the overflow path (two more exchanges)."""
    per_rank = NUM_EXPERTS // x
    return sum(
        int(torch.bincount(r.topk_ids_Tk.reshape(-1) // per_rank, minlength=x).max()) > cap
        for _, r in _layer_inputs(tokens, hidden)
    )


class ExchangeBench:
    """One rank of the micro-benchmark group: trunk (AllToAllDispatcher) or expert (ExpertRank)."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def rendezvous(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()[:8]

    def join(self, spec: GroupSpec, rank: int, d: int, x: int, hidden: int) -> None:
        from replicas.ep.dispatch import AllToAllDispatcher
        from replicas.ep.expert_rank import ExpertRank

        self.group = join_group(spec, rank)
        self.shape = GroupShape(d, x)
        self.hidden = hidden
        self.is_trunk = rank < d
        emap = ExpertMap.contiguous(num_experts=NUM_EXPERTS, num_moe_layers=LAYERS, expert_ranks=x)
        if self.is_trunk:
            self.disp = AllToAllDispatcher(
                self.group, self.shape, emap, hidden=hidden, dtype=torch.float32, num_experts=NUM_EXPERTS
            )
        else:
            self.rank = ExpertRank(_IdentityShard(LAYERS), self.group, self.shape, hidden=hidden, dtype=torch.float32)

    def _inputs(self, tokens: int, seed: int) -> list[tuple[torch.Tensor, Routing]]:
        return _layer_inputs(tokens, self.hidden, seed)

    def run(self, kind: str, tokens: int, cap: int, steps: int, seed: int = 0, profile: bool = False) -> dict:
        """`steps` steps of LAYERS MoE layers; kind: "fixed" | "variable" (ours) or "bare".

        Returns seconds per layer (trunk side) and, with `profile`, a cProfile summary of this rank.
        """
        import torch.distributed as dist

        d, x = self.shape.trunk_ranks, self.shape.expert_ranks
        w = d + x
        plan = StepPlan(tuple(range(LAYERS)), FIXED, cap) if kind == "fixed" else StepPlan(tuple(range(LAYERS)))
        pg = self.group.group
        with torch.inference_mode():
            if kind == "bare":
                ib, ob = self.hidden * 4 + 4, self.hidden * 4
                if self.is_trunk:
                    send_a, recv_a = (
                        torch.zeros(x * (cap + 1), ib, dtype=torch.uint8),
                        torch.empty(0, ib, dtype=torch.uint8),
                    )
                    send_b, recv_b = (
                        torch.empty(0, ob, dtype=torch.uint8),
                        torch.empty(x * (cap + 1), ob, dtype=torch.uint8),
                    )
                    a_in, a_out = [0] * d + [cap + 1] * x, [0] * w
                    b_in, b_out = [0] * w, [0] * d + [cap + 1] * x
                else:
                    send_a, recv_a = (
                        torch.empty(0, ib, dtype=torch.uint8),
                        torch.empty(d * (cap + 1), ib, dtype=torch.uint8),
                    )
                    send_b, recv_b = (
                        torch.zeros(d * (cap + 1), ob, dtype=torch.uint8),
                        torch.empty(0, ob, dtype=torch.uint8),
                    )
                    a_in, a_out = [0] * w, [cap + 1] * d + [0] * x
                    b_in, b_out = [cap + 1] * d + [0] * x, [0] * w
            elif self.is_trunk:
                inputs = self._inputs(tokens, seed)
            prof = cProfile.Profile() if profile else None
            dist.barrier(group=pg)
            if prof:
                prof.enable()
            t0 = time.perf_counter()
            stamps = [t0]  # trunk: after every layer
            for _ in range(steps):
                if kind == "bare":
                    for _layer in range(LAYERS):
                        dist.all_to_all_single(
                            recv_a, send_a, output_split_sizes=a_out, input_split_sizes=a_in, group=pg
                        )
                        dist.all_to_all_single(
                            recv_b, send_b, output_split_sizes=b_out, input_split_sizes=b_in, group=pg
                        )
                        stamps.append(time.perf_counter())
                elif self.is_trunk:
                    self.disp.begin(plan)
                    for layer in plan.moe_layers:
                        xx, routing = inputs[layer]
                        y = self.disp(layer, xx, routing)
                        stamps.append(time.perf_counter())
                    self.disp.finish()
                else:
                    self.rank.serve(plan)
            secs = time.perf_counter() - t0
            if prof:
                prof.disable()
            if kind != "bare" and self.is_trunk and tokens:
                # identity experts and weights summing to 1: combine must give the input back
                xx, _ = inputs[LAYERS - 1]
                err = (y - xx).abs().max().item()
                assert err < 1e-5, f"{kind}: identity round trip off by {err}"
        per_layer = [b - a for a, b in zip(stamps, stamps[1:])]
        out = {"s_per_layer": secs / (steps * LAYERS), "median_s": statistics.median(per_layer) if per_layer else 0.0}
        if prof:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
            out["profile"] = s.getvalue()
        return out


class ExchangeGroup:
    """D = 1 trunk + X expert micro-benchmark actors, in their own placement group and gloo group."""

    def __init__(self, x: int, hidden: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.shape = GroupShape(1, x)
        layout = plan_placement(self.shape, Topology(nodes=1), cpus_per_rank=1.0)
        self.pg = placement_group(list(layout.bundles), strategy=layout.strategy)
        ray.get(self.pg.ready(), timeout=120)
        cls = ray.remote(max_restarts=0)(ExchangeBench)
        self.actors = [
            cls.options(
                num_cpus=1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=layout.bundle_of(r)
                ),
            ).remote()
            for r in range(self.shape.world_size)
        ]
        self.nodes = ray.get([a.node.remote() for a in self.actors])
        addr, port = ray.get(self.actors[0].rendezvous.remote())
        spec = GroupSpec(
            master_addr=addr,
            master_port=port,
            world_size=self.shape.world_size,
            backend="gloo",
            deadline_s=60.0,
            epoch=0,
        )
        ray.get([a.join.remote(spec, r, 1, x, hidden) for r, a in enumerate(self.actors)], timeout=120)

    def run(self, kind: str, tokens: int, cap: int, steps: int, profile: bool = False) -> dict:
        import ray

        res = ray.get([a.run.remote(kind, tokens, cap, steps, 0, profile) for a in self.actors], timeout=600)
        return {**res[0], "profiles": [r.get("profile") for r in res]}

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        remove_placement_group(self.pg)


def _interleaved(
    group: ExchangeGroup, kinds: list[tuple[str, int, int]], reps: int, steps: int
) -> list[tuple[float, float]]:
    """Per (kind, tokens, cap): (mean, median) ms per layer, each the median over `reps` interleaved runs
    (order rotated each rep) of that run's mean / median layer time."""
    for kind, t, c in kinds:  # warm-up
        group.run(kind, t, c, 1)
    means: list[list[float]] = [[] for _ in kinds]
    medians: list[list[float]] = [[] for _ in kinds]
    for rep in range(reps):
        n = len(kinds)
        for i in [(rep + j) % n for j in range(n)]:
            kind, t, c = kinds[i]
            res = group.run(kind, t, c, steps)
            means[i].append(res["s_per_layer"] * 1e3)
            medians[i].append(res["median_s"] * 1e3)
    return [(statistics.median(a), statistics.median(b)) for a, b in zip(means, medians)]


def bench_exchange(hiddens: list[int], reps: int, steps: int, profile: bool) -> dict:
    out: dict = {"decode": [], "sweep": [], "profiles": {}}
    for hidden in hiddens:
        for x in (2, 4):
            g = ExchangeGroup(x, hidden)
            try:
                kinds = []
                for t in DECODE_SIZES:
                    c = fixed_capacity(t, top_k=TOP_K, expert_ranks=x, factor=CAPACITY_FACTOR)
                    kinds += [("fixed", t, c), ("bare", t, c)]
                med = _interleaved(g, kinds, reps, steps)
                for i, t in enumerate(DECODE_SIZES):
                    (ours, ours_med), (bare, bare_med) = med[2 * i], med[2 * i + 1]
                    c = kinds[2 * i][2]
                    out["decode"].append(
                        dict(
                            hidden=hidden,
                            x=x,
                            tokens=t,
                            cap=c,
                            ours_ms=ours,
                            bare_ms=bare,
                            ratio=ours / bare,
                            ours_med_ms=ours_med,
                            bare_med_ms=bare_med,
                            ratio_med=ours_med / bare_med,
                            overflow=_overflow_layers(t, x, c, hidden),
                            nodes=g.nodes,
                        )
                    )
                if profile and hidden == hiddens[0]:
                    for t in (8,):
                        c = fixed_capacity(t, top_k=TOP_K, expert_ranks=x, factor=CAPACITY_FACTOR)
                        res = g.run("fixed", t, c, steps * 4, profile=True)
                        out["profiles"][f"x{x}_t{t}"] = res["profiles"]
                if x == 2:
                    kinds = []
                    for t in SWEEP_SIZES:
                        c = fixed_capacity(t, top_k=TOP_K, expert_ranks=x, factor=CAPACITY_FACTOR)
                        kinds += [("fixed", t, c), ("variable", t, 0), ("bare", t, c)]
                    med = _interleaved(g, kinds, max(5, reps // 2), steps)
                    for i, t in enumerate(SWEEP_SIZES):
                        out["sweep"].append(
                            dict(
                                hidden=hidden,
                                x=x,
                                tokens=t,
                                cap=kinds[3 * i][2],
                                fixed_ms=med[3 * i][0],
                                variable_ms=med[3 * i + 1][0],
                                bare_ms=med[3 * i + 2][0],
                                fixed_med_ms=med[3 * i][1],
                                variable_med_ms=med[3 * i + 1][1],
                                bare_med_ms=med[3 * i + 2][1],
                                overflow=_overflow_layers(t, x, kinds[3 * i][2], hidden),
                            )
                        )
            finally:
                g.shutdown()
    return out


# ------------------------------------------------------------------------------ decode steps
def bench_decode(hiddens: list[int], tmp: Path) -> list[dict]:
    import ray

    from model_shards.model import LocalModel
    from model_shards.sampling import SamplingParams
    from replicas.engine.step_types import SeqStart, SeqStep, StepRequest
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig
    from replicas.ep.local_runner import LocalRunner
    from tests.hf_oracle import save_random_hf_checkpoint

    rows = []
    greedy = SamplingParams(temperature=0.0)
    blocks_per_seq = -(-(PREFILL + DECODE_WARM + DECODE_STEPS + 1) // BLOCK)
    n_seqs = sum(DECODE_SIZES)
    caches = CacheSizes(num_blocks=n_seqs * blocks_per_seq, block_size=BLOCK, num_slots=n_seqs)
    torch.set_num_threads(1)
    for hidden in hiddens:
        folder = save_random_hf_checkpoint(tmp / f"ckpt{hidden}", text_overrides={"hidden_size": hidden})
        model = LocalModel.load(folder, dtype="float32")
        local = LocalRunner(model, caches)  # the in-process runner `epserve generate` uses
        groups = {}
        for x in (1, 2, 4):
            groups[x] = ExpertParallelGroup(
                GroupConfig(
                    model_dir=str(folder), shape=GroupShape(1, x), dtype="float32", deadline_s=60.0, caches=caches
                )
            )
            groups[x].start()
        layouts = ["local"] + [f"X={x}" for x in groups]
        loop = asyncio.new_event_loop()
        try:
            g = torch.Generator().manual_seed(hidden)
            base = 0
            for b in DECODE_SIZES:
                sids = list(range(base, base + b))
                base += b
                prompts = {s: torch.randint(0, model.cfg.vocab_size, (PREFILL,), generator=g).tolist() for s in sids}
                state = {name: {s: dict(pending=list(prompts[s]), ctx=0) for s in sids} for name in layouts}
                samples: dict[str, list[dict]] = {name: [] for name in layouts}
                for step in range(1 + DECODE_WARM + DECODE_STEPS):
                    for name in layouts[step % len(layouts) :] + layouts[: step % len(layouts)]:  # rotate the order
                        st = state[name]
                        req = StepRequest(
                            tuple(
                                SeqStep(  # the first step starts each sequence on its rank with its whole table
                                    s,
                                    st[s]["ctx"],
                                    tuple(st[s]["pending"]),
                                    tuple(range(s * blocks_per_seq, (s + 1) * blocks_per_seq))
                                    if not st[s]["ctx"]
                                    else (),
                                    start=SeqStart(s, greedy, PREFILL) if not st[s]["ctx"] else None,
                                )
                                for s in sids
                            )
                        )
                        t0 = time.perf_counter()
                        if name == "local":
                            res = local.run_step([req])[0]
                            wall = time.perf_counter() - t0
                            exch = {}
                        else:
                            grp = groups[int(name[2:])]
                            res = loop.run_until_complete(grp.step([req]))[0]
                            wall = time.perf_counter() - t0
                            exch = ray.get(grp.trunks[0].take_timings.remote())
                        for s, tok in zip(sids, res.token_ids):
                            st[s]["ctx"] += len(st[s]["pending"])
                            st[s]["pending"] = [tok]
                        if step > DECODE_WARM:  # step 0 is the prefill
                            samples[name].append(
                                dict(
                                    wall=wall,
                                    fwd=res.timings.get("forward_s", 0.0),
                                    exch=exch.get("exchange_s", 0.0) / max(exch.get("layers", 0), 1),
                                )
                            )
                toks = {name: [state[name][s]["pending"][0] for s in sids] for name in layouts}
                same = all(toks[n] == toks["local"] for n in layouts)
                loc = statistics.median(r["wall"] for r in samples["local"])
                for name in layouts:
                    med = {k: statistics.median(r[k] for r in samples[name]) for k in ("wall", "fwd", "exch")}
                    rows.append(
                        dict(
                            hidden=hidden,
                            batch=b,
                            layout=name,
                            wall_ms=med["wall"] * 1e3,
                            fwd_ms=med["fwd"] * 1e3,
                            exch_ms=med["exch"] * 1e3,
                            vs_local=med["wall"] / loc,
                            same_tokens=same,
                        )
                    )
        finally:
            loop.close()
            for grp in groups.values():
                grp.shutdown()
    return rows


# ------------------------------------------------------------------------------ report
def _table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [
        "| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |",
        "|" + "|".join("-" * (n + 2) for n in w) + "|",
    ]
    lines += ["| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def report(ex: dict, dec: list[dict]) -> str:
    out = []
    if ex["decode"]:
        out.append(
            "## 1. Exchange per MoE layer, FIXED, decode sizes (D = 1; identity experts) vs bare all_to_all_single x2"
        )
        out.append(
            f"target: ours <= {TARGET}x bare. mean = loop time / layers; median = median layer; each the median "
            "of the interleaved repetitions. ovf = layers (of 8) where the routing exceeded C (2 more exchanges)"
        )
        out.append(
            _table(
                [
                    "hidden",
                    "X",
                    "tokens",
                    "C",
                    "ovf",
                    "ours mean ms",
                    "bare mean ms",
                    "ratio",
                    "ours med ms",
                    "bare med ms",
                    "ratio med",
                    "target",
                ],
                [
                    [
                        str(r["hidden"]),
                        str(r["x"]),
                        str(r["tokens"]),
                        str(r["cap"]),
                        f"{r['overflow']}/{LAYERS}",
                        f"{r['ours_ms']:.3f}",
                        f"{r['bare_ms']:.3f}",
                        f"{r['ratio']:.2f}",
                        f"{r['ours_med_ms']:.3f}",
                        f"{r['bare_med_ms']:.3f}",
                        f"{r['ratio_med']:.2f}",
                        "ok" if r["ratio"] <= TARGET else "MISS",
                    ]
                    for r in ex["decode"]
                ],
            )
        )
        seen = {}
        for r in ex["decode"]:
            seen.setdefault((r["hidden"], r["x"]), " ".join(r["nodes"]))
        out.append(
            "node of global ranks 0..X (trunk first): "
            + "; ".join(f"hidden {h} X={x}: {v}" for (h, x), v in seen.items())
        )
    if dec:
        out.append(
            "\n## 2. Decode step, D = 1, median of %d steps after a %d-token prefill (fp32, 1 thread per process)"
            % (DECODE_STEPS, PREFILL)
        )
        out.append(
            "step wall = driver time of one step (Ray call included); trunk fwd = the trunk actor's forward; "
            "exch = dispatch + combine per layer inside the trunk (expert FFN wait included)"
        )
        out.append(
            _table(
                [
                    "hidden",
                    "batch",
                    "layout",
                    "step wall ms",
                    "vs local",
                    "trunk fwd ms",
                    "exch ms/layer",
                    "tokens = local",
                ],
                [
                    [
                        str(r["hidden"]),
                        str(r["batch"]),
                        r["layout"],
                        f"{r['wall_ms']:.2f}",
                        f"{r['vs_local']:.2f}",
                        f"{r['fwd_ms']:.2f}",
                        f"{r['exch_ms']:.3f}" if r["layout"] != "local" else "-",
                        str(r["same_tokens"]),
                    ]
                    for r in dec
                ],
            )
        )
    if ex["sweep"]:
        out.append(
            "\n## 3. Exchange per MoE layer vs tokens per trunk, X = 2 (identity experts; mean ms per layer, "
            "median layer in brackets)"
        )
        out.append(
            _table(
                [
                    "hidden",
                    "tokens",
                    "C",
                    "ovf",
                    "FIXED ms",
                    "VARIABLE ms",
                    "FIXED/VARIABLE",
                    "bare(FIXED) ms",
                    "FIXED/bare",
                ],
                [
                    [
                        str(r["hidden"]),
                        str(r["tokens"]),
                        str(r["cap"]),
                        f"{r['overflow']}/{LAYERS}",
                        f"{r['fixed_ms']:.3f} ({r['fixed_med_ms']:.3f})",
                        f"{r['variable_ms']:.3f} ({r['variable_med_ms']:.3f})",
                        f"{r['fixed_ms'] / r['variable_ms']:.2f}",
                        f"{r['bare_ms']:.3f} ({r['bare_med_ms']:.3f})",
                        f"{r['fixed_ms'] / r['bare_ms']:.2f}",
                    ]
                    for r in ex["sweep"]
                ],
            )
        )
    for name, profs in ex.get("profiles", {}).items():
        for rank, p in enumerate(profs):
            if p:
                out.append(f"\n## profile {name}, global rank {rank}\n{p}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hiddens", default="256,1024", help="hidden sizes for the exchange benchmarks (1, 3)")
    ap.add_argument("--decode-hiddens", default="256", help="hidden sizes for the decode benchmark (2); '' skips it")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions per exchange cell")
    ap.add_argument("--steps", type=int, default=4, help=f"steps of {LAYERS} MoE layers per repetition")
    ap.add_argument("--skip-exchange", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile the FIXED exchange at 8 tokens per trunk")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cluster.local_cluster import start_local_cluster

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"python {platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    t_start = time.time()
    cluster = start_local_cluster(3, cpus_per_node=6)
    try:
        hiddens = [int(h) for h in args.hiddens.split(",") if h]
        ex = (
            {"decode": [], "sweep": [], "profiles": {}}
            if args.skip_exchange
            else bench_exchange(hiddens, args.reps, args.steps, args.profile)
        )
        with tempfile.TemporaryDirectory() as tmp:
            dec = bench_decode([int(h) for h in args.decode_hiddens.split(",") if h], Path(tmp))
    finally:
        cluster.shutdown()
    print(report(ex, dec))
    print(f"\ntotal {time.time() - t_start:.0f} s, load average at end {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"exchange": {k: v for k, v in ex.items() if k != "profiles"}, "decode": dec}, indent=1)
        )


if __name__ == "__main__":
    main()
