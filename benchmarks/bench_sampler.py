"""Sampler time per step: the batched sampler (model_shards/sampling.py) against a baseline revision of the same
file (default: the per-row sampler before batching), on one batch of mixed parameters.

The batch mixes the checkpoint's defaults (T 0.6, top_k 20, top_p 0.95), greedy, greedy with penalties,
top-p only, temperature with min_p, penalised top-k rows, a few grammar masks and min_tokens bans, and logprobs
on some rows; penalty histories of a few hundred tokens. Both samplers get the same inputs; the time includes
the host transfer of the ids and logprobs (what a trunk rank waits for).

    python benchmarks/bench_sampler.py --batch 256 [--device cuda] [--baseline 648b3d9]
Tests: tests/model_shards/test_sampling.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_shards import sampling as new  # noqa: E402
from model_shards.device import DEVICE_CHOICES, resolve_device  # noqa: E402

BASELINE = "648b3d9"  # the last revision with the per-row sampler (a torch.Generator per row)


def _load_baseline(rev: str) -> ModuleType:
    src = subprocess.run(
        ["git", "show", f"{rev}:model_shards/sampling.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "sampling_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sampling_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sampling_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def _batch(mod: ModuleType, b: int, vocab: int, gen: torch.Generator) -> tuple[list, dict]:
    """Mixed per-row parameters (as `mod.SamplingParams`) and the keyword inputs of `mod.sample`."""
    kinds = [
        dict(temperature=0.6, top_k=20, top_p=0.95),
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.1),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.8, min_p=0.05),
        dict(temperature=0.7, top_k=40, presence_penalty=0.5, frequency_penalty=0.2),
    ]
    weights = [4, 2, 1, 1, 1, 1]
    plan = [k for k, w in zip(kinds, weights) for _ in range(w)]
    params, prompts, outputs, banned, allowed = [], [], [], [], []
    width = (vocab + 31) // 32
    for i in range(b):
        kw = plan[i % len(plan)]
        params.append(mod.SamplingParams(**kw, seed=i, logprobs=5 if i % 8 == 0 else None))
        prompts.append(torch.randint(0, vocab, (200,), generator=gen))
        outputs.append(torch.randint(0, vocab, (100,), generator=gen))
        banned.append((7, 8) if i % 32 == 5 else ())
        allowed.append(
            torch.randint(-(2**31), 2**31 - 1, (width,), generator=gen, dtype=torch.int32) if i % 64 == 3 else None
        )
    inputs = dict(prompt_ids=prompts, output_ids=outputs, positions=list(range(b)), banned=banned, allowed=allowed)
    return params, inputs


def _time(fn, reps: int) -> float:  # noqa: ANN001
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: cuda:0 when torch sees a GPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a rank actor runs 1)")
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the per-row sampler to compare with")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        dev = resolve_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.batch, args.vocab, generator=gen) * 3).to(dev)
    old = _load_baseline(args.baseline)
    old_params, old_inputs = _batch(old, args.batch, args.vocab, torch.Generator().manual_seed(1))
    new_params, new_inputs = _batch(new, args.batch, args.vocab, torch.Generator().manual_seed(1))

    def run_old() -> None:
        out = old.sample(logits, old_params, **old_inputs)
        out.token_ids.tolist()

    def run_new() -> None:
        new.sample(logits, new_params, **new_inputs).to_host()

    t_old, t_new = _time(run_old, args.reps), _time(run_new, args.reps)
    print(f"device {dev}, batch {args.batch}, vocab {args.vocab}, torch threads {args.threads}")
    print(f"per-row sampler ({args.baseline}): {t_old:8.1f} ms/step")
    print(f"batched sampler:               {t_new:8.1f} ms/step   ({t_old / t_new:.1f}x)")


if __name__ == "__main__":
    main()
