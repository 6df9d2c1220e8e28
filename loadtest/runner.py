"""Running a benchmark: warm-up, then dispatch on the arrival schedule, then wait for the tail.

The dispatch loop sleeps until each request's arrival time, then (with --max-concurrency) waits
for a free slot, then starts the request as a task: with a finite rate this is vLLM's "Poisson
arrivals, at most C in flight"; with an infinite rate and C it is a closed loop of C clients.
With a duration the dataset is cycled and no request is sent at or after the deadline; requests
in flight at the deadline run to completion (so server counters match the client's totals).
Each send's lateness against its schedule is kept (a late dispatcher = a saturated client).
Must not: know the protocol (clients do) or aggregate (metrics.py). Tests: tests/loadtest/test_bench.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loadtest.arrivals import arrival_times, check_rate
from loadtest.datasets import BenchRequest
from loadtest.metrics import RequestResult


class Client(Protocol):
    async def send(self, req: BenchRequest, now: Callable[[], float]) -> RequestResult: ...


@dataclass(frozen=True)
class RunConfig:
    """How to send.

    Args:
        request_rate: mean requests/s (math.inf: all at once, or a closed loop with max_concurrency).
        burstiness: gamma shape of the inter-arrival times (1 = Poisson).
        max_concurrency: at most this many requests in flight (None = unbounded).
        duration_s: stop sending after this many seconds (the dataset is cycled); None = send it once.
        warmup: requests sent (and awaited) before the measured run; excluded from every statistic.
        seed: seed of the arrival times.
        progress: show a progress bar on stderr.
    """

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_rate(self.request_rate, self.burstiness)
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.duration_s is not None and math.isinf(self.request_rate) and self.max_concurrency is None:
            raise ValueError(
                "--duration with an infinite --request-rate needs --max-concurrency "
                "(else it would start requests without bound)"
            )
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")


@dataclass
class RunOutcome:
    """Results of the measured run (sorted by send time), its duration, the warm-up results, and send lateness."""

    results: list[RequestResult]
    duration_s: float
    warmup: list[RequestResult] = field(default_factory=list)
    send_lag_s: list[float] = field(default_factory=list)


class WarmupFailed(RuntimeError):
    """A warm-up request failed: the server, model name or key is wrong; nothing was measured."""


async def run(client: Client, requests: Sequence[BenchRequest], cfg: RunConfig) -> RunOutcome:
    """Warm up, then run the benchmark. `client` is entered by the caller."""
    if not requests:
        raise ValueError("no requests to send (--num-prompts must be >= 1)")
    warm = await _warmup(client, requests, cfg)
    bar = progress_bar(None if cfg.duration_s is not None else len(requests), enabled=cfg.progress)
    try:
        outcome = await _dispatch(client, requests, cfg, bar.update)
    finally:
        bar.close()
    outcome.warmup = warm
    return outcome


async def _warmup(client: Client, requests: Sequence[BenchRequest], cfg: RunConfig) -> list[RequestResult]:
    if not cfg.warmup:
        return []
    t0 = time.perf_counter()
    width = min(cfg.warmup, cfg.max_concurrency or cfg.warmup)
    sem = asyncio.Semaphore(width)

    async def one(req: BenchRequest) -> RequestResult:
        async with sem:
            return await client.send(req, lambda: time.perf_counter() - t0)

    reqs = [requests[i % len(requests)] for i in range(cfg.warmup)]
    results = await asyncio.gather(*(one(r) for r in reqs))
    for r in results:
        if not r.ok:
            raise WarmupFailed(f"a warm-up request failed ({r.error}): {r.error_detail or 'no detail'}")
    return list(results)


async def _dispatch(
    client: Client, requests: Sequence[BenchRequest], cfg: RunConfig, on_done: Callable[[int], object]
) -> RunOutcome:
    """The measured run (see the module docstring)."""
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    results: list[RequestResult] = []
    lag: list[float] = []
    tasks: set[asyncio.Task] = set()
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    async def one(req: BenchRequest) -> None:
        try:
            r = await _safe_send(client.send(req, now), req, now)
        finally:
            if sem is not None:
                sem.release()
        results.append(r)
        on_done(1)

    source = itertools.cycle(requests) if cfg.duration_s is not None else requests
    deadline = cfg.duration_s if cfg.duration_s is not None else math.inf
    for req, at in zip(source, arrival_times(cfg.request_rate, cfg.burstiness, seed=cfg.seed)):
        if at >= deadline:
            break
        delay = at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            await sem.acquire()
        if now() >= deadline:
            if sem is not None:
                sem.release()
            break
        lag.append(now() - at)
        task = asyncio.create_task(one(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*list(tasks))
    duration = now()
    results.sort(key=lambda r: r.start)
    return RunOutcome(results=results, duration_s=duration, send_lag_s=lag)


async def _safe_send(coro: Awaitable[RequestResult], req: BenchRequest, now: Callable[[], float]) -> RequestResult:
    """A client bug must not end the run: it becomes a `client_error` result."""
    start = now()
    try:
        return await coro
    except Exception as exc:  # noqa: BLE001  # recorded as an error kind
        return RequestResult(
            req.prompt_len,
            req.output_len,
            start=start,
            end=now(),
            error="client_error",
            error_detail=f"{type(exc).__name__}: {exc}"[:300],
        )


class _SimpleBar:
    """A progress line on stderr when tqdm is not installed (at most one redraw a second)."""

    def __init__(self, total: int | None) -> None:
        self.total, self.n, self.t0, self.last = total, 0, time.monotonic(), 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        t = time.monotonic()
        if t - self.last >= 1.0 or self.n == self.total:
            self.last = t
            of = f"/{self.total}" if self.total else ""
            sys.stderr.write(f"\r  {self.n}{of} requests done, {t - self.t0:.0f} s")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, *, enabled: bool):  # noqa: ANN201  # tqdm, _SimpleBar or _NoBar
    """tqdm when installed, else a plain progress line; nothing when disabled."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, unit="req", desc="requests", file=sys.stderr, mininterval=0.5)
