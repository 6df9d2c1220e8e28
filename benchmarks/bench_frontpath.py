"""Benchmark: concurrency-1 TTFT and output tok/s of `epserve serve` vs `transformers serve`, same checkpoint.

Both servers run as real subprocesses on 127.0.0.1 (started here, stopped by pid in `finally`), load
the SAME folder (default: the embedded tiny model, bf16) offline (HF_HUB_OFFLINE=1,
TRANSFORMERS_OFFLINE=1), and get byte-identical requests: POST /v1/completions with
`{"model": FOLDER, "prompt": TEXT, "max_tokens": 64, "temperature": 0, "stream": true,
"stream_options": {"include_usage": true}}` (epserve is started with --served-model-name FOLDER, the
name `transformers serve FOLDER` insists on). Prompts are random-token text of exactly
--prompt-len tokens (found by round trip through the folder's tokenizer, loadtest/datasets.py);
both servers report the prompt length in their usage, which is checked. transformers serve rejects
`ignore_eos` (422, unknown field), so lengths are not forced: greedy decoding of the random model
does not reach EOS within 64 tokens, and every request's usage.completion_tokens is checked to be
max_tokens on both servers (a shortfall is printed and counted tokens are used). Greedy texts of
the two servers are compared too (same weights, same tokens expected; bf16 kernels may differ).

Method: warm-up requests on each server, then --rounds rounds, each running the servers one after
the other (ABABAB: epserve then transformers in every round), --requests sequential requests per
run; a round's prompts are fresh (no prefix-cache reuse across runs) and shared by both servers.
Per run: TTFT p50 (send -> first non-empty text event), ITL p50 (gaps between text events),
output tok/s = counted tokens / run wall time, and CPU seconds per request of each server's whole
process tree (psutil user+system, before/after; for epserve: the CLI, Ray's GCS/raylet/agents, the
Serve controller, proxy, ingress, engine replica and trunk rank), plus what the idle other server
burnt meanwhile (both stay up; on a 2-core machine that is noise against the measured one).
Reported: the median of the per-run figures and the ratios epserve / transformers
(targets: tok/s >= 1.0, TTFT <= 1.2).

transformers serve needs `accelerate` (it always passes device_map) and, for this checkpoint's
AutoProcessor, torchvision, which the CPU venv lacks (PyPI's wheels are CUDA builds). The
benchmark installs accelerate with `pip install --no-deps --target` into a private folder seen only
by the transformers subprocess (the shared venv is left alone), and starts transformers serve via
benchmarks/tf_serve_textonly.py, which falls back to the tokenizer when AutoProcessor needs
torchvision (the text endpoints only use the tokenizer).

Usage: python benchmarks/bench_frontpath.py [--model DIR] [--requests 20] [--warmup 3] [--rounds 3]
       [--prompt-len 128] [--max-tokens 64] [--results benchmarks/RESULTS-frontpath.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPSERVE, TRANSFORMERS = "epserve", "transformers"
TARGET_TOKS, TARGET_TTFT = 1.0, 1.2
NOTES = "## Notes"  # from this heading on, the results file is kept as it is on a rerun
IDLE: dict[str, dict[str, float]] = {}  # server -> process class -> cores used while idle
NICE: dict[str, dict[str, int]] = {}  # server -> process class -> niceness, filled after warm-up
DEPS_DIR = Path.home() / ".cache" / "epserve" / "bench-deps"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


# ------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """One server subprocess in its own session; `stop` ends it and every descendant it had, by pid."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen | None = None
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant ever seen, by pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        print(f"[{self.name}] started pid {self.proc.pid}: {' '.join(self.argv)} (log {self.log_path})", flush=True)

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} before it was ready; "
                        f"log tail:\n{self.log_tail()}"
                    )
                try:
                    async with s.get(self.base + self.ready_path) as r:
                        if r.status == 200:
                            self.tree()  # remember the descendants for cleanup
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready within {timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def tree(self) -> list[psutil.Process]:
        """The server process and its live descendants (also recorded for cleanup)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            self.seen.setdefault(p.pid, p)
        return procs

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM (epserve shuts Serve and its own Ray cluster down on it), then SIGKILL what is left, by pid."""
        if self.proc is None:
            return
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] still running {grace_s:.0f} s after SIGTERM: SIGKILL", flush=True)
                self.proc.kill()
                self.proc.wait(10)
        left = [p for p in self.seen.values() if _alive(p)]
        for p in left:
            try:
                p.kill()  # psutil checks the pid still names the process it saw (create time)
            except psutil.Error:
                pass
        if left:
            print(f"[{self.name}] killed {len(left)} leftover process(es): {[p.pid for p in left]}", flush=True)
        psutil.wait_procs(left, timeout=10)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_class(p: psutil.Process) -> str:
    """A short label: Ray workers by actor class (`ray::ServeReplica:app:Ingress.method` -> its deployment)."""
    try:
        name = p.name()
        if name.startswith("ray::"):
            label = name[5:].split(".")[0]
            return label.split(":")[-1] if label.startswith("ServeReplica") else label
        cmd = p.cmdline()
        for part in cmd[1:4]:
            if part.endswith(".py"):
                return Path(part).stem
        if len(cmd) > 2 and cmd[1] == "-m":
            return cmd[2]
        return name
    except psutil.Error:
        return "?"


