"""Benchmark: the engine's CPU time per decode step at 64 / 256 / 512 running sequences of 4k-token contexts.

The real `Engine` (scheduler, step messages, update, stream events to one consumer task per request) drives a
synthetic runner that returns at once: one token per sampling sequence, no model. What is left is the engine's
own work per step, which on GPUs must stay well under a decode step's tens of milliseconds. Per size: the
prompts (4096 tokens by default) are prefilled in a first phase that is not timed, then `--steps` decode
steps are timed with `time.process_time` (the whole process: the engine loop and the consumers reading the
streams). `--pickle` also pickles every step's messages in the runner, as Ray does when it sends them to the
trunk ranks (the engine process pays for it); the message bytes per step are printed either way.
`--profile N` prints cProfile's top N functions of the timed steps at the largest size. `--breakdown` splits
the time per step into scheduling, building the step messages, the update (sampled tokens into sequences) and,
within it, `_emit` (recording a token and delivering its stream event), the rest being the event loop and the
consumers (a separate run: the timers add a little).

`--loop uvloop` runs it on uvloop, the loop Ray runs a Serve replica's (the engine's) asyncio code on when uvloop
is installed (RAY_USE_UVLOOP); the default is asyncio's own loop, as `epserve generate` runs it.

Usage: python benchmarks/bench_engine_step.py [--sizes 64,256,512] [--context 4096] [--steps 50] [--pickle]
       [--profile 25] [--breakdown] [--repeats 3] [--loop asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pickle
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_shards.sampling import SamplingParams  # noqa: E402
from replicas.engine.block_pool import BlockPool  # noqa: E402
from replicas.engine.engine import Engine  # noqa: E402
from replicas.engine.engine_types import GenerateRequest  # noqa: E402
from replicas.engine.scheduler import SchedulerConfig  # noqa: E402
from replicas.engine.step_types import StepRequest, StepResult  # noqa: E402

BLOCK = 16
WARMUP = 5


class InstantRunner:
    """Answers each step at once: token 7 for every sampling sequence. Times the decode steps once all `size`
    sequences decode together (after `WARMUP` such steps), for `steps` steps."""

    def __init__(self, size: int, steps: int, *, pickle_messages: bool, profile: cProfile.Profile | None) -> None:
        self.size, self.steps, self.pickle_messages, self.profile = size, steps, pickle_messages, profile
        self.decode_steps = 0
        self.t0 = self.t1 = 0.0
        self.bytes: list[int] = []
        self.done = asyncio.Event()

    async def step(self, requests: list[StepRequest]) -> list[StepResult]:
        # Once all `size` sequences decode together every later step does too (none ends before the timed steps
        # end, none arrives): the stand-in checks the messages until then only and answers decodes in O(1), so
        # the timed steps measure the engine rather than the stand-in.
        decoding = self.decode_steps > 0
        if not decoding:
            seqs = [s for r in requests for s in r.seqs]
            n = sum(r.num_seqs for r in requests)
            decoding = n == self.size and all(len(_new_tokens(s)) == 1 for s in seqs)
        if decoding:
            self.decode_steps += 1
            if self.decode_steps == WARMUP:
                self.t0 = time.process_time()
                if self.profile is not None:
                    self.profile.enable()
            elif self.decode_steps == WARMUP + self.steps:
                self.t1 = time.process_time()
                if self.profile is not None:
                    self.profile.disable()
                self.done.set()
        timed = WARMUP <= self.decode_steps < WARMUP + self.steps
        if (self.pickle_messages and timed) or self.decode_steps == WARMUP + self.steps:
            # the size is taken from the timed steps with --pickle, else from the first step after them
            self.bytes.append(sum(len(pickle.dumps(r, protocol=5)) for r in requests))
        await asyncio.sleep(0)  # a real runner awaits the ranks: the stream consumers run meanwhile
        if decoding:
            return [StepResult(token_ids=(7,) * r.num_seqs, logprobs=(None,) * r.num_seqs) for r in requests]
        return [
            StepResult(
                token_ids=(7,) * len(r.decodes) + tuple(7 if s.sample else None for s in r.seqs),
                logprobs=(None,) * r.num_seqs,
            )
            for r in requests
        ]


def _new_tokens(s: object) -> tuple[int, ...]:
    """A sequence's new tokens in a step message (the message layout changed with the incremental protocol)."""
    chunk = getattr(s, "chunk", None)
    return chunk.token_ids if chunk is not None else s.token_ids  # type: ignore[attr-defined]  # either layout


