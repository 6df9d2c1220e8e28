"""Benchmark: our `LocalModel` against transformers' `Qwen3_5MoeForCausalLM` on the same random weights.

For each config (model_spec §7.1 `tiny`, and a 4x wider `wide`) one random checkpoint is saved by
transformers itself (`Qwen3_5MoeForConditionalGeneration(...).save_pretrained`, in a temp dir).
Both models load it in each dtype and run in this process, with the same thread count, under
`torch.inference_mode()`, warmed up first, with repetitions interleaved (ours, theirs, ours, ...):
- prefill: 4 sequences x 512 tokens in one forward (theirs: a [4, 512] batch with a fresh
  DynamicCache and `logits_to_keep=1`, as `generate` does; ours: one `StepBatch`, fresh pools,
  logits of the last token of each sequence). Figure: tokens/s, median.
- decode: after a 64-token prefill per sequence, one new token for each of B sequences
  (theirs: a [B, 1] forward on its cache; ours: a `StepBatch` of B one-token `SeqChunk`s,
  `StepBatch.build` included in the time). Figure: ms per step, median over all steps.
transformers runs its default back-ends (sdpa attention, grouped_mm experts): no overrides.
Ratio = transformers time / our time (> 1: we are faster). Targets: prefill >= 1.0x, decode >= 1.5x.
Peak memory (wide config): loading 1/8 of the experts (`load_experts`, one of 8 expert ranks)
vs the whole model (`LocalModel.load`), each in a fresh subprocess (peak RSS minus the RSS
after imports).

`--device` (auto | cpu | cuda[:N], model_shards/device.py): both models, their caches and inputs live there;
on cuda every timing ends with `torch.cuda.synchronize` (the peak-memory figures stay host RSS of CPU loads).

Usage: python benchmarks/bench_model.py [--configs tiny,wide] [--dtypes float32,bfloat16]
       [--repeats 5] [--threads 2] [--device auto|cpu|cuda[:N]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model_shards.batch import SeqChunk, StepBatch  # noqa: E402  # after the sys.path line above
from model_shards.device import DEVICE_CHOICES, resolve_device  # noqa: E402
from model_shards.model import LocalModel  # noqa: E402

ROPE = dict(
    rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[3, 3, 2], mrope_interleaved=True
)
COMMON = dict(
    num_hidden_layers=8,
    head_dim=64,
    linear_conv_kernel_dim=4,
    rope_parameters=ROPE,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    eos_token_id=1,
)
CONFIGS = {
    # model_spec §7.1
    "tiny": dict(
        COMMON,
        vocab_size=1024,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
    ),
    # 4x hidden, 4x experts, top-8, GQA 8:1, DeltaNet 4 key / 16 value heads x 64
    "wide": dict(
        COMMON,
        vocab_size=4096,
        hidden_size=1024,
        num_attention_heads=16,
        num_key_value_heads=2,
        linear_num_key_heads=4,
        linear_num_value_heads=16,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=512,
    ),
}
VISION = dict(
    depth=1,
    hidden_size=64,
    num_heads=4,
    intermediate_size=128,
    out_hidden_size=256,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=64,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFILL_B, PREFILL_T = 4, 512
DECODE_BATCHES = (1, 8, 32)
DECODE_CONTEXT = 64
DECODE_STEPS = 8  # timed steps per repeat
BLOCK = 16
EXPERT_RANKS = 8
TARGETS = {"prefill": 1.0, "decode": 1.5}


# ------------------------------------------------------------------------------ checkpoint
def save_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """A random checkpoint saved by transformers; norms and gates perturbed off their init values."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(VISION, out_hidden_size=CONFIGS[name]["hidden_size"])
    cfg = Qwen3_5MoeConfig(
        text_config=CONFIGS[name],
        vision_config=vision,
        image_token_id=1001,
        video_token_id=1002,
        vision_start_token_id=1003,
        vision_end_token_id=1004,
        tie_word_embeddings=False,
    )
    model = Qwen3_5MoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ("norm" in pname and p.ndim == 1) or "A_log" in pname or "dt_bias" in pname:
                p.add_(torch.randn_like(p) * 0.3)
            if pname.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)  # spread router logits
    model.save_pretrained(out)
    return out


