"""One-command GPU check (driver of scripts/gpu_check.sh): CUDA tests, HF parity, benchmark vs transformers.

Runs on one GPU without Ray or network (`--device cuda`), or as a dry run on CPU with tiny sizes
(`--device cpu`, what CI runs: the same stages and entry points). Each stage writes its result as it
ends: OUT/gpu_check.json (every stage: status, seconds, figures) and OUT/gpu_check.md (the tables).
Stages:
- env: torch / transformers / fla versions, the device, the kernels model_shards/kernels.py picks.
- cuda_tests: pytest over the kernel-vs-reference tests and the device-path tests (CUDA-only tests
  skip on CPU; the dry run selects the fast ones).
- hf_parity: our LocalModel vs transformers on the same random checkpoint (tests/hf_oracle.py) on the
  device: fp32 logits within FP32_LOGIT_ATOL and greedy tokens equal; bf16 teacher-forced over HF's
  fp32 greedy text, a position counted wrong only where HF's top-2 margin exceeds BF16_MARGIN.
- cuda_graph: the in-process runner's CUDA-graph decode vs its eager decode (`cuda_graph=False`): fp32 greedy
  tokens equal at batch 1 / 16 / 64, and ms per decode step both ways, fp32 and bf16 (skipped on CPU).
- bench: prefill tok/s and decode ms/step at batch 1 / 16 / 64, ours vs transformers (its default
  back-ends) on the same device and weights: the tiny model and a random checkpoint of >= 4 GiB
  (`epserve tiny-checkpoint --target-gib`), bf16 and (ours) FP8; peak device memory; start-up time.
Modes: --quick (<= 5 min on an H100: fewer repeats, 4 GiB model), --full (more repeats and steps).
Usage: python scripts/gpu_check.py OUT [--device cuda|cpu] [--quick|--full] [--stages a,b]
Tests: tests/packaging/test_gpu_check.py (the CPU dry run, JSON and markdown checked).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  # after the sys.path line above

from model_shards.model import LocalModel  # noqa: E402

STAGES = ("env", "cuda_tests", "hf_parity", "cuda_graph", "bench")
# fp32 on CUDA: TF32 off for our matmuls and HF's, but fla's Triton dots may use TF32 (~1e-3 relative);
# logits are O(1) over a 1k vocabulary.
FP32_LOGIT_ATOL = {"cuda": 2e-2, "cpu": 1e-3}
# bf16 (ours vs HF, both bf16, teacher-forced): a position counts as wrong only where HF's top-1 leads
# its top-2 by more than this; closer calls may flip on rounding (bf16 keeps ~3 significant digits, and
# logits O(1) through 8 layers drift by a few 1e-2 between kernel libraries).
BF16_MARGIN = 0.1


@dataclass
class Plan:
    """Sizes of one run (the mode and the device pick them)."""

    repeats: int
    decode_batches: tuple[int, ...]
    decode_steps: int
    prefill: tuple[int, int]  # sequences x tokens
    big_gib: float | None  # the large random checkpoint (None: a small sized one, dry run)
    pytest_k: str | None  # -k expression for the CUDA tests (dry run: the fast CPU ones)
    prompt: int = 40  # parity prompt tokens
    greedy: int = 16  # parity greedy tokens


PLANS = {
    "quick": Plan(3, (1, 16, 64), 4, (4, 512), 4.0, None),
    "full": Plan(10, (1, 16, 64), 16, (8, 2048), 4.0, None),
    "dry": Plan(1, (1, 2), 2, (2, 16), None, "choose or grouped_mm_fallback", prompt=12, greedy=3),
}
TEST_FILES = (
    "tests/model_shards/test_kernels.py",
    "tests/model_shards/test_fp8_experts.py",  # F.scaled_mm's block-FP8 GEMM vs the spec
    "tests/model_shards/test_fp8_grouped_kernel.py",  # the Triton block-FP8 expert kernel vs the spec
    # the CUDA-graph decode tests (graph vs eager tokens); the file's CPU proofs run in CI
    "tests/replicas/test_decode_graphs.py::test_cuda_graph_decode_equals_eager_fp32",
    "tests/replicas/test_decode_graphs.py::test_cuda_graph_replay_equals_the_static_path_bf16",
)
DEVICE_TEST_GLOB = "tests/**/test_device*.py"  # the device-path tests (issue 14 item 2), where present


class Skipped(Exception):
    """A stage that cannot run here; the message says why."""


@dataclass
class Report:
    """The results so far, rewritten to OUT after every stage."""

    out: Path
    meta: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "stages": self.stages}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    """The stage table, then one table per benchmark model (ours vs transformers)."""
    m = doc["meta"]
    lines = [
        f"# GPU check ({m['mode']}, device {m['device']}: {m.get('device_name', '')})",
        "",
        "| stage | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for name, st in doc["stages"].items():
        lines.append(f"| {name} | {st['status']} | {st['seconds']:.1f} | {st.get('summary', '')} |")
    bench = doc["stages"].get("bench", {}).get("models", {})
    for model, cell in bench.items():
        lines += ["", f"## {model}", "", "| metric | ours | transformers | ratio |", "|---|---|---|---|"]
        for row in cell.get("rows", []):
            ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "n/a"
            lines.append(f"| {row['metric']} | {_fmt(row.get('ours'))} | {_fmt(row.get('transformers'))} | {ratio} |")
    lines += ["", "ratio: transformers time / our time (> 1: ours faster); prefill compares tok/s the same way.", ""]
    return "\n".join(lines)


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def run_stage(report: Report, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one stage; its result (or its failure, with the traceback) lands in the report at once."""
    t0 = time.perf_counter()
    try:
        result = fn()
        result.setdefault("status", "passed")
    except Skipped as e:
        result = {"status": "skipped", "summary": str(e)}
    except Exception as e:  # noqa: BLE001  # one stage's failure is a result; the next stages still run
        result = {"status": "error", "summary": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - t0
    report.stages[name] = result
    report.write()
    print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.1f} s) {result.get('summary', '')}", flush=True)