def niceness(server: Server) -> dict[str, int]:
    """Scheduler niceness per process class (Ray starts its workers at nice 15)."""
    out = {}
    for p in server.tree():
        try:
            out[process_class(p)] = p.nice()
        except psutil.Error:
            pass
    return out


def cpu_snapshot(server: Server) -> dict[tuple[int, float], tuple[str, float]]:
    """(pid, create time) -> (class, user+system CPU seconds) for the server's process tree."""
    out = {}
    for p in server.tree():
        try:
            t = p.cpu_times()
            out[(p.pid, p.create_time())] = (process_class(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per process class between two snapshots (new processes count from 0)."""
    by_class: dict[str, float] = {}
    for key, (cls, cpu) in after.items():
        by_class[cls] = by_class.get(cls, 0.0) + cpu - before.get(key, (cls, 0.0))[1]
    return by_class


def ensure_accelerate(deps_dir: Path) -> str | None:
    """A folder to put on the transformers subprocess' PYTHONPATH so `accelerate` imports (None: already does)."""
    if importlib.util.find_spec("accelerate") is not None:
        return None
    if not (deps_dir / "accelerate").is_dir():
        print(f"installing accelerate (no deps) into {deps_dir} for transformers serve only", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(deps_dir), "accelerate"],
            check=True,
            timeout=300,
        )
    return str(deps_dir)


def make_servers(model: str, logs: Path, deps_dir: Path, tf_threads: int | None) -> dict[str, Server]:
    base_env = {**os.environ, **OFFLINE_ENV}
    base_env.pop("PYTHONPATH", None)
    ep_env = {**base_env, "PYTHONPATH": str(ROOT)}
    ep_port, grpc_port = free_port(), free_port()
    ep = Server(
        EPSERVE,
        [
            sys.executable,
            "-m",
            "epserve.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(ep_port),
            "--grpc-port",
            str(grpc_port),
            "--served-model-name",
            model,
        ],
        ep_env,
        ep_port,
        "/v1/models",
        logs / "epserve.log",
    )
    tf_env = dict(base_env)
    extra = ensure_accelerate(deps_dir)
    if extra:
        tf_env["PYTHONPATH"] = extra
    if tf_threads:
        # torch's intra-op pool; epserve's trunk rank runs 1 thread. With one per core on a loaded 2-core machine
        # generate() stalls in OpenMP barriers (40-110 s instead of 3 s for 64 tokens, measured 2026-12-05).
        tf_env["OMP_NUM_THREADS"] = str(tf_threads)
    tf_port = free_port()
    tf = Server(
        TRANSFORMERS,
        [
            sys.executable,
            str(ROOT / "benchmarks" / "tf_serve_textonly.py"),
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(tf_port),
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--log-level",
            "warning",
        ],
        tf_env,
        tf_port,
        "/health",
        logs / "transformers.log",
    )
    return {EPSERVE: ep, TRANSFORMERS: tf}


# ------------------------------------------------------------------------------ client
@dataclass
class Req:
    """One streamed request as the client saw it (times: perf_counter seconds)."""

    start: float
    end: float = float("nan")
    text_times: list[float] = field(default_factory=list)
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.text_times[0] - self.start if self.text_times else float("nan")


def request_body(model: str, prompt: str, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes) -> Req:
    """POST one streaming request and read it to the end (epserve ends with [DONE], transformers closes)."""
    r = Req(start=time.perf_counter())
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return r
            buf = b""
            async for data in resp.content.iter_any():
                t = time.perf_counter()
                buf += data.replace(b"\r\n", b"\n")
                while (cut := buf.find(b"\n\n")) >= 0:
                    event, buf = buf[:cut], buf[cut + 2 :]
                    for line in event.split(b"\n"):
                        if line.startswith(b"data:"):
                            _on_event(line[5:].strip(), r, t)
    except asyncio.TimeoutError:
        r.error = "timeout"
    except aiohttp.ClientError as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        r.end = time.perf_counter()
    if r.error is None and r.completion_tokens is None:
        r.error = "stream ended without a usage event"
    return r


def _on_event(payload: bytes, r: Req, t: float) -> None:
    if payload == b"[DONE]":
        return
    ev = json.loads(payload)
    if "error" in ev:
        r.error = f"stream error: {json.dumps(ev['error'])[:300]}"
        return
    for choice in ev.get("choices") or []:
        if choice.get("text"):
            r.text_times.append(t)
            r.text += choice["text"]
    if ev.get("usage"):
        r.prompt_tokens = ev["usage"].get("prompt_tokens")
        r.completion_tokens = ev["usage"].get("completion_tokens")


# ------------------------------------------------------------------------------ runs
@dataclass
class Run:
    server: str
    round: int
    reqs: list[Req]
    wall_s: float
    cpu: dict[str, float]  # this server's tree, by process class
    other_cpu_s: float  # the idle other server's tree meanwhile
    client_cpu_s: float  # this benchmark process

    @property
    def tokens(self) -> int:
        return sum(r.completion_tokens or 0 for r in self.reqs)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(r.ttft for r in self.reqs) * 1e3

    @property
    def itl_p50_ms(self) -> float:
        gaps = [b - a for r in self.reqs for a, b in zip(r.text_times, r.text_times[1:])]
        return statistics.median(gaps) * 1e3 if gaps else float("nan")

    @property
    def cpu_per_req_s(self) -> float:
        return sum(self.cpu.values()) / len(self.reqs)

    def busy_cpu(self, idle: dict[str, float]) -> dict[str, float]:
        """CPU seconds per class beyond what the server burns idle over the same wall time."""
        return {c: v - idle.get(c, 0.0) * self.wall_s for c, v in self.cpu.items()}


async def run_requests(
    server: Server, other: Server, model: str, prompts: list[str], max_tokens: int, timeout_s: float, round_: int
) -> Run:
    url = server.base + "/v1/completions"
    me = psutil.Process()
    before, other_before, client_before = cpu_snapshot(server), cpu_snapshot(other), me.cpu_times()
    reqs = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        for prompt in prompts:
            reqs.append(await stream_one(s, url, request_body(model, prompt, max_tokens)))
            if reqs[-1].error:
                raise RuntimeError(f"{server.name}: request failed: {reqs[-1].error}")
    wall = time.perf_counter() - t0
    after, other_after, client_after = cpu_snapshot(server), cpu_snapshot(other), me.cpu_times()
    return Run(
        server.name,
        round_,
        reqs,
        wall,
        cpu_delta(before, after),
        sum(cpu_delta(other_before, other_after).values()),
        (client_after.user + client_after.system) - (client_before.user + client_before.system),
    )


def make_prompts(model: str, n: int, prompt_len: int, seed: int) -> list[str]:
    from loadtest.datasets import TokenSpace, random_requests
    from model_shards.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model)
    reqs = random_requests(
        n, input_len=prompt_len, output_len=1, seed=seed, space=TokenSpace.from_tokenizer_dir(model, tok), codec=tok
    )
    bad = [r.prompt_len for r in reqs if r.prompt_len != prompt_len]
    if bad:
        raise RuntimeError(f"could not build {prompt_len}-token text prompts (got lengths {bad})")
    return [str(r.prompt) for r in reqs]