async def run_size(size: int, args: argparse.Namespace, profile: cProfile.Profile | None) -> tuple[float, float]:
    """(engine CPU ms per decode step, message bytes per decode step) at `size` running sequences."""
    budget = max(65536, size + args.context)
    # the first sequences decode while the last prefill: none may reach max_tokens before the timed steps end
    max_tokens = -(-size * args.context // budget) + WARMUP + args.steps + 16
    per_seq = -(-(args.context + max_tokens) // BLOCK) + 1
    pools = [BlockPool(num_blocks=size * per_seq, num_slots=size, block_size=BLOCK)]
    config = SchedulerConfig(max_num_seqs=size, max_num_batched_tokens=budget)
    runner = InstantRunner(size, args.steps, pickle_messages=args.pickle, profile=profile)
    engine = Engine(runner, pools=pools, config=config, max_waiting=size)
    parts: dict[str, float] = {}
    if args.breakdown:
        for owner, name in (
            (engine.scheduler, "schedule"),
            (engine, "_requests"),
            (engine, "_update"),
            (engine, "_emit"),
        ):
            setattr(owner, name, _timed(getattr(owner, name), name, parts, runner))
    engine.start()

    async def consume(i: int) -> None:
        prompt = tuple((i * 31 + j) % 1000 + 10 for j in range(args.context))
        req = GenerateRequest(f"r{i}", prompt, SamplingParams(temperature=0.0), max_tokens=max_tokens)
        async for _ in engine.generate(req):
            pass

    tasks = [asyncio.create_task(consume(i)) for i in range(size)]
    await asyncio.wait_for(runner.done.wait(), timeout=600)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.stop()
    per_step_ms = (runner.t1 - runner.t0) / args.steps * 1e3
    if parts:
        print(f"  {size}: " + ", ".join(f"{k} {v / args.steps * 1e3:.2f} ms" for k, v in parts.items()))
    return per_step_ms, sum(runner.bytes) / max(1, len(runner.bytes))


def _timed(fn, name: str, parts: dict[str, float], runner: InstantRunner):  # noqa: ANN001, ANN202
    """`fn` adding its CPU time during the timed steps to parts[name]."""
    parts[name] = 0.0

    def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        t = time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            if WARMUP <= runner.decode_steps < WARMUP + runner.steps:
                parts[name] += time.process_time() - t

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,512")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--pickle", action="store_true", help="pickle each step's messages (as Ray sends them)")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions at the largest size")
    ap.add_argument("--breakdown", action="store_true", help="CPU time per step by part of the engine")
    ap.add_argument("--repeats", type=int, default=3, help="runs per size; the median is printed")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the event loop")
    args = ap.parse_args()
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop

        run = uvloop.run
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"context {args.context} tokens, {args.steps} timed decode steps, pickle={args.pickle}, loop {args.loop}")
    print("| running | engine CPU ms/step | message KiB/step |")
    print("|---:|---:|---:|")
    for size in sizes:
        profile = cProfile.Profile() if args.profile and size == max(sizes) else None
        runs = [run(run_size(size, args, profile if r == 0 else None)) for r in range(args.repeats)]
        ms = statistics.median(r[0] for r in runs)
        nbytes = runs[0][1]
        spread = f" (runs: {', '.join(f'{r[0]:.2f}' for r in runs)})" if len(runs) > 1 else ""
        print(f"| {size} | {ms:.2f}{spread} | {nbytes / 1024:.1f} |", flush=True)
        if profile is not None:
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
