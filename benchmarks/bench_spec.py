"""Benchmark: MTP speculative decoding, k drafts per step vs plain decoding, side by side in one run.

Needs a checkpoint whose MTP head was trained with its model, so drafts mean something: write one
with `python scripts/train_mtp.py --out DIR --minutes 8` (a byte-level model on the standard
library's source). Prompts are windows of the held-out files (every 10th, as train_mtp holds out).

For each k in --ks (0 = plain) every prompt is decoded, one after another, by the serving Engine over an
in-process `LocalRunner` (replicas/ep/offline_generate.py: the same scheduler, update, verification and
rollback the served engine runs), repetitions interleaved
(k=0, k=1, ..., k=0, ...) so machine noise hits every k alike. Figures per k:
- acceptance rate = accepted drafts / drafted tokens (vLLM's spec_decode draft_acceptance_rate);
- tokens per target forward (1 + mean accepted drafts per verify step);
- decode tokens/s (median over repeats of the whole set) and its ratio to k=0.
Greedy runs also check that every k gives exactly the k=0 tokens (speculation must not change output).
--concurrent decodes all prompts together (one batch of --prompts sequences, the batched verify and drafting
path) instead of one after another; tok/s is then the set's new tokens over the wall time of the batch.
--temperature > 0 runs seeded sampling instead (same distribution, not the same tokens).

Usage: python benchmarks/bench_spec.py --model DIR [--ks 0,1,2,3] [--prompts 8] [--prompt-len 128]
       [--max-tokens 128] [--repeats 3] [--temperature 0] [--threads 2] [--dtype float32] [--device auto|cpu|cuda[:N]]
       [--concurrent]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from model_shards.device import resolve_device  # noqa: E402
from model_shards.model import LocalModel  # noqa: E402
from model_shards.sampling import SamplingParams  # noqa: E402
from replicas.engine.engine_types import GenerateRequest  # noqa: E402
from replicas.ep.local_runner import LocalRunner  # noqa: E402
from replicas.ep.offline_generate import (  # noqa: E402
    Completion,
    cache_sizes,
    generate_each,
    offline_engine,
    run_to_completion,
)

HELDOUT_EVERY = 10


def heldout_prompts(n: int, length: int) -> list[list[int]]:
    """n byte windows spread evenly over the held-out standard-library files."""
    from train_mtp import spread_windows, stdlib_files, token_stream

    files = [f for i, f in enumerate(stdlib_files()) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return spread_windows(token_stream(files), n, length).tolist()


def run_set(
    model: LocalModel, prompts: list[list[int]], k: int, args: argparse.Namespace, eos: tuple[int, ...]
) -> tuple[list[Completion], float]:
    slots = len(prompts) if args.concurrent else 1
    runner = LocalRunner(
        model,
        cache_sizes(args.prompt_len, args.max_tokens, spec_tokens=k, num_slots=slots),
        cuda_graph=args.cuda_graph,
    )
    reqs = [
        GenerateRequest(
            request_id=f"p{i}",
            prompt_ids=tuple(p),
            params=SamplingParams(temperature=args.temperature, seed=1000 + i if args.temperature > 0 else None),
            max_tokens=args.max_tokens,
            eos_token_ids=eos,
        )
        for i, p in enumerate(prompts)
    ]
    try:
        if args.concurrent:
            return asyncio.run(_together(runner, reqs, k, model.cfg.vocab_size))
        outs = generate_each(runner, reqs, spec_tokens=k, vocab_size=model.cfg.vocab_size)
    finally:
        runner.close()
    return outs, sum(g.decode_s for g in outs)


async def _together(
    runner: LocalRunner, reqs: list[GenerateRequest], k: int, vocab: int
) -> tuple[list[Completion], float]:
    """All requests at once on one Engine: (completions, wall seconds from submission to the last token)."""
    engine = offline_engine(
        runner, max_prompt_len=max(len(r.prompt_ids) for r in reqs), spec_tokens=k, vocab_size=vocab
    )
    engine.start()
    try:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(run_to_completion(engine, r) for r in reqs))
        return list(outs), time.perf_counter() - t0
    finally:
        await engine.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="checkpoint folder with a trained MTP head")
    ap.add_argument("--ks", default="0,1,2,3", help="comma-separated draft counts; 0 = plain decoding")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto", help="auto (cuda:0 when torch sees a GPU, else cpu), cpu, cuda[:N]")
    ap.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", help="on cuda: eager decode steps")
    ap.add_argument("--concurrent", action="store_true", help="decode all prompts together (one batch)")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if 0 not in ks:
        ks = [0, *ks]
    torch.set_num_threads(args.threads)

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    model = LocalModel.load(args.model, dtype=args.dtype, device=device)
    if model.trunk.w.mtp is None:
        raise SystemExit(f"{args.model} has no MTP weights: speculative decoding needs them")
    prompts = heldout_prompts(args.prompts, args.prompt_len)
    eos = ()  # fixed-length decoding: every k decodes the same number of tokens
    print(
        f"model {args.model} ({args.dtype} on {device}), {len(prompts)} held-out prompts x {args.prompt_len} tokens, "
        f"{args.max_tokens} new tokens each, temperature {args.temperature}, threads {args.threads}, "
        f"{args.repeats} interleaved repeats, {'all prompts together' if args.concurrent else 'one prompt at a time'}"
    )

    with torch.inference_mode():
        run_set(model, prompts[:1], max(ks), args, eos)  # warm-up
        times: dict[int, list[float]] = {k: [] for k in ks}
        gens: dict[int, list[Completion]] = {}
        for _ in range(args.repeats):
            for k in ks:
                gens[k], t = run_set(model, prompts, k, args, eos)
                times[k].append(t)

    base_tokens = [g.token_ids for g in gens[0]]
    new_tokens = sum(len(t) for t in base_tokens)
    base_tps = new_tokens / statistics.median(times[0])
    print(
        f"\n{'k':>2} {'acceptance':>10} {'tokens/forward':>14} {'forwards':>8} {'decode tok/s':>12} "
        f"{'vs k=0':>7} {'same tokens':>11}"
    )
    for k in ks:
        g = gens[k]
        drafted, accepted = sum(x.draft_tokens for x in g), sum(x.accepted_tokens for x in g)
        # a completion counts the engine steps of its lifetime: concurrent ones share theirs
        forwards = max(x.steps for x in g) if args.concurrent else sum(x.steps for x in g)
        tps = sum(len(x.token_ids) for x in g) / statistics.median(times[k])
        same = [x.token_ids for x in g] == base_tokens
        acc = f"{accepted / drafted:.3f}" if drafted else "-"
        print(
            f"{k:>2} {acc:>10} {sum(len(x.token_ids) for x in g) / forwards:>14.2f} {forwards:>8} "
            f"{tps:>12.1f} {tps / base_tps:>6.2f}x {'yes' if same else 'NO':>11}"
        )
        if args.temperature == 0 and not same:
            raise SystemExit(f"greedy tokens with k={k} differ from plain decoding")


if __name__ == "__main__":
    main()