# ------------------------------------------------------------------------------ report
def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def check_counts(runs: list[Run], prompt_len: int, max_tokens: int) -> list[str]:
    problems = []
    for run in runs:
        for i, r in enumerate(run.reqs):
            if r.completion_tokens != max_tokens:
                problems.append(
                    f"{run.server} round {run.round} req {i}: {r.completion_tokens} output tokens (wanted {max_tokens})"
                )
            if r.prompt_tokens != prompt_len:
                problems.append(
                    f"{run.server} round {run.round} req {i}: {r.prompt_tokens} prompt tokens (wanted {prompt_len})"
                )
    return problems


def same_text_fraction(runs: list[Run]) -> tuple[int, int, float]:
    """(identical texts, pairs, mean common-prefix length in characters) of the two servers' greedy outputs."""
    by = {(r.server, r.round): r for r in runs}
    same = total = 0
    prefix: list[int] = []
    for (srv, rnd), run in by.items():
        if srv != EPSERVE or (TRANSFORMERS, rnd) not in by:
            continue
        for a, b in zip(run.reqs, by[(TRANSFORMERS, rnd)].reqs):
            total += 1
            same += a.text == b.text
            prefix.append(len(os.path.commonprefix([a.text, b.text])))
    return same, total, statistics.mean(prefix) if prefix else float("nan")