# ------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _supported(fn: Callable, **kwargs: object) -> dict[str, object]:
    """The keyword arguments fn accepts (the device path lands in parts; a missing one is reported by the
    stage that needs it)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def load_ours(folder: Path, *, dtype: str, device: torch.device, attention: str = "paged") -> LocalModel:
    kw = _supported(LocalModel.load, device=device)
    if device.type != "cpu" and "device" not in kw:
        raise Skipped("LocalModel.load has no device parameter in this build (issue 14 item 1)")
    return LocalModel.load(folder, dtype=dtype, attention=attention, **kw)


def load_hf(folder: Path, *, dtype: torch.dtype, device: torch.device, eager: bool = False):  # noqa: ANN201  # transformers model
    from transformers import Qwen3_5MoeForCausalLM

    kw: dict[str, Any] = {"attn_implementation": "eager", "experts_implementation": "eager"} if eager else {}
    return Qwen3_5MoeForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()


class Ours:
    """Our model behind fresh-state / prefill / step calls, its batches built on the device."""

    name = "ours"
    block = 16

    def __init__(self, model: LocalModel, device: torch.device) -> None:
        self.model, self.device = model, device

    def reset(self, num_seqs: int, tokens: int) -> None:
        per = -(-tokens // self.block)
        self.tables = [tuple(range(i * per, (i + 1) * per)) for i in range(num_seqs)]
        on_device = _supported(self.model.allocate, device=self.device)
        self.pools = self.model.allocate(
            num_blocks=per * num_seqs, block_size=self.block, num_slots=num_seqs, **on_device
        )
        self.lens = [0] * num_seqs

    def _forward(self, chunks: list) -> torch.Tensor:
        from model_shards.batch import StepBatch

        batch = StepBatch.build(chunks, block_size=self.block, device=self.device)
        return self.model.forward(batch, self.pools).logits_RV

    def prefill(self, ids: list[list[int]], logits: str = "last") -> torch.Tensor:
        from model_shards.batch import SeqChunk

        out = self._forward([SeqChunk(tuple(r), 0, i, self.tables[i], logits=logits) for i, r in enumerate(ids)])
        self.lens = [len(r) for r in ids]
        return out

    def step(self, ids: list[int]) -> torch.Tensor:
        from model_shards.batch import SeqChunk

        out = self._forward([SeqChunk((t,), self.lens[i], i, self.tables[i]) for i, t in enumerate(ids)])
        self.lens = [n + 1 for n in self.lens]
        return out


class Theirs:
    """transformers' model with a DynamicCache, the same calls."""

    name = "transformers"

    def __init__(self, model, device: torch.device) -> None:  # noqa: ANN001  # transformers model
        self.model, self.device = model, device

    def reset(self, num_seqs: int, tokens: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    def _cache_kw(self) -> dict:
        """transformers 5.24 names the cache `cache` (`past_key_values` deprecated); older releases only know
        `past_key_values` (the GPU machines' transformers may be older than the test oracle's)."""
        params = inspect.signature(self.model.forward).parameters
        return {"cache": self.cache} if "cache" in params else {"past_key_values": self.cache}

    @torch.inference_mode()
    def prefill(self, ids: list[list[int]], logits: str = "last") -> torch.Tensor:
        x = torch.tensor(ids, device=self.device)
        out = self.model(x, use_cache=True, logits_to_keep=0 if logits == "all" else 1, **self._cache_kw())
        return out.logits.flatten(0, 1) if logits == "all" else out.logits[:, -1]

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor(ids, device=self.device)[:, None]
        return self.model(x, use_cache=True, **self._cache_kw()).logits[:, -1]


def _greedy(side: Ours | Theirs, prompt: list[int], n: int) -> list[int]:
    side.reset(1, len(prompt) + n + 1)
    tok = int(side.prefill([prompt]).float().argmax(-1)[-1])
    out = [tok]
    for _ in range(n - 1):
        tok = int(side.step([tok]).float().argmax(-1)[-1])
        out.append(tok)
    return out


# ------------------------------------------------------------------------------ stages
def stage_env(device: torch.device) -> dict[str, Any]:
    from model_shards import fp8_grouped_kernel, kernels

    probe = torch.zeros(1, device=device)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "fla": kernels.fla_ops() is not None,
        "causal_conv1d": kernels.causal_conv1d_fn() is not None,
        "kernels": {
            "deltanet": kernels.deltanet_backend(probe),
            "conv": kernels.conv_backend(probe),
            "grouped_mm_bf16": kernels.grouped_mm_applies(probe.bfloat16(), probe.bfloat16()),
            "scaled_mm": hasattr(torch.nn.functional, "scaled_mm"),
            "triton_fp8_experts": fp8_grouped_kernel.triton_available(),
        },
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    info["summary"] = f"torch {info['torch']}, kernels {info['kernels']['deltanet']}/{info['kernels']['conv']}"
    return info


def stage_cuda_tests(plan: Plan, out: Path) -> dict[str, Any]:
    files = list(TEST_FILES) + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(DEVICE_TEST_GLOB))
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", f"--junitxml={xml}", *files]
    if plan.pytest_k:
        cmd += ["-k", plan.pytest_k]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    counts = _junit_counts(xml)
    status = "passed" if proc.returncode == 0 else "failed"
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({', '.join(files)})"
    return {"status": status, "summary": summary, "counts": counts, "returncode": proc.returncode, "files": files}