def load_hf(folder: Path, dtype: torch.dtype, device: torch.device):  # noqa: ANN201  # transformers model
    from transformers import Qwen3_5MoeForCausalLM

    model = Qwen3_5MoeForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model.to(device)


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA call returns before its kernels finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _tables(num_seqs: int, tokens: int) -> list[tuple[int, ...]]:
    per = -(-tokens // BLOCK)
    return [tuple(range(i * per, (i + 1) * per)) for i in range(num_seqs)]


class Side:
    """One model behind the same three calls: fresh state, prefill, decode step."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device


class Ours(Side):
    def __init__(self, model: LocalModel) -> None:
        super().__init__("ours", model.device)
        self.model = model

    def reset(self, num_seqs: int, tokens: int) -> None:
        self.tables = _tables(num_seqs, tokens)
        self.pools = self.model.allocate(
            num_blocks=sum(len(t) for t in self.tables), block_size=BLOCK, num_slots=num_seqs
        )
        self.lens = [0] * num_seqs

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.tolist()
        batch = StepBatch.build(
            [SeqChunk(tuple(r), 0, i, self.tables[i]) for i, r in enumerate(rows)],
            block_size=BLOCK,
            device=self.device,
        )
        out = self.model.forward(batch, self.pools).logits_RV
        self.lens = [len(r) for r in rows]
        return out

    def step(self, ids: list[int]) -> torch.Tensor:
        batch = StepBatch.build(
            [SeqChunk((t,), self.lens[i], i, self.tables[i]) for i, t in enumerate(ids)],
            block_size=BLOCK,
            device=self.device,
        )
        out = self.model.forward(batch, self.pools).logits_RV
        self.lens = [n + 1 for n in self.lens]
        return out


class Theirs(Side):
    def __init__(self, model) -> None:  # noqa: ANN001  # transformers model
        super().__init__("transformers", model.device)
        self.model = model

    def reset(self, num_seqs: int, tokens: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return (
                self.model(ids.to(self.device), cache=self.cache, use_cache=True, logits_to_keep=1)
                .logits[:, -1]
                .float()
            )

    def step(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            ids_B1 = torch.tensor(ids, device=self.device)[:, None]
            return self.model(ids_B1, cache=self.cache, use_cache=True).logits[:, -1].float()


def bench_prefill(sides: list[Side], vocab: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of a fresh 4 x 512 prefill, sides interleaved (order alternates per repeat)."""
    ids = torch.randint(0, vocab, (PREFILL_B, PREFILL_T), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(repeats + 1):  # repeat 0 is the warm-up
        for s in sides if r % 2 == 0 else sides[::-1]:
            s.reset(PREFILL_B, PREFILL_T)
            t = _timed(lambda: s.prefill(ids), s.device)  # noqa: B023  # called within this iteration
            if r:
                times[s.name].append(t)
    return {name: PREFILL_B * PREFILL_T / statistics.median(ts) for name, ts in times.items()}


def bench_decode(sides: list[Side], vocab: int, batch: int, repeats: int) -> dict[str, float]:
    """Median ms of one decode step of `batch` sequences after a 64-token prefill, sides interleaved."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, DECODE_CONTEXT), generator=gen)
    tokens = torch.randint(0, vocab, (DECODE_STEPS + 2, batch), generator=gen).tolist()
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(repeats + 1):  # repeat 0 is the warm-up
        order = sides if r % 2 == 0 else sides[::-1]
        for s in order:
            s.reset(batch, DECODE_CONTEXT + len(tokens))
            s.prefill(prompt)
            s.step(tokens[0])  # first step after a prefill: not timed
        for step in tokens[1 : DECODE_STEPS + 1]:
            for s in order:
                t = _timed(lambda: s.step(step), s.device)  # noqa: B023  # called within this iteration
                if r:
                    times[s.name].append(t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def check_same_logits(ours: Ours, theirs: Theirs, vocab: int) -> float:
    """max |d| between both models' last-token logits of a short batch (a guard, not a test)."""
    ids = torch.randint(0, vocab, (2, 70), generator=torch.Generator().manual_seed(3))
    for s in (ours, theirs):
        s.reset(2, 70)
    return float((ours.prefill(ids) - theirs.prefill(ids)).abs().max())


# ------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_kib() -> int:
    """Reset the peak RSS to the current RSS where the kernel allows it; returns the baseline (KiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mem_child(folder: str, what: str, dtype: str) -> None:
    """Runs in a fresh interpreter: print peak RSS growth (MiB) of one load."""
    from model_shards.checkpoint_files import CheckpointReader
    from model_shards.config import from_hf_config
    from model_shards.weights import load_experts, validate

    # NOTE: ru_maxrss is the peak of the whole process, imports included, which can exceed a small load's
    # peak; on Linux, writing 5 to clear_refs resets the peak (VmHWM) to the current RSS instead.
    base = _reset_peak_kib()
    if what == "full":
        obj = LocalModel.load(folder, dtype=dtype)
    else:
        cfg = from_hf_config(folder)
        reader = CheckpointReader(folder)
        ids = list(range(cfg.num_experts // EXPERT_RANKS))
        obj = load_experts(reader, cfg, expert_ids=ids, dtype=DTYPES[dtype], layout=validate(reader, cfg))
    peak = _peak_kib()
    del obj
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def measure_load_memory(folder: Path, dtype: str) -> dict[str, float]:
    out = {}
    for what in ("experts_1of8", "full"):
        proc = subprocess.run(
            [sys.executable, __file__, "--_mem-child", str(folder), what, dtype],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        out[what] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


# ------------------------------------------------------------------------------ main
def run_config(name: str, dtypes: list[str], repeats: int, tmp: Path, results: dict, device: torch.device) -> None:
    t0 = time.perf_counter()
    folder = save_checkpoint(name, tmp / name)
    vocab = CONFIGS[name]["vocab_size"]
    print(f"[{name}] checkpoint saved in {time.perf_counter() - t0:.1f}s", flush=True)
    for dt in dtypes:
        theirs = Theirs(load_hf(folder, DTYPES[dt], device))
        ours = Ours(LocalModel.load(folder, dtype=dt, device=device))
        cfg = theirs.model.config
        backends = f"attn={cfg._attn_implementation}, experts={getattr(cfg, '_experts_implementation', '?')}"
        diff = check_same_logits(ours, theirs, vocab)
        print(f"[{name} {dt}] transformers back-ends: {backends}; max |d logit| ours vs theirs {diff:.3g}", flush=True)
        cell = results.setdefault(name, {}).setdefault(dt, {"hf_backends": backends, "max_abs_logit_diff": diff})
        pf = bench_prefill([ours, theirs], vocab, repeats)
        cell["prefill_tok_s"] = {
            "ours": pf["ours"],
            "transformers": pf["transformers"],
            "ratio": pf["ours"] / pf["transformers"],
        }
        print(f"[{name} {dt}] prefill {pf['ours']:.0f} vs {pf['transformers']:.0f} tok/s", flush=True)
        for b in DECODE_BATCHES:
            dc = bench_decode([ours, theirs], vocab, b, repeats)
            cell[f"decode_b{b}_ms"] = {
                "ours": dc["ours"],
                "transformers": dc["transformers"],
                "ratio": dc["transformers"] / dc["ours"],
            }
            print(f"[{name} {dt}] decode B={b}: {dc['ours']:.2f} vs {dc['transformers']:.2f} ms", flush=True)
        del theirs, ours
    if name == "wide":
        for dt in dtypes:
            mem = measure_load_memory(folder, dt)
            results.setdefault("memory", {})[f"{name}/{dt}"] = dict(mem, ratio=mem["full"] / mem["experts_1of8"])


def print_table(results: dict) -> None:
    rows = []
    for name, per_dtype in results.items():
        if name == "memory":
            continue
        for dt, cell in per_dtype.items():
            for key, metric in (
                ("prefill_tok_s", "prefill 4x512 (tok/s)"),
                *((f"decode_b{b}_ms", f"decode B={b} (ms/step)") for b in DECODE_BATCHES),
            ):
                if key not in cell:
                    continue
                v = cell[key]
                target = TARGETS["prefill" if key.startswith("prefill") else "decode"]
                fmt = "{:.0f}" if key.startswith("prefill") else "{:.2f}"
                rows.append(
                    (
                        name,
                        dt,
                        metric,
                        fmt.format(v["ours"]),
                        fmt.format(v["transformers"]),
                        f"{v['ratio']:.2f}x",
                        f">= {target:.1f}x",
                        "ok" if v["ratio"] >= target else "MISSED",
                    )
                )
    head = ("config", "dtype", "metric", "ours", "transformers", "ratio", "target", "")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print("ratio = transformers time / our time (> 1: ours faster); prefill compares tokens/s the same way.")
    for key, mem in results.get("memory", {}).items():
        print(
            f"peak RSS of a load ({key}): 1/{EXPERT_RANKS} of the experts {mem['experts_1of8']:.0f} MiB, "
            f"whole model {mem['full']:.0f} MiB, ratio {mem['ratio']:.2f}x"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_mem-child":
        _mem_child(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,wide", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of: " + ", ".join(DTYPES))
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per cell (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both sides")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (auto: cuda:0 when torch sees a GPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    configs = [c for c in args.configs.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    torch.set_num_threads(args.threads)
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its "falling back to the torch implementation" notices and load bars
    hf_logging.disable_progress_bar()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"repeats {args.repeats}, device {device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for c in configs:
            run_config(c, dtypes, args.repeats, Path(tmp), results, device)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print_table(results)
    if args.json:
        args.json.write_text(
            json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