def summarize(runs: list[Run]) -> dict:
    out: dict = {}
    for srv in (EPSERVE, TRANSFORMERS):
        rs = [r for r in runs if r.server == srv]
        classes: dict[str, list[float]] = {}
        busy: dict[str, list[float]] = {}
        for r in rs:
            for cls, cpu in r.cpu.items():
                classes.setdefault(cls, []).append(cpu / len(r.reqs))
            for cls, cpu in r.busy_cpu(IDLE.get(srv, {})).items():
                busy.setdefault(cls, []).append(cpu / len(r.reqs))
        out[srv] = {
            "ttft_p50_ms": med([r.ttft_p50_ms for r in rs]),
            "itl_p50_ms": med([r.itl_p50_ms for r in rs]),
            "tok_s": med([r.tok_s for r in rs]),
            "cpu_ms_per_req": med([r.cpu_per_req_s for r in rs]) * 1e3,
            "cpu_ms_per_req_by_class": {c: med(v) * 1e3 for c, v in classes.items()},
            "busy_cpu_ms_per_req_by_class": {c: med(v) * 1e3 for c, v in busy.items()},
            "busy_cpu_ms_per_req": med([sum(r.busy_cpu(IDLE.get(srv, {})).values()) / len(r.reqs) for r in rs]) * 1e3,
            "idle_cores": sum(IDLE.get(srv, {}).values()),
            "other_idle_cores": med([r.other_cpu_s / r.wall_s for r in rs]),
            "client_cpu_ms_per_req": med([r.client_cpu_s / len(r.reqs) for r in rs]) * 1e3,
            "per_run": [
                {
                    "round": r.round,
                    "ttft_p50_ms": r.ttft_p50_ms,
                    "itl_p50_ms": r.itl_p50_ms,
                    "tok_s": r.tok_s,
                    "tokens": r.tokens,
                    "wall_s": r.wall_s,
                    "cpu_ms_per_req": r.cpu_per_req_s * 1e3,
                }
                for r in rs
            ],
        }
    ep, tf = out[EPSERVE], out[TRANSFORMERS]
    out["ratio_tok_s"] = ep["tok_s"] / tf["tok_s"]
    out["ratio_ttft"] = ep["ttft_p50_ms"] / tf["ttft_p50_ms"]
    return out


