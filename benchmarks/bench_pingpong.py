"""Benchmark: ping-pong micro-batches (issue 15 item 1), decode step with m = 2 vs m = 1.

D = 1 trunk rank, X = 1 expert rank, the `wide` random checkpoint of benchmarks/bench_model.py (hidden 1024, 64
experts, top-8, 8 layers), fp32, batch B (default 32) after a 16-token prefill, on a 2-node local Ray cluster
(CPU ranks, gloo; one {CPU: 1} bundle and 1 torch thread per rank, so the trunk and the expert rank each have a
core when the machine has them free). Two groups are up at once, m = 1 and m = 2 (`GroupConfig.micro_batches`);
their steps are interleaved (A, B, B, A, ...) so the noise of a shared machine hits both alike. Per layout: the
median driver wall time of `await group.step()` and of the trunk rank's own forward; the ratio m = 1 / m = 2 of the
wall medians (target >= 1.3x). Greedy tokens of the two layouts are compared every step (they must be equal).

Diagnostics printed beside the figures (why m = 2 gains what it gains):
- torch intra-op threads of each rank process (asked of the actors: 1 each, from `GroupConfig.cpus_per_rank`);
- per step, the CPU seconds each rank process used (/proc, this host) and the trunk's seconds inside its exchanges;
  CPU/wall = (trunk + expert CPU) / wall: 2 means both ranks computed all along, 1 that they took turns, below 1
  that the machine did not give them a core each;
- the ideal m = 2 speedup with a core per rank, (trunk + expert CPU) / max of the two, from m = 1's CPU times, and
  the same bound from m = 2's own CPU times (which are larger: the split costs work);
- per token and decoder layer, trunk vs routed-expert multiply-adds of this config and of the real 397B config
  (`flop_split`), and the cost of one routed-expert FFN call of B x top-k rows against two calls of half as many
  (`expert_ffn_cost`: every call streams all the rank's expert weights, so a micro-batch re-reads them).

Usage: python benchmarks/bench_pingpong.py [--batch 32] [--steps 30] [--config wide] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

PREFILL, WARM, BLOCK = 16, 3, 16


def bench(config: str, batch: int, steps: int, tmp: Path) -> dict:
    from benchmarks.bench_model import save_checkpoint
    from cluster.topology import GroupShape
    from model_shards.sampling import SamplingParams
    from replicas.engine.step_types import SeqStart, SeqStep, StepRequest
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    folder = save_checkpoint(config, tmp / config)
    blocks_per_seq = -(-(PREFILL + WARM + steps + 2) // BLOCK)
    caches = CacheSizes(num_blocks=batch * blocks_per_seq, block_size=BLOCK, num_slots=batch)
    groups = {
        m: ExpertParallelGroup(
            GroupConfig(
                model_dir=str(folder),
                shape=GroupShape(1, 1),
                dtype="float32",
                deadline_s=120.0,
                caches=caches,
                micro_batches=m,
            )
        )
        for m in (1, 2)
    }
    for g in groups.values():
        g.start()
    import psutil
    import ray

    # each rank process: its pid (for CPU time from /proc, this host) and its torch intra-op threads
    procs = {
        m: [psutil.Process(p) for p in ray.get([a.pid.remote() for a in g.trunks + g.experts])]
        for m, g in groups.items()
    }
    threads = {}
    for m, g in groups.items():
        try:  # the expert's default thread runs its step loop: ask on the control group
            threads[m] = ray.get(
                [
                    a.__ray_call__.options(concurrency_group="control").remote(lambda _: torch.get_num_threads())
                    for a in g.trunks + g.experts
                ],
                timeout=30,
            )
        except Exception as exc:  # noqa: BLE001  # a diagnostic only
            threads[m] = [f"? ({type(exc).__name__})"]
    greedy = SamplingParams(temperature=0.0)
    vocab = groups[1].cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (PREFILL,), generator=gen).tolist() for _ in range(batch)]
    state = {m: [dict(pending=list(p), ctx=0) for p in prompts] for m in groups}
    samples: dict[int, list[tuple[float, float, float, float, float]]] = {m: [] for m in groups}
    mismatched = 0
    loop = asyncio.new_event_loop()
    try:
        for step in range(1 + WARM + steps):
            order = (1, 2) if step % 2 == 0 else (2, 1)
            toks = {}
            for m in order:
                st = state[m]
                req = StepRequest(
                    tuple(
                        SeqStep(
                            s,
                            st[s]["ctx"],
                            tuple(st[s]["pending"]),
                            tuple(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) if not st[s]["ctx"] else (),
                            start=SeqStart(s, greedy, PREFILL) if not st[s]["ctx"] else None,
                        )
                        for s in range(batch)
                    )
                )
                cpu0 = [p.cpu_times() for p in procs[m]]
                t0 = time.perf_counter()
                res = loop.run_until_complete(groups[m].step([req]))[0]
                wall = time.perf_counter() - t0
                cpu = [sum(p.cpu_times()[:2]) - sum(c[:2]) for p, c in zip(procs[m], cpu0, strict=True)]
                exch = ray.get(groups[m].trunks[0].take_timings.remote()).get("exchange_s", 0.0)
                for s, tok in enumerate(res.token_ids):
                    st[s]["ctx"] += len(st[s]["pending"])
                    st[s]["pending"] = [tok]
                toks[m] = res.token_ids
                if step > WARM:  # step 0 is the prefill
                    samples[m].append((wall, res.timings.get("forward_s", 0.0), exch, cpu[0], cpu[1]))
            mismatched += toks[1] != toks[2]
    finally:
        loop.close()
        for g in groups.values():
            g.shutdown()
    out: dict = {"config": config, "batch": batch, "steps": steps, "steps_with_different_tokens": mismatched}
    out["torch_threads_per_rank"] = {f"m{m}": t for m, t in threads.items()}
    for m in groups:
        for k, name in enumerate(("wall", "forward", "exchange", "trunk_cpu", "expert_cpu")):
            out[f"m{m}_{name}_ms"] = statistics.median(x[k] for x in samples[m]) * 1e3
        # CPU seconds both ranks got per wall second of the step: 1 = they took turns, 2 = both busy all along
        out[f"m{m}_parallelism"] = statistics.median((x[3] + x[4]) / x[0] for x in samples[m])
    out["speedup"] = out["m1_wall_ms"] / out["m2_wall_ms"]
    # what m = 2 could reach with a core per rank: the step as long as the busier rank (m = 1's CPU times)
    out["ideal_speedup"] = (out["m1_trunk_cpu_ms"] + out["m1_expert_cpu_ms"]) / max(
        out["m1_trunk_cpu_ms"], out["m1_expert_cpu_ms"]
    )
    # ... and counting the work the split adds: m = 1's serial CPU over the busier rank's CPU at m = 2
    out["ideal_speedup_with_split_cost"] = (out["m1_trunk_cpu_ms"] + out["m1_expert_cpu_ms"]) / max(
        out["m2_trunk_cpu_ms"], out["m2_expert_cpu_ms"]
    )
    return out


def flop_split(c: dict, ctx: int = 32) -> dict[str, float]:
    """Multiply-adds per token per decoder layer (millions) on the trunk rank (mixer, router, shared expert and
    the lm_head's share per layer) and on the expert ranks (top-k routed experts); attention over `ctx` tokens.
    `c` is a text config (HF names)."""
    h, hd = c["hidden_size"], c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])
    nk, nv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    # DeltaNet: in_proj q, k, v, z, a, b; out_proj; the recurrent state's update and read-out (~3 dk dv per head)
    linear = h * (2 * nk * dk + 2 * nv * dv + 2 * nv) + nv * dv * h + 3 * nv * dk * dv
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    attention = h * (2 * heads * hd + 2 * kv * hd) + heads * hd * h + 2 * heads * hd * ctx  # q with its gate
    layers = c["num_hidden_layers"]
    full = layers // c.get("full_attention_interval", 4)
    mixer = ((layers - full) * linear + full * attention) / layers
    trunk = mixer + h * c["num_experts"] + 3 * h * c["shared_expert_intermediate_size"] + h
    trunk += h * c["vocab_size"] / layers
    routed = c["num_experts_per_tok"] * 3 * h * c["moe_intermediate_size"]
    return {"trunk_M": trunk / 1e6, "routed_M": routed / 1e6, "expert_share": routed / (trunk + routed)}


def expert_ffn_cost(c: dict, batch: int, reps: int = 15) -> dict[str, float]:
    """CPU ms (this thread) of one routed-expert FFN call over all experts with batch x top-k rows, and of two
    calls with half the rows each (m = 2), fp32, one thread."""
    from model_shards.moe import expert_ffn

    e, d, i, k = c["num_experts"], c["hidden_size"], c["moe_intermediate_size"], c["num_experts_per_tok"]
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(e, 2 * i, d, generator=gen) * 0.02, torch.randn(e, d, i, generator=gen) * 0.02

    def cost(rows: int) -> float:
        ids = torch.randint(0, e, (rows,), generator=gen).sort().values
        counts, x = torch.bincount(ids, minlength=e), torch.randn(rows, d, generator=gen)
        times = []
        for _ in range(reps):
            t0 = time.thread_time()
            expert_ffn(x, counts_E=counts, gate_up=gate_up, down=down)
            times.append(time.thread_time() - t0)
        return statistics.median(times) * 1e3

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank runs (with more, OpenMP's spinning waits count as this thread's CPU)
    try:
        return {"one_call_ms": cost(batch * k), "two_half_calls_ms": 2 * cost(batch * k // 2)}
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="wide", help="a config of benchmarks/bench_model.py (default wide)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per layout (after 3 warm-up steps)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cluster.local_cluster import start_local_cluster

    torch.set_num_threads(1)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs visible, torch {torch.__version__}, "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    from benchmarks.bench_model import CONFIGS

    text = CONFIGS[args.config]
    real = ROOT.parent / "shared" / "configs" / "qwen3.5-397b-a17b.config.json"
    print(f"multiply-adds per token per layer, {args.config}: {flop_split(text)}")
    if real.exists():
        print(f"multiply-adds per token per layer, 397B: {flop_split(json.loads(real.read_text())['text_config'])}")
    ffn = expert_ffn_cost(text, args.batch)
    one, two = ffn["one_call_ms"], ffn["two_half_calls_ms"]
    print(
        f"routed-expert FFN per layer, fp32, 1 thread: {args.batch} x top-k rows in one call {one:.1f} ms CPU, "
        f"in two half calls {two:.1f} ms ({two / one:.2f}x)"
    )
    t_start = time.time()
    cluster = start_local_cluster(2, cpus_per_node=4)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench(args.config, args.batch, args.steps, Path(tmp))
    finally:
        cluster.shutdown()
    print(f"## decode step, D = 1, X = 1, {r['config']} model, fp32, batch {r['batch']}, median of {r['steps']} steps")
    print(f"torch threads per rank (trunk, expert): {r['torch_threads_per_rank']}")
    print("| layout | wall ms | trunk forward ms | trunk in exchanges ms | trunk CPU ms | expert CPU ms | CPU/wall |")
    print("|--------|---------|------------------|-----------------------|--------------|---------------|----------|")
    for m in (1, 2):
        v = {k[3:]: x for k, x in r.items() if k.startswith(f"m{m}_")}
        print(
            f"| m = {m}  | {v['wall_ms']:7.1f} | {v['forward_ms']:16.1f} | {v['exchange_ms']:21.1f} | "
            f"{v['trunk_cpu_ms']:12.1f} | {v['expert_cpu_ms']:13.1f} | {v['parallelism']:8.2f} |"
        )
    target = "met" if r["speedup"] >= 1.3 else "MISS"
    print(f"speedup m = 1 / m = 2 (wall medians): {r['speedup']:.2f}x (target >= 1.3x: {target})")
    print(f"ideal with a core per rank, (trunk + expert CPU) / max of them at m = 1: {r['ideal_speedup']:.2f}x")
    print(
        "the same over the busier rank's CPU at m = 2 (the split's own cost counted): "
        f"{r['ideal_speedup_with_split_cost']:.2f}x"
    )
    print(f"steps whose greedy tokens differ between m = 1 and m = 2: {r['steps_with_different_tokens']}")
    print(f"total {time.time() - t_start:.0f} s, load average at end {os.getloadavg()[0]:.1f} (1 min)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