def _junit_counts(xml: Path) -> dict[str, int]:
    import xml.etree.ElementTree as ET

    if not xml.exists():
        return {}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], **{k: n[k] for k in list(n)[1:]}}


def hf_checkpoint(tmp: Path) -> Path:
    """The random checkpoint transformers saves (tests/hf_oracle.py), made once per run."""
    from tests.hf_oracle import save_random_hf_checkpoint

    folder = tmp / "hf_tiny"
    return folder if (folder / "config.json").exists() else save_random_hf_checkpoint(folder, seed=0)


def stage_hf_parity(device: torch.device, plan: Plan, tmp: Path) -> dict[str, Any]:
    folder = hf_checkpoint(tmp)
    prompt = torch.randint(0, 1000, (plan.prompt,), generator=torch.Generator().manual_seed(5)).tolist()
    torch.backends.cuda.matmul.allow_tf32 = False
    result: dict[str, Any] = {}
    # fp32: logits of every prompt position, then greedy continuation
    ours = Ours(load_ours(folder, dtype="float32", device=device, attention="paged"), device)
    theirs = Theirs(load_hf(folder, dtype=torch.float32, device=device), device)
    for side in (ours, theirs):
        side.reset(1, len(prompt) + plan.greedy + 1)
    got, want = ours.prefill([prompt], logits="all").float(), theirs.prefill([prompt], logits="all").float()
    diff = float((got - want).abs().max())
    greedy_ours, greedy_hf = _greedy(ours, prompt, plan.greedy), _greedy(theirs, prompt, plan.greedy)
    atol = FP32_LOGIT_ATOL[device.type]
    result["fp32"] = {"max_abs_logit_diff": diff, "atol": atol, "greedy_equal": greedy_ours == greedy_hf}
    # bf16 teacher-forced over HF's fp32 greedy text: ours vs HF, both bf16
    text = prompt + greedy_hf
    del ours, theirs
    ours16 = Ours(load_ours(folder, dtype="bfloat16", device=device), device)
    hf16 = Theirs(load_hf(folder, dtype=torch.bfloat16, device=device), device)
    for side in (ours16, hf16):
        side.reset(1, len(text))
    got16, want16 = ours16.prefill([text], logits="all").float(), hf16.prefill([text], logits="all").float()
    top2 = want16.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > BF16_MARGIN
    wrong = int(((got16.argmax(-1) != want16.argmax(-1)) & clear).sum())
    result["bf16_teacher_forced"] = {
        "positions": len(text),
        "clear_positions": int(clear.sum()),
        "wrong_beyond_margin": wrong,
        "margin": BF16_MARGIN,
        "max_abs_logit_diff": float((got16 - want16).abs().max()),
    }
    ok = diff <= atol and greedy_ours == greedy_hf and wrong == 0
    result["status"] = "passed" if ok else "failed"
    result["summary"] = (
        f"fp32 max |d logit| {diff:.2g} (atol {atol:g}), greedy {'equal' if greedy_ours == greedy_hf else 'DIFFER'}; "
        f"bf16 {wrong} wrong of {len(text)} beyond margin {BF16_MARGIN}"
    )
    return result