def machine_info() -> dict:
    import torch
    import transformers

    cpu_model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def report_text(
    s: dict,
    args: argparse.Namespace,
    info: dict,
    problems: list[str],
    same: tuple[int, int, float],
    load: tuple[tuple[float, ...], tuple[float, ...]],
) -> str:
    ep, tf = s[EPSERVE], s[TRANSFORMERS]
    lines = [
        "| | TTFT p50 ms | ITL p50 ms | output tok/s | server CPU ms / request | idle other server, cores |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, d in ((EPSERVE, ep), (TRANSFORMERS, tf)):
        lines.append(
            f"| {name} | {d['ttft_p50_ms']:.1f} | {d['itl_p50_ms']:.2f} | {d['tok_s']:.1f} | "
            f"{d['cpu_ms_per_req']:.0f} | {d['other_idle_cores']:.2f} |"
        )
    ok_t = "meets" if s["ratio_tok_s"] >= TARGET_TOKS else "MISSES"
    ok_f = "meets" if s["ratio_ttft"] <= TARGET_TTFT else "MISSES"
    lines += [
        "",
        f"- epserve / transformers output tok/s: **{s['ratio_tok_s']:.2f}x** (target >= {TARGET_TOKS}: {ok_t})",
        f"- epserve / transformers TTFT p50: **{s['ratio_ttft']:.2f}x** (target <= {TARGET_TTFT}: {ok_f})",
        "- output tokens: "
        + (
            f"all requests {args.max_tokens} on both servers"
            if not problems
            else "MISMATCH: " + "; ".join(problems[:5])
        ),
        f"- identical greedy text on both servers: {same[0]}/{same[1]} requests (mean common prefix {same[2]:.0f} "
        "characters: same weights, but the two bf16 implementations round differently, so greedy paths may part)",
        "",
        "Per run (round: TTFT p50 ms / ITL p50 ms / tok/s / CPU ms per request):",
        "",
    ]
    for name, d in ((EPSERVE, ep), (TRANSFORMERS, tf)):
        runs = ", ".join(
            f"r{r['round']}: {r['ttft_p50_ms']:.1f} / {r['itl_p50_ms']:.2f} / {r['tok_s']:.1f} / "
            f"{r['cpu_ms_per_req']:.0f}"
            for r in d["per_run"]
        )
        lines.append(f"- {name}: {runs}")
    lines += ["", "Server CPU ms per request by process (median over runs):", ""]
    for name, d in ((EPSERVE, ep), (TRANSFORMERS, tf)):
        parts = sorted(d["cpu_ms_per_req_by_class"].items(), key=lambda kv: -kv[1])
        lines.append(f"- {name}: " + ", ".join(f"{c} {v:.0f}" for c, v in parts if abs(v) >= 0.5))
    if IDLE:
        lines += [
            "",
            f"Idle background ({args.idle_s:g} s, both servers idle): epserve {ep['idle_cores']:.3f} cores, "
            f"transformers {tf['idle_cores']:.3f} cores. Request-attributable CPU ms per request (run CPU minus "
            f"idle rate x run wall time): epserve {ep['busy_cpu_ms_per_req']:.0f}, transformers "
            f"{tf['busy_cpu_ms_per_req']:.0f}; by process:",
            "",
        ]
        for name, d in ((EPSERVE, ep), (TRANSFORMERS, tf)):
            parts = sorted(d["busy_cpu_ms_per_req_by_class"].items(), key=lambda kv: -kv[1])
            lines.append(f"- {name}: " + ", ".join(f"{c} {v:.0f}" for c, v in parts if abs(v) >= 0.5))
    lines += [
        "",
        f"Client (this benchmark process) CPU per request: epserve runs {ep['client_cpu_ms_per_req']:.0f} ms, "
        f"transformers runs {tf['client_cpu_ms_per_req']:.0f} ms.",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}), shared and noisy (other jobs running); load average "
        f"{load[0][0]:.1f} before, {load[1][0]:.1f} after. torch {info['torch']}, "
        f"transformers {info['transformers']}, Python {info['python']}.",
        "Niceness (Ray runs its workers at 15): "
        + "; ".join(f"{srv}: " + ", ".join(f"{c} {n}" for c, n in sorted(d.items())) for srv, d in NICE.items())
        + ".",
        f"Torch threads: transformers serve {args.tf_threads or 'torch default (= cores)'}, epserve trunk rank 1.",
        f"Settings: {args.rounds} rounds ABAB..., {args.requests} sequential requests per run after {args.warmup} "
        f"warm-up requests per server, prompt {args.prompt_len} tokens, max_tokens {args.max_tokens}, greedy.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
