"""Benchmark: the load generator of `epserve bench` is not the bottleneck.

A trivial streaming server (loadtest/fake_server.py: raw asyncio HTTP/1.1, OpenAI-completions-shaped
SSE, 16 `data:` events per response `--itl-ms` apart, then usage and [DONE]) runs in its own
process on 127.0.0.1; the bench's own client and runner (loadtest/http_client.py, runner.py: the
code `epserve bench` runs, in this process) offer arrivals at fixed mean rates for `--duration`
seconds each. Per run it reports the offered rate, the rate the schedule actually drew (a random
sample), the achieved send and completion rates, the dispatcher's
lateness against the schedule (p50/p99), events received (must be 16 per request), and the
client's CPU time per request (the headroom: 1000 / that = requests/s one core could drive).

Runs are RATE:BURSTINESS: burstiness 100 gives nearly fixed gaps (gamma, CV 0.1: the "fixed offered
rate"), 1 gives Poisson arrivals. Target: at a fixed 200 req/s offered, the achieved rate (requests
completed per second of the send window) is within 5% of the offered rate, with no errors.

Usage: python benchmarks/bench_loadgen.py [--runs 200:100,200:1,400:100] [--duration 30] [--itl-ms 5]
       [--results benchmarks/RESULTS-loadgen.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.arrivals import arrival_offsets  # noqa: E402  # after the sys.path line
from loadtest.datasets import random_requests  # noqa: E402
from loadtest.http_client import OpenAICompletionsClient  # noqa: E402
from loadtest.metrics import percentile  # noqa: E402
from loadtest.runner import RunConfig, run  # noqa: E402

TARGET_RATE, TARGET_TOLERANCE, CHUNKS = 200.0, 0.05, 16


def start_server(port: int, itl_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loadtest.fake_server", "--port", str(port), "--itl-ms", str(itl_ms)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"the fake server did not start: {line!r}")
    return proc


async def one_run(base_url: str, rate: float, burstiness: float, duration: float, seed: int) -> dict:
    requests = random_requests(256, input_len=32, output_len=CHUNKS, seed=seed)
    cfg = RunConfig(request_rate=rate, burstiness=burstiness, duration_s=duration, warmup=8, seed=seed, progress=False)
    load = os.getloadavg()[0]
    async with OpenAICompletionsClient(base_url, model="fake") as client:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        out = await run(client, requests, cfg)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    res = out.results
    n, ok = len(res), sum(r.ok for r in res)
    window = max(r.start for r in res) - min(r.start for r in res)
    scheduled = arrival_offsets(n, rate, burstiness, seed=seed)
    return {
        "offered": rate,
        "burstiness": burstiness,
        "requests": n,
        "errors": n - ok,
        "scheduled_rate": (n - 1) / scheduled[-1],
        "achieved_send_rate": (n - 1) / window,
        "achieved_rate": ok / window,  # completed requests per second of the send window
        "throughput_with_tail": ok / out.duration_s,  # vLLM's request throughput: until the last request ends
        "tail_s": out.duration_s - max(r.start for r in res),
        "lag_p50_ms": percentile(out.send_lag_s, 50) * 1e3,
        "lag_p99_ms": percentile(out.send_lag_s, 99) * 1e3,
        "events_ok": all(r.stream_tokens == CHUNKS and r.output_tokens == CHUNKS for r in res if r.ok),
        "cpu_ms_per_request": cpu / max(1, n + cfg.warmup) * 1e3,
        "cpu_share": cpu / wall,
        "load": load,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| offered req/s | arrivals | requests | errors | schedule drew req/s | sent req/s | achieved req/s "
        "| achieved / offered | incl. tail req/s | send lag p50 / p99 ms | 16 events each | client CPU ms/req "
        "| client CPU needed / got | load avg |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        kind = "Poisson" if r["burstiness"] == 1 else f"gamma k={r['burstiness']:g}"
        lines.append(
            f"| {r['offered']:.0f} | {kind} | {r['requests']} | {r['errors']} | {r['scheduled_rate']:.1f} "
            f"| {r['achieved_send_rate']:.1f} | {r['achieved_rate']:.1f} | {r['achieved_rate'] / r['offered']:.3f} "
            f"| {r['throughput_with_tail']:.1f} | {r['lag_p50_ms']:.2f} / {r['lag_p99_ms']:.1f} "
            f"| {'yes' if r['events_ok'] else 'NO'} | {r['cpu_ms_per_request']:.2f} "
            f"| {r['cpu_ms_per_request'] * r['offered'] / 1e3:.0%} / {r['cpu_share']:.0%} "
            f"| {r['load']:.1f} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> tuple[bool, str]:
    row = next((r for r in rows if r["offered"] == TARGET_RATE and r["burstiness"] != 1), None)
    if row is None:
        return False, f"no fixed-rate run at {TARGET_RATE:.0f} req/s"
    ratio = row["achieved_rate"] / row["offered"]
    ok = abs(ratio - 1) <= TARGET_TOLERANCE and not row["errors"] and row["events_ok"]
    return ok, (
        f"at {TARGET_RATE:.0f} req/s offered (gamma k={row['burstiness']:g}): {row['achieved_rate']:.1f} "
        f"req/s achieved ({ratio:.3f} of offered), send lag p99 {row['lag_p99_ms']:.1f} ms, "
        f"{row['errors']} errors -> {'MET' if ok else 'NOT MET'} "
        f"(target: within {TARGET_TOLERANCE:.0%} of offered, no errors, 16 events per response)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs",
        default="200:100,200:1,400:100",
        help="RATE:BURSTINESS per run (burstiness 100 = nearly fixed gaps, 1 = Poisson)",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    p.add_argument("--itl-ms", type=float, default=5.0, help="fake server: gap between the 16 events")
    p.add_argument("--port", type=int, default=0, help="fake server port (default: a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS-loadgen.md"))
    a = p.parse_args()
    port = a.port or _free_port()
    server = start_server(port, a.itl_ms)
    rows = []
    try:
        for spec in a.runs.split(","):
            rate, _, burst = spec.partition(":")
            row = asyncio.run(one_run(f"http://127.0.0.1:{port}", float(rate), float(burst or 1), a.duration, a.seed))
            rows.append(row)
            print(
                f"offered {row['offered']:.0f} req/s (k={row['burstiness']:g}): achieved {row['achieved_rate']:.1f}, "
                f"incl. tail {row['throughput_with_tail']:.1f} req/s, lag p99 {row['lag_p99_ms']:.1f} ms, "
                f"client {row['cpu_ms_per_request']:.2f} CPU ms/request, load {row['load']:.1f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(10)
    ok, line = verdict(rows)
    print(table(rows))
    print(line)
    Path(a.results).write_text(_markdown(rows, line, a))
    print(f"written to {a.results}")
    return 0 if ok else 1


def _markdown(rows: list[dict], line: str, a: argparse.Namespace) -> str:
    return (
        "# Load generator benchmark (`benchmarks/bench_loadgen.py`)\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other work (the load average at the "
        f"start of each run is in the table), Python {platform.python_version()}.\n"
        f"Server: loadtest/fake_server.py in its own process, 16 SSE events per response {a.itl_ms:g} ms apart, "
        "+ usage + [DONE]. Client: the bench's aiohttp client and runner (what `epserve bench` runs) in one "
        f"process, one event loop, {a.duration:g} s per run after 8 warm-up requests.\n\n"
        f"Command: `python benchmarks/bench_loadgen.py --runs {a.runs} --duration {a.duration:g} "
        f"--itl-ms {a.itl_ms:g}`\n\n"
        f"{table(rows)}\n\n**Result:** {line}\n\n"
        'Columns: "schedule drew" is the rate of the arrival sample itself (a Poisson sample of 30 s is '
        'off its mean by ~1-2%); "sent" = sends per second of the send window; "achieved" = requests '
        'completed (all 16 events + usage + [DONE]) per second of the send window; "incl. tail" = vLLM\'s '
        'request throughput (until the last response ends); "send lag" = each send\'s lateness against its '
        'schedule (a saturated client shows it first); "client CPU ms/req" = this process\'s CPU time per '
        "request, so 1000 / it is about the request rate one free core could drive at this response length; "
        '"CPU needed / got" = that time x the offered rate (the share of one core the client needs) / the share '
        "it was given: a run that falls short while it got less than it needed was starved by other processes.\n"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