def stage_cuda_graph(device: torch.device, plan: Plan, tmp: Path) -> dict[str, Any]:
    """The in-process runner with CUDA-graph decode vs the same runner eager (`cuda_graph=False`), on the tiny
    checkpoint: greedy tokens of every decode batch equal in fp32 (TF32 off), and the decode step's time (the
    runner's whole step: inputs in, forward, sampling, tokens out) at each batch size, fp32 and bf16."""
    if device.type != "cuda":
        raise Skipped("CUDA graphs need a CUDA device")
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    folder = hf_checkpoint(tmp)
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = (1, 16, 64) if plan.decode_batches[-1] >= 64 else plan.decode_batches
    steps, prompt = max(8, plan.decode_steps * 2), 32
    per_seq = -(-(prompt + steps + 1) // 16)
    caches = CacheSizes(num_blocks=max(batches) * per_seq, block_size=16, num_slots=max(batches))
    result: dict[str, Any] = {"batches": list(batches), "steps": steps, "dtypes": {}}
    ok = True
    for dtype in ("float32", "bfloat16"):
        model = LocalModel.load(folder, dtype=dtype, device=device)
        runs: dict[str, dict[int, tuple[list[list[int]], float]]] = {}
        info: dict[str, Any] = {}
        for name, graph in (("graph", True), ("eager", False)):
            t0 = time.perf_counter()
            runner = LocalRunner(model, caches, cuda_graph=graph)
            _sync(device)
            info[f"{name}_start_s"] = time.perf_counter() - t0
            try:
                if graph:
                    g = runner.graphs
                    if g is None or g.disabled is not None or not g.graphs:
                        raise RuntimeError(f"no graphs captured: {g.disabled if g is not None else 'none built'}")
                    info["graphs"] = g.graphs
                runs[name] = {
                    b: _graph_decode(runner, b, prompt, steps, per_seq, model.cfg.vocab_size) for b in batches
                }
                if graph and runner.graphs is not None:
                    info["replays"] = runner.graphs.stats.replays
            finally:
                runner.close()
        rows = []
        for b in batches:
            same = runs["graph"][b][0] == runs["eager"][b][0]
            g_ms, e_ms = runs["graph"][b][1], runs["eager"][b][1]
            rows.append({"batch": b, "graph_ms": g_ms, "eager_ms": e_ms, "speedup": e_ms / g_ms, "tokens_equal": same})
            if dtype == "float32" and not same:
                ok = False
        info["rows"] = rows
        result["dtypes"][dtype] = info
        del model
    result["status"] = "passed" if ok else "failed"
    result["summary"] = "; ".join(
        f"{dt} "
        + ", ".join(
            f"B={r['batch']} {r['graph_ms']:.2f} vs {r['eager_ms']:.2f} ms ({r['speedup']:.1f}x, tokens "
            f"{'equal' if r['tokens_equal'] else 'DIFFER'})"
            for r in info["rows"]
        )
        for dt, info in result["dtypes"].items()
    )
    return result


def _graph_decode(runner: Any, batch: int, prompt: int, steps: int, per_seq: int, vocab: int) -> tuple[list, float]:  # noqa: ANN401  # a LocalRunner
    """`batch` greedy sequences: one prefill step, then `steps` decode steps; (tokens per step, median ms/step)."""
    from model_shards.sampling import SamplingParams
    from replicas.engine.step_types import SeqStart, SeqStep, StepRequest

    greedy = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, min(vocab, 1000), (batch, prompt), generator=gen).tolist()
    base = 1000 * batch  # sequence ids of this batch (released at the end)
    seqs = tuple(
        SeqStep(
            base + i,
            0,
            tuple(ids[i]),
            tuple(range(i * per_seq, (i + 1) * per_seq)),
            start=SeqStart(slot=i, params=greedy, prompt_len=prompt),
        )
        for i in range(batch)
    )
    last = list(runner.run_step([StepRequest(seqs=seqs)])[0].token_ids)
    tokens, times = [], []
    for j in range(steps):
        req = StepRequest(
            seqs=tuple(SeqStep(base + i, prompt + j, (last[i],), output_index=j + 1) for i in range(batch))
        )
        t0 = time.perf_counter()
        last = list(runner.run_step([req])[0].token_ids)  # the tokens come back to the host: the step is done
        times.append(time.perf_counter() - t0)
        tokens.append(last)
    runner.run_step([StepRequest(seqs=(), released=tuple(base + i for i in range(batch)))])
    return tokens, 1e3 * statistics.median(times[1:] if len(times) > 1 else times)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _bench_sides(sides: list, plan: Plan, device: torch.device, vocab: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    b, t = plan.prefill
    ids = torch.randint(0, vocab, (b, t), generator=gen).tolist()
    rows = []
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(plan.repeats + 1):  # repeat 0 warms up
        for s in sides if r % 2 == 0 else sides[::-1]:
            s.reset(b, t)
            dt = _timed(device, lambda s=s: s.prefill(ids))
            if r:
                times[s.name].append(dt)
    tok_s = {k: b * t / statistics.median(v) for k, v in times.items()}
    rows.append(_row(f"prefill {b}x{t} (tok/s)", tok_s, higher_better=True))
    for batch in plan.decode_batches:
        prompt = torch.randint(0, vocab, (batch, 32), generator=gen).tolist()
        steps = torch.randint(0, vocab, (plan.decode_steps + 1, batch), generator=gen).tolist()
        times = {s.name: [] for s in sides}
        for r in range(plan.repeats + 1):
            for s in sides if r % 2 == 0 else sides[::-1]:
                s.reset(batch, 32 + len(steps) + 1)
                s.prefill(prompt)
                s.step(steps[0])
                for step in steps[1:]:
                    dt = _timed(device, lambda s=s, step=step: s.step(step))
                    if r:
                        times[s.name].append(dt)
        rows.append(_row(f"decode B={batch} (ms/step)", {k: 1e3 * statistics.median(v) for k, v in times.items()}))
    return rows


def _row(metric: str, values: dict[str, float], higher_better: bool = False) -> dict[str, Any]:
    ours, theirs = values.get("ours"), values.get("transformers")
    ratio = None
    if ours and theirs:
        ratio = ours / theirs if higher_better else theirs / ours
    return {"metric": metric, "ours": ours, "transformers": theirs, "ratio": ratio}


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(folder: Path, *, device: torch.device, plan: Plan, dtype: str, with_hf: bool) -> dict[str, Any]:
    """One checkpoint: start-up (load) time and peak device memory per side, then the timed rows."""
    from model_shards.config import from_hf_config

    vocab = min(from_hf_config(folder).vocab_size, 200_000)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype if dtype != "auto" else "bfloat16"]
    cell: dict[str, Any] = {}
    _reset_peak(device)
    t0 = time.perf_counter()
    ours = Ours(load_ours(folder, dtype=dtype, device=device), device)
    _sync(device)
    cell["startup_s"] = {"ours": time.perf_counter() - t0}
    sides: list = [ours]
    theirs = None
    if with_hf:
        t0 = time.perf_counter()
        theirs = Theirs(load_hf(folder, dtype=torch_dtype, device=device), device)
        _sync(device)
        cell["startup_s"]["transformers"] = time.perf_counter() - t0
        sides.append(theirs)
    rows = _bench_sides(sides, plan, device, vocab)
    rows.append(_row("start-up (s)", cell["startup_s"]))
    peak = _peak_bytes(device)
    if peak is not None:
        rows.append({"metric": "peak device memory, both sides (GiB)", "ours": peak / 2**30, "ratio": None})
    cell["rows"] = rows
    del ours, theirs, sides
    return cell


