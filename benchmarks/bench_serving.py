"""Benchmark: output tokens/s of the real app over HTTP streaming vs the same engine driven in-process.

One invocation, one local Ray cluster, the embedded tiny model (real Qwen3.5 vocabulary of 248k,
hidden 128; dtype = the checkpoint's bf16 unless --dtype), D = 1 x X = 0 by default:

- HTTP: `serve.run(build_app(AppArgs(...)))` (ingress + engine deployments, the engine replica
  owning its group), driven by c asyncio workers over raw SSE (aiohttp, /v1/completions with the
  prompt as token ids, `stream: true`, `ignore_eos`), each sending its requests back to back.
  Every SSE `data:` event but [DONE] is one token (checked: exactly max_tokens per request).
- in-process: an `ExpertParallelGroup` with the same `GroupConfig` (same D, X, caches, dtype,
  deadline, capacity factor) in its own placement group on the same cluster, an `Engine` over it
  (same `SchedulerConfig`, same tokenizer, so detokenization is included) in this process, and
  c asyncio tasks consuming `engine.generate(req)` back to back. Requests are built by the
  ingress's own `ModelContext.build` from the same request bodies, so sampling parameters match.

Levels and paths run interleaved (ABBA over `--repeats`) so the noise of a shared 2-core machine
hits every cell alike; tok/s = output tokens / wall time summed over the repeats; TTFT and ITL
medians come from per-event arrival times (client side for HTTP). The driver (client and in-process
engine) is reniced to the Ray workers' niceness so neither path is favoured by the scheduler.
Alongside: engine steps and mean batch (tokens per step) of each path, the CPU seconds every
process of this cluster spent per 1000 output tokens (/proc, the process tree of this driver), and
micro-benchmarks of the per-token pieces (lm_head + sampling over the vocabulary, incremental
detokenization, SSE chunk formatting).
`--py-spy SECONDS` also samples the Serve processes and the trunk rank during an extra HTTP run at
the highest concurrency; `--serve-env KEY=VALUE` tries Ray Serve knobs.

Targets: HTTP / in-process >= 0.8 at concurrency 16; concurrency 16 over 1 >= 4x on each path.

Usage: python benchmarks/bench_serving.py [--dtype auto|float32|bfloat16] [--trunk-ranks 1]
       [--expert-ranks 0] [--concurrency 1,4,16] [--rounds 3] [--repeats 2] [--prompt-len 32]
       [--max-tokens 64] [--temperature T] [--py-spy 6] [--serve-env K=V] [--results FILE]
       [--json out.json]   (results and analysis: benchmarks/RESULTS-serving.md)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

APP, PREFIX, MODEL_NAME = "bench", "/bench", "bench-tiny"
TARGET_RATIO, TARGET_GAIN = 0.8, 4.0
HTTP, INPROC = "http", "in-process"


# ------------------------------------------------------------------------------ measurements
@dataclass
class Run:
    """One path at one concurrency, one repeat."""

    path: str
    concurrency: int
    tokens: int = 0
    requests: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # process class -> CPU seconds during the run
    steps: int = 0  # engine steps during the run
    step_s: float = 0.0  # summed engine step wall time (engine side: `await runner.step`)
    machine_busy: float = 0.0  # fraction of all cores busy (any process on the machine) during the run


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else float("nan")


class ProcClock:
    """CPU seconds of every process in this driver's process tree (Ray's gcs, raylet, workers, ...)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, labels: dict[int, str]) -> None:
        self.labels = labels  # pid -> label, for pids we know (trunk actors of each path)
        self.root = os.getpid()

    @staticmethod
    def _children() -> dict[int, list[int]]:
        kids: dict[int, list[int]] = defaultdict(list)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                kids[int(fields[1])].append(int(d))
            except (OSError, IndexError):
                continue
        return kids

    def _tree(self) -> list[int]:
        kids, out, todo = self._children(), [], [self.root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(kids.get(p, []))
        return out

    def label(self, pid: int) -> str:
        if pid == self.root:
            return "driver (client / in-process engine)"
        if pid in self.labels:
            return self.labels[pid]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return "gone"
        for key, name in (
            ("EpserveIngress", "Serve ingress replica"),
            ("EpserveEngine", "Serve engine replica"),
            ("ProxyActor", "Serve proxy"),
            ("ServeController", "Serve controller"),
            ("MetricsHub", "metrics hub"),
            ("TrunkRankActor", "trunk rank (other)"),
            ("ExpertRankActor", "expert rank (other)"),
            ("raylet", "raylet"),
            ("gcs_server", "gcs"),
            ("dashboard", "dashboard agents"),
            ("log_monitor", "log monitor"),
            ("ray::IDLE", "idle workers"),
            ("default_worker", "idle workers"),
        ):
            if key in cmd:
                return name
        return "other ray processes"

    def snapshot(self) -> dict[int, float]:
        out = {}
        for pid in self._tree():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[pid] = (int(fields[11]) + int(fields[12])) / self.TICK  # utime + stime
            except (OSError, IndexError):
                continue
        return out

    def diff(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        by: dict[str, float] = defaultdict(float)
        for pid, t in after.items():
            by[self.label(pid)] += t - before.get(pid, 0.0)
        return dict(by)


def machine_ticks() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, all processes (other users' too)."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


# ------------------------------------------------------------------------------ workloads
def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:  # noqa: ANN001
    """`count` distinct prompts of exactly `length` token ids, windows over some plain English."""
    text = (
        "Expert parallelism spreads the routed experts of a mixture-of-experts model over many devices. "
        "Each token is sent to the experts its router picked and the weighted outputs come back. "
        "Continuous batching lets requests join and leave between steps, so the batch stays full. "
        "A trunk rank holds the embeddings, attention and DeltaNet mixers, the routers and the shared "
        "expert, and keeps the caches of its own sequences. The serving stack streams every token. "
    ) * 8
    ids = tokenizer.encode(text)
    step = max(1, (len(ids) - length) // max(1, count))
    return [ids[(i * step) % (len(ids) - length) :][:length] for i in range(count)]


class Workload:
    """Request bodies (OpenAI /v1/completions) and the equivalent engine requests."""

    def __init__(self, ctx, prompts: list[list[int]], max_tokens: int, temperature: float | None) -> None:  # noqa: ANN001
        self.ctx, self.prompts, self.max_tokens, self.temperature = ctx, prompts, max_tokens, temperature
        self._n = 0

    def body(self, i: int) -> dict:
        b = {
            "model": MODEL_NAME,
            "prompt": self.prompts[i % len(self.prompts)],
            "max_tokens": self.max_tokens,
            "stream": True,
            "ignore_eos": True,
            "seed": i,
        }
        if self.temperature is not None:
            b["temperature"] = self.temperature
        return b

    def engine_request(self, i: int):  # noqa: ANN201  # GenerateRequest
        from replicas.api.openai_protocol import CompletionRequest

        body = self.body(i)
        self._n += 1
        return self.ctx.build(
            CompletionRequest.model_validate(body), list(body["prompt"]), request_id=f"inproc-{self._n}"
        )


async def http_request(session, url: str, body: dict, expect: int, run: Run) -> None:  # noqa: ANN001
    t0 = time.perf_counter()
    stamps = []
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                stamps.append(time.perf_counter())
                if b'"error"' in line[:40]:
                    raise RuntimeError(f"in-band error: {line[:300]!r}")
    if len(stamps) != expect:
        raise RuntimeError(f"expected {expect} SSE token events, got {len(stamps)}")
    _account(run, t0, stamps)


async def inproc_request(engine, req, expect: int, run: Run) -> None:  # noqa: ANN001
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async for item in engine.generate(req):  # one item per engine step
        now = time.perf_counter()
        for ev in item.outputs:
            if ev.error is not None:
                raise RuntimeError(f"engine error: {ev.error.message}")
            stamps += [now] * len(ev.token_ids)
            tokens += len(ev.token_ids)
    if tokens != expect or len(stamps) != expect:
        raise RuntimeError(f"expected {expect} token events, got {len(stamps)} events / {tokens} tokens")
    _account(run, t0, stamps)


def _account(run: Run, t0: float, stamps: list[float]) -> None:
    run.tokens += len(stamps)
    run.requests += 1
    run.ttft_s.append(stamps[0] - t0)
    run.itl_s.extend(b - a for a, b in zip(stamps, stamps[1:]))


class TimedRunner:
    """Wraps the in-process group: engine-side step wall time and the trunk ranks' own timings."""

    def __init__(self, group) -> None:  # noqa: ANN001
        self.group = group
        self.steps, self.step_s, self.forward_s, self.sample_s, self.batch_tokens = 0, 0.0, 0.0, 0.0, 0

    async def step(self, requests):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        results = await self.group.step(requests)
        self.step_s += time.perf_counter() - t0
        self.steps += 1
        self.batch_tokens += sum(len(s.token_ids) + len(s.drafts) for r in requests for s in r.seqs)
        self.batch_tokens += sum(len(r.decodes) for r in requests)  # columnar decodes: one token each
        for r in results:
            self.forward_s += r.timings.get("forward_s", 0.0)
            self.sample_s += r.timings.get("sample_s", 0.0)
        return results


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    # -------------------------------------------------------------- set-up
    def start(self) -> None:
        import ray
        from ray import serve

        from cluster.local_cluster import start_local_cluster
        from cluster.process_groups import free_port
        from cluster.topology import GroupShape
        from model_shards.tiny_checkpoint import embedded_model
        from model_shards.tokenizer import Tokenizer
        from replicas.api.request_builder import ModelContext
        from replicas.engine.block_pool import BlockPool
        from replicas.engine.engine import Engine
        from replicas.engine.scheduler import SchedulerConfig
        from replicas.ep.actors import CacheSizes
        from replicas.ep.group import ExpertParallelGroup, GroupConfig
        from replicas.serving.app import build_app
        from replicas.serving.app_args import AppArgs, AutoscalingArgs

        a = self.args
        t0 = time.monotonic()
        self.folder = str(embedded_model(a.cache_dir))
        print(f"model: {self.folder} ({time.monotonic() - t0:.1f} s)", flush=True)
        self.app_args = AppArgs(
            model=self.folder,
            served_model_name=MODEL_NAME,
            dtype=a.dtype,
            trunk_ranks=a.trunk_ranks,
            expert_ranks=a.expert_ranks,
            num_kv_blocks=a.num_kv_blocks,
            block_size=16,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            prefix_cache=not a.no_prefix_cache,
            collective_deadline_s=30,
            ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
            engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        )
        world = a.trunk_ranks + a.expert_ranks
        self.cluster = start_local_cluster(1, cpus_per_node=max(8, 2 * world + 4))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(self.app_args), name=APP, route_prefix=PREFIX)
        self.url = f"http://127.0.0.1:{port}{PREFIX}/v1/completions"
        print(f"cluster + app up ({time.monotonic() - t0:.1f} s)", flush=True)

        s = self.app_args
        self.group = ExpertParallelGroup(
            GroupConfig(
                model_dir=s.model,
                shape=GroupShape(s.trunk_ranks, s.expert_ranks),
                dtype=s.dtype,
                deadline_s=s.collective_deadline_s,
                caches=CacheSizes(
                    s.num_kv_blocks, s.block_size, s.max_num_seqs, state_checkpoints=s.prefix_state_checkpoints()
                ),
                capacity_factor=s.capacity_factor,
                cpus_per_rank=s.cpus_per_rank,
                gpus=s.gpus,
                load_timeout_s=s.load_timeout_s,
            )
        )
        self.group.start()
        self.runner = TimedRunner(self.group)
        self.tokenizer = Tokenizer.from_dir(self.folder)
        self.engine = Engine(
            self.runner,
            pools=[
                BlockPool(
                    num_blocks=s.num_kv_blocks,
                    num_slots=s.max_num_seqs,
                    block_size=s.block_size,
                    num_checkpoints=s.prefix_state_checkpoints(),
                )
                for _ in range(s.trunk_ranks)
            ],
            config=SchedulerConfig(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens),
            max_waiting=s.max_waiting_requests,
            recover=self.group.rebuild,
            prefix_cache=s.prefix_cache_config(),
        )
        ctx = ModelContext.load(
            self.folder,
            name=MODEL_NAME,
            max_model_len=s.max_model_len,
            cache_tokens=s.num_kv_blocks * s.block_size,
            default_max_tokens=s.default_max_tokens,
            max_n=s.max_n,
        )
        self.work = Workload(ctx, make_prompts(self.tokenizer, 64, a.prompt_len), a.max_tokens, a.temperature)
        self.defaults = ctx.defaults
        inproc_pids = ray.get([t.pid.remote() for t in self.group.trunks + self.group.experts])
        labels = {p: "trunk rank (in-process path)" for p in inproc_pids[: s.trunk_ranks]}
        labels.update({p: "expert rank (in-process path)" for p in inproc_pids[s.trunk_ranks :]})
        self.hub = ray.get_actor(f"epserve-metrics-{MODEL_NAME}", namespace="epserve")
        self.clock = ProcClock(labels)
        # Ray starts its workers at a raised niceness (the Serve replicas and every rank run at it); the
        # in-process engine runs in this driver: give it the same niceness, or on a machine shared with
        # other jobs it would be favoured over the Serve engine replica it is compared with.
        worker_nice = int(Path(f"/proc/{inproc_pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[16])
        if self.args.match_worker_nice and worker_nice > os.nice(0):
            os.nice(worker_nice - os.nice(0))
        self.driver_nice, self.worker_nice = os.nice(0), worker_nice
        print(f"in-process group up ({time.monotonic() - t0:.1f} s)", flush=True)

    def label_app_ranks(self) -> None:
        """Name the app's own rank actors (the ones in the tree that are not the in-process group's)."""
        for pid in self.clock.snapshot():
            name = self.clock.label(pid)
            if name == "trunk rank (other)":
                self.clock.labels[pid] = "trunk rank (HTTP path)"
            elif name == "expert rank (other)":
                self.clock.labels[pid] = "expert rank (HTTP path)"

    def stop(self) -> None:
        from ray import serve

        for step in (lambda: serve.shutdown(), lambda: self.group.shutdown(), lambda: self.cluster.shutdown()):
            try:
                step()
            except Exception as exc:  # noqa: BLE001  # best effort: keep shutting down the rest
                print(f"shutdown: {exc!r}", file=sys.stderr)

    # -------------------------------------------------------------- runs
    async def _hub_steps(self) -> tuple[int, float]:
        snap = await self.hub.merged.remote()
        h = snap.histograms.get(("step_time_seconds", ()))
        return (h.n, h.total) if h is not None else (0, 0.0)

    async def run(
        self,
        path: str,
        c: int,
        rounds: int,
        session,  # noqa: ANN001
        until: asyncio.Event | None = None,
    ) -> Run:
        """c workers, `rounds` requests each back to back (or until `until` is set)."""
        run = Run(path, c)
        expect = self.args.max_tokens
        counter = iter(range(10**9))
        if path == HTTP:
            from replicas.serving.engine_deployment import (
                METRICS_PUSH_S as push_s,  # replicas push their metrics this often
            )

            await asyncio.sleep(push_s * 1.5)
            steps0 = await self._hub_steps()
        else:
            steps0 = (self.runner.steps, self.runner.step_s)

        async def worker() -> None:
            for _ in range(rounds):
                if until is not None and until.is_set():
                    return
                i = next(counter)
                if path == HTTP:
                    await http_request(session, self.url, self.work.body(i), expect, run)
                else:
                    await inproc_request(self.engine, self.work.engine_request(i), expect, run)

        cpu0, m0 = self.clock.snapshot(), machine_ticks()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        run.wall_s = time.perf_counter() - t0
        cpu1, m1 = self.clock.snapshot(), machine_ticks()
        run.cpu_s = self.clock.diff(cpu0, cpu1)
        run.machine_busy = (m1[0] - m0[0]) / max(1.0, m1[1] - m0[1])
        if path == HTTP:
            await asyncio.sleep(push_s * 1.5)
            steps1 = await self._hub_steps()
        else:
            steps1 = (self.runner.steps, self.runner.step_s)
        run.steps, run.step_s = steps1[0] - steps0[0], steps1[1] - steps0[1]
        return run

    async def main(self) -> dict:
        import aiohttp

        a = self.args
        self.engine.start()
        levels = [int(x) for x in a.concurrency.split(",")]
        out: dict = {"levels": {}, "micro": {}, "py_spy": {}}
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            t0 = time.monotonic()
            for path in (HTTP, INPROC):  # warm-up: every batch size up to the largest level, both paths
                await self.run(path, max(levels), 1, session)
            self.label_app_ranks()
            self.runner.steps, self.runner.step_s, self.runner.forward_s, self.runner.sample_s = 0, 0.0, 0.0, 0.0
            print(f"warm-up done ({time.monotonic() - t0:.1f} s)", flush=True)
            runs: dict[int, dict[str, list[Run]]] = {c: {HTTP: [], INPROC: []} for c in levels}
            flip = False
            for rep in range(a.repeats):  # levels and paths both ABBA-interleaved: noise hits every cell alike
                for c in levels if rep % 2 == 0 else levels[::-1]:
                    for path in (HTTP, INPROC) if not flip else (INPROC, HTTP):
                        r = await self.run(path, c, a.rounds, session)
                        runs[c][path].append(r)
                        print(
                            f"  c={c:<3} {path:<10} rep {rep}: {r.tokens} tok in {r.wall_s:.2f} s = "
                            f"{r.tokens / r.wall_s:7.1f} tok/s, {r.steps} steps, machine busy "
                            f"{100 * r.machine_busy:.0f}%",
                            flush=True,
                        )
                    flip = not flip
            out["levels"] = runs
            if a.py_spy:
                out["py_spy"] = await self.py_spy(max(levels), session)
        await self.engine.stop()
        if not a.no_micro:
            out["micro"] = self.micro()
        return out

    # -------------------------------------------------------------- profiling
    async def py_spy(self, c: int, session) -> dict[str, str]:  # noqa: ANN001
        """Sample the serving processes during one HTTP run at concurrency c; top frames by self time."""
        targets = {}
        for pid in self.clock.snapshot():
            name = self.clock.label(pid)
            if name in ("Serve ingress replica", "Serve engine replica", "Serve proxy", "trunk rank (HTTP path)"):
                targets[name] = pid
        tmp = Path(tempfile.mkdtemp(prefix="bench-serving-pyspy-"))
        seconds = max(1, round(self.args.py_spy))
        done = asyncio.Event()
        task = asyncio.create_task(self.run(HTTP, c, 10**6, session, until=done))
        await asyncio.sleep(2.0)  # let the batch fill up
        procs = {
            name: subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(tmp / f"{pid}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"{pid}.err", "w"),
            )
            for name, pid in targets.items()
        }
        await asyncio.to_thread(lambda: [p.wait() for p in procs.values()])
        done.set()
        await task
        report = {}
        for name, pid in targets.items():
            text = summarize_py_spy(tmp / f"{pid}.txt")
            err = (tmp / f"{pid}.err").read_text().strip().splitlines()
            report[name] = text if text != "(no samples)" else f"(no samples: {err[-1] if err else '?'})"
        return report

    def micro(self) -> dict[str, float]:
        """Per-token pieces in this process (1 torch thread, as a rank has): median ms."""
        import torch

        from model_shards.config import from_hf_config
        from model_shards.model import resolve_dtype
        from model_shards.sampling import SamplingParams, sample
        from replicas.api.choice_text import ChoiceDelta, ChoiceText
        from replicas.api.ingress import _sse
        from replicas.api.openai_responses import completion_chunk
        from replicas.engine.engine_types import GenerateOutput

        torch.set_num_threads(1)
        cfg = from_hf_config(self.folder)
        dtype = resolve_dtype(cfg, self.args.dtype)
        d = self.defaults
        params = SamplingParams(
            temperature=d.temperature if self.args.temperature is None else self.args.temperature,
            top_p=d.top_p,
            top_k=max(0, d.top_k),
            min_p=d.min_p,
            seed=1,
        )
        greedy = SamplingParams(temperature=0.0)
        out: dict[str, float] = {}

        def timeit(fn, reps: int = 15) -> float:  # noqa: ANN001
            fn()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts) * 1e3

        vocab, hidden = cfg.vocab_size, cfg.hidden_size
        w = torch.randn(vocab, hidden, dtype=dtype) * 0.02
        for b in (1, 16):
            h = torch.randn(b, hidden, dtype=dtype)
            logits = (h @ w.T).float()
            out[f"lm_head [{b}x{hidden}] x [{hidden}x{vocab}] {str(dtype).replace('torch.', '')}"] = timeit(
                lambda h=h: (h @ w.T).float()
            )
            out[f"sample {b} rows, defaults (T={params.temperature}, top_k={params.top_k}, top_p={params.top_p})"] = (
                timeit(lambda lg=logits, b=b: sample(lg, [params] * b, positions=list(range(b))))
            )
            out[f"sample {b} rows, greedy"] = timeit(lambda lg=logits, b=b: sample(lg, [greedy] * b))
        ids = self.work.prompts[0] * 2

        def detok() -> None:
            dt = ChoiceText(self.tokenizer, skip_special_tokens=True)
            for i, t in enumerate(ids[:64]):
                dt.feed(GenerateOutput(index=0, token_ids=(t,), completion_tokens=i + 1))

        out["incremental detokenization, per token"] = timeit(detok) / 64
        ev = ChoiceDelta(index=0, token_ids=(1234,), text=" token", completion_tokens=5)
        out["SSE completion chunk format + json, per token"] = (
            timeit(
                lambda: [
                    _sse(
                        completion_chunk(
                            "cmpl-x", MODEL_NAME, 0, ev, index=0, tok=self.tokenizer, want_logprobs=False, offset=0
                        )
                    )
                    for _ in range(100)
                ]
            )
            / 100
        )
        return out


def summarize_py_spy(path: Path, top: int = 12) -> str:
    """Self time (leaf frames) and inclusive time of selected frames from a py-spy raw (collapsed) file."""
    if not path.exists():
        return "(no samples)"
    leaf: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
            for f in stack.split(";")
        ]
        if frames:
            leaf[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples; self time:"]
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]]
    lines.append("inclusive time:")
    lines += [f"  {100 * v / total:5.1f}%  {k}" for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ report
def _tps(runs: list[Run]) -> float:
    return sum(r.tokens for r in runs) / sum(r.wall_s for r in runs)


def _per_step(runs: list[Run]) -> float:
    return sum(r.tokens for r in runs) / max(1, sum(r.steps for r in runs))


def _summary(levels: dict[int, dict[str, list[Run]]]) -> list[str]:
    """The main table and the two targets."""

    def med(runs: list[Run], attr: str) -> float:
        return _median_ms([x for r in runs for x in getattr(r, attr)])

    cs = sorted(levels)
    lines = [
        "| concurrency | HTTP tok/s | in-process tok/s | HTTP / in-process | HTTP TTFT p50 ms | in-proc TTFT p50 ms"
        " | HTTP ITL p50 ms | in-proc ITL p50 ms | HTTP tokens/step | in-proc tokens/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cs:
        h, p = levels[c][HTTP], levels[c][INPROC]
        lines.append(
            f"| {c} | {_tps(h):.1f} | {_tps(p):.1f} | {_tps(h) / _tps(p):.2f} | {med(h, 'ttft_s'):.1f} | "
            f"{med(p, 'ttft_s'):.1f} | {med(h, 'itl_s'):.1f} | {med(p, 'itl_s'):.1f} | {_per_step(h):.1f} | "
            f"{_per_step(p):.1f} |"
        )
    lo, hi = cs[0], cs[-1]
    gain = {path: _tps(levels[hi][path]) / _tps(levels[lo][path]) for path in (HTTP, INPROC)}
    ratio = _tps(levels[hi][HTTP]) / _tps(levels[hi][INPROC])

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return lines + [
        "",
        f"- HTTP / in-process at concurrency {hi}: **{ratio:.2f}** (target >= {TARGET_RATIO}: "
        f"{verdict(ratio >= TARGET_RATIO)})",
        f"- concurrency {hi} over {lo}: HTTP **{gain[HTTP]:.2f}x**, in-process **{gain[INPROC]:.2f}x** (target >= "
        f"{TARGET_GAIN}x: HTTP {verdict(gain[HTTP] >= TARGET_GAIN)}, "
        f"in-process {verdict(gain[INPROC] >= TARGET_GAIN)})",
    ]


def _runs(levels: dict[int, dict[str, list[Run]]]) -> list[str]:
    """Every run's tok/s (the spread is the noise), engine steps and mean step time."""
    lines = [
        "Per run (tok/s of each repeat, engine steps, mean engine-side step ms, machine busy %):",
        "",
        "| concurrency | path | runs: tok/s | steps | step ms (engine side) | machine busy |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(levels):
        for path in (HTTP, INPROC):
            rs = levels[c][path]
            steps = sum(r.steps for r in rs)
            lines.append(
                f"| {c} | {path} | {', '.join(f'{r.tokens / r.wall_s:.1f}' for r in rs)} | {steps} | "
                f"{1e3 * sum(r.step_s for r in rs) / max(1, steps):.1f} | "
                f"{', '.join(f'{100 * r.machine_busy:.0f}%' for r in rs)} |"
            )
    return lines


def _cpu(levels: dict[int, dict[str, list[Run]]]) -> list[str]:
    """CPU seconds per 1000 output tokens by process, and the gain the trunk rank's CPU cost allows."""
    cs, paths = sorted(levels), (HTTP, INPROC)
    names = sorted({n for c in cs for path in paths for r in levels[c][path] for n in r.cpu_s})
    per_k = {
        (c, path): {
            n: 1000 * sum(r.cpu_s.get(n, 0.0) for r in levels[c][path]) / sum(r.tokens for r in levels[c][path])
            for n in names
        }
        for c in cs
        for path in paths
    }
    lines = []
    trunk = {
        (c, path): per_k[(c, path)].get(f"trunk rank ({'HTTP' if path == HTTP else 'in-process'} path)", 0.0)
        for c in cs
        for path in paths
    }
    lo, hi = cs[0], cs[-1]
    if all(trunk.values()):
        lines += [
            f"Trunk-rank CPU ms per output token (CPU time, not wall time: robust to the noise) and the gain "
            f"it allows at most (c={lo} / c={hi}; a rank computes on one thread): "
            + ", ".join(
                f"{path} {trunk[(lo, path)]:.2f} -> {trunk[(hi, path)]:.2f} ms "
                f"({trunk[(lo, path)] / trunk[(hi, path)]:.2f}x)"
                for path in paths
            )
            + ".",
            "",
        ]
    lines += [
        "CPU seconds per 1000 output tokens (= CPU ms per token), by process of this cluster:",
        "",
        "| process | " + " | ".join(f"c={c} {path}" for c in cs for path in paths) + " |",
        "|---|" + "---|" * (2 * len(cs)),
    ]
    for n in sorted(names, key=lambda n: -max(v[n] for v in per_k.values())):
        if max(v[n] for v in per_k.values()) >= 0.005:
            lines.append(f"| {n} | " + " | ".join(f"{per_k[(c, p)][n]:.2f}" for c in cs for p in paths) + " |")
    lines.append(
        "| **total** | " + " | ".join(f"**{sum(per_k[(c, p)].values()):.2f}**" for c in cs for p in paths) + " |"
    )
    return lines


def report(args: argparse.Namespace, out: dict, command: str) -> str:
    levels = out["levels"]
    sampling = f"temperature {args.temperature}" if args.temperature is not None else "generation_config.json defaults"
    lines = [
        "## Run",
        "",
        "```",
        command,
        "```",
        "",
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; D={args.trunk_ranks} x "
        f"X={args.expert_ranks}, dtype {args.dtype}, prompt {args.prompt_len} tokens, max_tokens {args.max_tokens} "
        f"(ignore_eos), sampling: {sampling}; {args.rounds} requests back to back per worker per run, "
        f"{args.repeats} repeats per level (levels and paths interleaved ABBA); driver niceness "
        f"{out.get('driver_nice', '?')} (Ray workers': {out.get('worker_nice', '?')}); Serve env "
        f"{' '.join(args.serve_env) or 'default'}.",
        "",
    ]
    lines += _summary(levels) + [""] + _runs(levels) + [""] + _cpu(levels)
    if out.get("inproc_trunk"):
        t = out["inproc_trunk"]
        lines += [
            "",
            f"In-process path, all measured runs: {t['steps']} steps; per step, engine side "
            f"{t['step_ms']:.2f} ms = trunk forward {t['forward_ms']:.2f} ms + sampling {t['sample_ms']:.2f} ms "
            f"+ Ray call, transfer and waiting for a core {t['step_ms'] - t['forward_ms'] - t['sample_ms']:.2f} ms.",
        ]
    if out["micro"]:
        lines += [
            "",
            "Micro-benchmarks (driver process, 1 torch thread; median ms):",
            "",
            "| piece | ms |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.0f} |" if "count" in k else f"| {k} | {v:.3f} |" for k, v in out["micro"].items()]
    if out["py_spy"]:
        lines += ["", f"py-spy ({args.py_spy:g} s of an extra HTTP run at concurrency {max(levels)}):", ""]
        for name, text in out["py_spy"].items():
            lines += [f"{name}:", "```", text, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--trunk-ranks", type=int, default=1)
    p.add_argument("--expert-ranks", type=int, default=0)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="requests per worker per run, back to back")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per path per level")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="default: generation_config.json's")
    p.add_argument("--num-kv-blocks", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--cache-dir", default=None, help="where the embedded model is cached (default: EPSERVE_CACHE_DIR)")
    p.add_argument(
        "--py-spy",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sample the Serve processes with py-spy during an extra HTTP run at the top level",
    )
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for every Ray process of the cluster (e.g. Ray Serve knobs); repeatable",
    )
    p.add_argument(
        "--no-match-worker-nice",
        dest="match_worker_nice",
        action="store_false",
        help="keep this driver (client + in-process engine) at its niceness instead of Ray workers'",
    )
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--no-prefix-cache", action="store_true", help="both paths prefill every prompt from token 0")
    p.add_argument("--results", default=None, help="write the markdown report to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])

    for kv in args.serve_env:
        key, _, value = kv.partition("=")
        os.environ[key] = value  # inherited by the raylet and every worker started below
    bench = Bench(args)
    try:
        bench.start()
        out = asyncio.run(bench.main())
        r = bench.runner
        out["driver_nice"], out["worker_nice"] = bench.driver_nice, bench.worker_nice
        out["inproc_trunk"] = {
            "steps": r.steps,
            "step_ms": 1e3 * r.step_s / max(1, r.steps),
            "forward_ms": 1e3 * r.forward_s / max(1, r.steps),
            "sample_ms": 1e3 * r.sample_s / max(1, r.steps),
        }
    finally:
        bench.stop()
    text = report(args, out, command)
    print(text)
    if args.results:
        Path(args.results).write_text("# Serving throughput: HTTP streaming vs the engine in-process\n\n" + text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {str(c): {p: [r.__dict__ for r in rs] for p, rs in runs.items()} for c, runs in out["levels"].items()},
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