async def bench(args: argparse.Namespace, servers: dict[str, Server], model: str) -> tuple[list[Run], list[Run]]:
    await asyncio.gather(*(s.wait_ready(args.startup_timeout) for s in servers.values()))
    ep, tf = servers[EPSERVE], servers[TRANSFORMERS]
    warm_prompts = make_prompts(model, args.warmup, args.prompt_len, seed=10_000)
    warm = []
    for srv, other in ((ep, tf), (tf, ep)):
        warm.append(await run_requests(srv, other, model, warm_prompts, args.max_tokens, args.request_timeout, -1))
        NICE[srv.name] = niceness(srv)
        print(f"[{srv.name}] warm-up done ({args.warmup} requests, {warm[-1].wall_s:.1f} s)", flush=True)
    if args.idle_s > 0:  # both servers idle: their background CPU (Ray's GCS, controller, agents, polling)
        before = {n: cpu_snapshot(s) for n, s in servers.items()}
        await asyncio.sleep(args.idle_s)
        for n, s in servers.items():
            IDLE[n] = {c: v / args.idle_s for c, v in cpu_delta(before[n], cpu_snapshot(s)).items()}
        print("idle CPU (cores): " + "; ".join(f"{n} {sum(d.values()):.3f}" for n, d in IDLE.items()), flush=True)
    runs = []
    for rnd in range(args.rounds):
        prompts = make_prompts(model, args.requests, args.prompt_len, seed=rnd)
        for srv, other in ((ep, tf), (tf, ep)):
            run = await run_requests(srv, other, model, prompts, args.max_tokens, args.request_timeout, rnd)
            runs.append(run)
            print(
                f"[{srv.name}] round {rnd}: TTFT p50 {run.ttft_p50_ms:.1f} ms, ITL p50 {run.itl_p50_ms:.2f} ms, "
                f"{run.tok_s:.1f} tok/s ({run.tokens} tokens in {run.wall_s:.1f} s), "
                f"server CPU {run.cpu_per_req_s * 1e3:.0f} ms/request",
                flush=True,
            )
    return warm, runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--requests", type=int, default=20, help="sequential requests per run")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests per server")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one run per server each)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle window measuring background CPU (0 = skip)")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for both servers to be ready")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds for one whole request")
    ap.add_argument("--deps-dir", type=Path, default=DEPS_DIR, help="private folder for accelerate (transformers only)")
    ap.add_argument(
        "--tf-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of transformers serve (default 1, as epserve's trunk rank; 0 = torch's "
        "default, one per core, which stalls badly on a loaded machine)",
    )
    ap.add_argument(
        "--results", type=Path, help="write the markdown report here (e.g. benchmarks/RESULTS-frontpath.md)"
    )
    ap.add_argument("--json", type=Path, help="write all figures as JSON here")
    args = ap.parse_args()
    for k, v in OFFLINE_ENV.items():
        os.environ[k] = v  # this process reads the tokenizer too
    # SIGTERM ends the benchmark like Ctrl-C does: through `finally`, which stops both servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    from model_shards.tiny_checkpoint import resolve_model_dir

    model = str(Path(resolve_model_dir(args.model)).resolve())
    info = machine_info()
    print(f"model {model}; {info}", flush=True)
    load0 = os.getloadavg()
    logs = Path(tempfile.mkdtemp(prefix="bench-frontpath-"))
    servers = make_servers(model, logs, args.deps_dir, args.tf_threads)
    try:
        for s in servers.values():
            s.start()
        _warm, runs = asyncio.run(bench(args, servers, model))
    finally:
        for s in servers.values():
            s.stop()
    load1 = os.getloadavg()

    problems = check_counts(runs, args.prompt_len, args.max_tokens)
    same = same_text_fraction(runs)
    summary = summarize(runs)
    text = report_text(summary, args, info, problems, same, (load0, load1))
    print("\n" + text, flush=True)
    if args.results:
        cmd = "python benchmarks/bench_frontpath.py " + " ".join(sys.argv[1:])
        old = args.results.read_text() if args.results.exists() else ""
        notes = old[old.index(NOTES) :] if NOTES in old else ""  # hand-written analysis survives a rerun
        args.results.write_text(
            f"# Front path at concurrency 1: epserve serve vs transformers serve\n\n"
            f"Command: `{cmd}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"{text}\n" + (f"\n{notes}" if notes else "")
        )
        print(f"wrote {args.results}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"summary": summary, "problems": problems, "same_text": same, "machine": info, "load": [load0, load1]},
                indent=1,
            )
        )
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