def stage_bench(device: torch.device, plan: Plan, tmp: Path, *, on_model: Callable[[str, dict], None]) -> dict:
    from model_shards.tiny_checkpoint import CheckpointSizes, checkpoint_bytes, sizes_for_target, write_tiny_checkpoint

    models: dict[str, Any] = {}
    models["tiny bf16"] = bench_model(hf_checkpoint(tmp), device=device, plan=plan, dtype="bfloat16", with_hf=True)
    on_model("tiny bf16", models)
    if plan.big_gib is not None:
        sizes = sizes_for_target(plan.big_gib)
    else:  # the dry run: a small sized checkpoint through the same path
        sizes = CheckpointSizes(layers=4, hidden_size=64, num_experts=8, moe_intermediate_size=32)
    for fp8 in (False, True):
        folder = write_tiny_checkpoint(tmp / f"big_fp8{fp8}", sizes=sizes, fp8=fp8, tokenizer=False)
        gib = checkpoint_bytes(sizes, fp8=fp8) / 2**30
        kind = "FP8" if fp8 else "bf16"
        name = f"random {gib:.2f} GiB {kind} ({sizes.num_experts} experts, hidden {sizes.hidden_size})"
        # transformers on FP8 block-scaled checkpoints needs its own FP8 kernels: ours only
        models[name] = bench_model(folder, device=device, plan=plan, dtype="bfloat16", with_hf=not fp8)
        on_model(name, models)
    return {"models": models, "summary": f"{len(models)} models"}


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json / gpu_check.md (and logs)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run, tiny sizes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="everything in <= 5 minutes (default)")
    mode.add_argument("--full", action="store_true", help="more repeats, longer prompts")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of: {', '.join(STAGES)}")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); --device cpu dry-runs")
    device = torch.device(args.device)
    mode_name = "dry" if device.type == "cpu" else "full" if args.full else "quick"
    plan = PLANS[mode_name]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    meta = {"mode": mode_name, "device": args.device, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    report = Report(args.out, meta)
    report.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = Path(tmp_name)
        todo: dict[str, Callable[[], dict[str, Any]]] = {
            "env": lambda: stage_env(device),
            "cuda_tests": lambda: stage_cuda_tests(plan, args.out),
            "hf_parity": lambda: stage_hf_parity(device, plan, tmp),
            "cuda_graph": lambda: stage_cuda_graph(device, plan, tmp),
            "bench": lambda: stage_bench(device, plan, tmp, on_model=_partial(report)),
        }
        for name in stages:
            run_stage(report, name, todo[name])
    failed = [n for n, st in report.stages.items() if st["status"] in ("failed", "error")]
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and gpu_check.md; failed: {failed or 'none'}")
    return 1 if failed else 0


def _partial(report: Report) -> Callable[[str, dict], None]:
    """Bench results per model as they come (a later model's crash keeps the earlier ones)."""

    def write(name: str, models: dict) -> None:
        report.stages["bench"] = {"status": "running", "seconds": 0.0, "models": models}
        report.write()

    return write


if __name__ == "__main__":
    sys.exit(main())
