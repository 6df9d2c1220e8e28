"""Benchmark: prefix caching and prefix-aware routing (issue 17's figures) on the real app over HTTP.

One invocation, one local Ray cluster, the embedded tiny model (float32 on CPU by default), D = 1 x X = 0 per
engine replica, the app deployed with `serve.run(build_app(AppArgs(...)))` as `epserve serve` does. Sections:

1. shared prefix (loadtest's shared-prefix dataset, token-id prompts of exact lengths): G groups x R requests,
   S shared + U unique tokens, O output tokens (ignore_eos); one request of each group first, the others in
   random order, at concurrency C; run with the prefix cache off (`--no-prefix-cache`) and on: token hit rate
   (sum of usage.prompt_tokens_details.cached_tokens / sum of prompt tokens; ideal (R-1)S / R(S+U)) and TTFT
   p50 of each, and their ratio.
2. multi-turn chat (loadtest/multiturn.py): N conversations of T turns whose assistant turns are the server's
   own replies, cache on: per turn the mean cached tokens against the floor (the previous turn's assistant
   header start rounded down to 64) and how many conversations reached it.
3. two engine replicas, cache on, the shared-prefix run again: per group the share of its requests on its
   busiest replica (`x-epserve-engine` response header), and max/mean of the replicas' running + waiting
   sequences sampled every second from the app's metrics hub (/metrics only has their sum; each value is its
   replica's last push, so a sample's two values may be up to a second apart), and the same measure rebuilt from
   the run's records (a request is in flight on its replica from send to end of stream), split into the steady
   phase (first send after the group-firsts .. last send: full concurrency in flight) and the drain tail (one
   request against none is 2.0 for any router).

Figures are printed (and written with --json); nothing is asserted. The cache-off run is `AppArgs.prefix_cache`
False (`epserve serve --no-prefix-cache`).

Usage: python benchmarks/bench_prefix_cache.py [--sections 1,2,3] [--groups 8] [--per-group 16]
       [--shared 2048] [--unique 128] [--output 32] [--concurrency 8] [--max-num-batched-tokens 512]
       [--turns 6] [--conversations 8] [--json out.json]
Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

APP, PREFIX, MODEL_NAME = "pfxbench", "/pfx", "pfx-tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="1,2,3", help="which sections to run (default 1,2,3)")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=16)
    p.add_argument("--shared", type=int, default=2048, help="shared prefix tokens")
    p.add_argument("--unique", type=int, default=128, help="unique tokens after the prefix")
    p.add_argument("--output", type=int, default=32, help="output tokens per request")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="prefill chunk per step: a cold prompt of S+U tokens takes several steps, a hit one (default 512)",
    )
    p.add_argument("--num-kv-blocks", type=int, default=4096, help="per trunk rank, block size 16")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/epserve"))
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    return p.parse_args(argv)


def off_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """AppArgs overrides that turn the prefix cache off (`--no-prefix-cache`)."""
    return {"prefix_cache": False}


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.results: dict[str, Any] = {"config": vars(a)}

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        from ray import serve

        from cluster.local_cluster import start_local_cluster
        from cluster.process_groups import free_port
        from model_shards.tiny_checkpoint import embedded_model

        t0 = time.monotonic()
        self.folder = str(embedded_model(Path(self.a.cache_dir)))
        self.cluster = start_local_cluster(1, cpus_per_node=8)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.base = f"http://127.0.0.1:{self.port}{PREFIX}"
        print(f"cluster up ({time.monotonic() - t0:.1f} s); model {self.folder}", flush=True)

    def deploy(self, *, replicas: int, extra: dict[str, Any] | None = None) -> None:
        from ray import serve

        from replicas.serving.app import build_app
        from replicas.serving.app_args import AppArgs, AutoscalingArgs

        a = self.a
        t0 = time.monotonic()
        if APP in serve.status().applications:
            serve.delete(APP)
        args = AppArgs(
            model=self.folder,
            served_model_name=MODEL_NAME,
            dtype=a.dtype,
            trunk_ranks=1,
            expert_ranks=0,
            num_kv_blocks=a.num_kv_blocks,
            block_size=16,
            max_num_seqs=max(32, a.concurrency),  # AppArgs default: 32 sequences and 32 state checkpoints
            max_num_batched_tokens=a.max_num_batched_tokens,
            max_model_len=max(4096, a.shared + a.unique + a.output + 64),
            collective_deadline_s=60,
            ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
            engine_autoscaling=AutoscalingArgs(min_replicas=replicas, max_replicas=replicas),
            **(extra or {}),
        )
        serve.run(build_app(args), name=APP, route_prefix=PREFIX)
        asyncio.run(self._warm(replicas))
        print(f"app up: {replicas} engine replica(s) {extra or ''} ({time.monotonic() - t0:.1f} s)", flush=True)

    async def _warm(self, replicas: int) -> None:
        """Unrelated short prompts until every engine replica ran one (first steps pay one-off costs)."""
        import aiohttp

        seen: set[str] = set()
        async with aiohttp.ClientSession() as s:
            for i in range(40):
                body = {"model": MODEL_NAME, "prompt": [7 + i, 11, 13] * 20, "max_tokens": 4}
                async with s.post(self.base + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    seen.add(r.headers.get("x-epserve-engine", ""))
                if len(seen) >= replicas and i >= 2 * replicas:
                    return

    # ------------------------------------------------------------------ runs
    def shared_prefix(self, label: str, *, sample_load: bool = False) -> dict[str, Any]:
        from loadtest.datasets import shared_prefix_requests
        from loadtest.http_client import OpenAICompletionsClient
        from loadtest.metrics import summarize
        from loadtest.prefix_stats import LoadSampler, balance, inflight_balance, landing, token_hit_rate
        from loadtest.runner import RunConfig
        from loadtest.runner import run as run_bench

        a = self.a
        reqs = shared_prefix_requests(
            a.groups * a.per_group,
            groups=a.groups,
            prefix_len=a.shared,
            input_len=a.unique,
            output_len=a.output,
            seed=a.seed,
            group_firsts_first=True,
        )
        cfg = RunConfig(max_concurrency=a.concurrency, progress=False, seed=a.seed)
        client = OpenAICompletionsClient(self.base, model=MODEL_NAME, ignore_eos=True, max_connections=a.concurrency)

        async def go():  # noqa: ANN202  # -> (RunOutcome, load samples)
            import ray

            hub = ray.get_actor(f"epserve-metrics-{MODEL_NAME}", namespace="epserve")

            async def load() -> dict[str, float]:
                return await hub.gauge_by_replica.remote(["num_requests_running", "num_requests_waiting"])

            async with client, LoadSampler(load) as sampler:
                out = await run_bench(client, reqs, cfg)
            await asyncio.sleep(2.5)  # one metrics push after the last request
            states = await hub.gauge_by_replica.remote(["prefix_cache_states"])
            return out, sampler.samples, sum(states.values())

        t0 = time.monotonic()
        outcome, samples, states = asyncio.run(go())
        res = outcome.results
        summary = summarize(res, outcome.duration_s)
        fig = {
            "failed": summary["failed"],
            "duration_s": outcome.duration_s,
            "median_ttft_ms": summary["median_ttft_ms"],
            **token_hit_rate(res),
            "ideal_hit_rate": (a.per_group - 1) * a.shared / (a.per_group * (a.shared + a.unique)),
            "states_held": states,  # saved DeltaNet states the prefix cache holds after the run (all replicas)
        }
        if sample_load:
            fig["landing"] = landing(res)
            fig["balance"] = balance(samples)
            fig["inflight"] = inflight_balance(res, a.groups)
            # each request's send, end, replica and group, so a run's routing can be replayed (--json)
            fig["requests"] = [[r.start, r.end, r.engine, r.group, r.usage_cached_tokens] for r in res]
        print(
            f"[{label}] {len(res)} requests in {time.monotonic() - t0:.0f} s, failed {fig['failed']}: "
            f"TTFT p50 {fig['median_ttft_ms']:.0f} ms, token hit rate {fig['token_hit_rate']:.3f} "
            f"(ideal {fig['ideal_hit_rate']:.3f}; {fig['requests_reporting_cached_tokens']} responses carried "
            f"cached_tokens); states held after the run: {states:.0f} ({states / a.groups:.2f} per group)",
            flush=True,
        )
        if sample_load:
            land, bal = fig["landing"], fig["balance"]
            shares = " ".join(f"{g}:{v['top_share']:.2f}" for g, v in land["groups"].items())
            print(
                f"[{label}] share of each group on its busiest replica: {shares} (min {land['min_top_share']:.3f}"
                f"{'' if land['engines_named'] else '; no x-epserve-engine header'}); running + waiting max/mean: "
                f"worst sample {bal['max_over_mean_max']:.2f} "
                f"(at full load {bal['max_over_mean_max_at_full_load']:.2f}), "
                f"mean over samples {bal['max_over_mean_mean']:.2f}, "
                f"of the averages {bal['max_over_mean_of_averages']:.2f} ({bal['busy_samples']} busy samples)",
                flush=True,
            )
            for phase, ph in fig["inflight"].items():
                print(
                    f"[{label}] in flight per replica from the records, {phase} ({ph['from_s']:.1f}-{ph['to_s']:.1f} "
                    f"s): max/mean worst of {ph['samples']} samples (1/s) {ph['worst_sample']:.2f}, mean "
                    f"{ph['mean_sample']:.2f}, samples above 1.5: {ph['samples_above_1_5']}; worst at any instant "
                    f"{ph['worst_instant']:.2f}",
                    flush=True,
                )
        return fig

    def multi_turn(self) -> list[dict[str, Any]]:
        from loadtest.multiturn import ChatReplayClient, conversations, replay, turn_report

        a = self.a
        convs = conversations(a.conversations, turns=a.turns, seed=a.seed)
        client = ChatReplayClient(self.base, model=MODEL_NAME, max_tokens=a.output)

        async def go():  # noqa: ANN202  # -> list[TurnRecord]
            async with client:
                return await replay(client, convs, concurrency=a.concurrency)

        t0 = time.monotonic()
        records = asyncio.run(go())
        errors = [r.error for r in records if r.error]
        rows = turn_report(records)
        print(f"[multi-turn] {len(records)} turns in {time.monotonic() - t0:.0f} s, {len(errors)} failed", flush=True)
        if errors:
            print(f"  first error: {errors[0]}", flush=True)
        print(f"  {'turn':>4} {'convs':>5} {'prompt':>7} {'cached':>7} {'floor':>7} {'reached':>8} {'TTFT p50 ms':>11}")
        for r in rows:
            print(
                f"  {r['turn']:>4} {r['conversations']:>5} {r['mean_prompt_tokens']:>7.0f} "
                f"{r['mean_cached_tokens']:>7.0f} {_num(r['mean_floor']):>7} {r['reached_floor']:>8} "
                f"{r['median_ttft_ms']:>11.0f}",
                flush=True,
            )
        return rows

    def run(self) -> None:
        a = self.a
        sections = {int(s) for s in a.sections.split(",") if s}
        if 1 in sections:
            self.deploy(replicas=1, extra=off_kwargs(a))
            self.results["shared_prefix_off"] = off = self.shared_prefix("cache off")
            self.deploy(replicas=1)
            self.results["shared_prefix_on"] = on = self.shared_prefix("cache on")
            ratio = off["median_ttft_ms"] / on["median_ttft_ms"]
            self.results["ttft_p50_off_over_on"] = ratio
            print(f"TTFT p50 off / on: {ratio:.2f}x", flush=True)
        if 2 in sections:
            if 1 not in sections:
                self.deploy(replicas=1)
            self.results["multi_turn"] = self.multi_turn()
        if 3 in sections:
            self.deploy(replicas=2)
            self.results["two_replicas"] = self.shared_prefix("2 replicas", sample_load=True)

    def stop(self) -> None:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            self.cluster.shutdown()


def _num(x: float) -> str:
    return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.0f}"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    b = Bench(a)
    b.start()
    try:
        b.run()
    finally:
        b.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(b.results, indent=1, default=str) + "\n")
        print(f"figures written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
