"""Prefix-cache figures of a run: token hit rate, where each prefix group landed, and engine load balance.

- token hit rate: the sum of usage.prompt_tokens_details.cached_tokens over the sum of prompt tokens (a server
  that sends no cached_tokens counts 0);
- landing: per prefix group (BenchRequest.group), the requests each engine replica ran (the `x-epserve-engine`
  header) and the share of the group's busiest replica;
- load balance: running + waiting requests per engine replica, sampled about once a second by `LoadSampler`
  from a caller-given source (the app's metrics hub: /metrics sums the replicas), as max/mean per sample; and the
  same measure rebuilt from the run's own records (`inflight_balance`): each request is in flight on the replica
  that ran it from its send to the end of its stream, so every replica's count is known at one instant (the
  hub's values are each replica's last push, up to a second apart).
Must not: send requests. Tests: tests/loadtest/test_prefix_stats.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loadtest.metrics import RequestResult

SAMPLE_PERIOD_S = 1.0
FULL_LOAD = 0.9


def token_hit_rate(results: Sequence[RequestResult]) -> dict[str, float]:
    """Cached and all prompt tokens of the successful requests, and their ratio (nan without prompt tokens)."""
    ok = [r for r in results if r.ok]
    cached = sum(r.usage_cached_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "cached_tokens": cached,
        "prompt_tokens": prompt,
        "token_hit_rate": cached / prompt if prompt else math.nan,
        "requests_reporting_cached_tokens": sum(r.usage_cached_tokens is not None for r in ok),
    }


def landing(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Per group, requests by engine replica and the busiest replica's share; the smallest share over groups."""
    by_group: dict[int, Counter[str]] = {}
    for r in results:
        if r.ok and r.group is not None:
            by_group.setdefault(r.group, Counter())[r.engine or "?"] += 1
    shares = {g: max(c.values()) / sum(c.values()) for g, c in by_group.items()}
    return {
        "groups": {g: {"engines": dict(c), "top_share": shares[g]} for g, c in sorted(by_group.items())},
        "min_top_share": min(shares.values(), default=math.nan),
        "engines_named": any(k != "?" for c in by_group.values() for k in c),
    }


def balance(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    """max/mean of the replicas' loads per sample (samples with no load skipped): its largest and its mean value,
    its largest at full load (samples whose total is at least FULL_LOAD x the largest total: the tail of a run,
    1 request vs 0, is 2.0 whatever the router does), and max/mean of the loads averaged over the samples."""
    peak = max((sum(s.values()) for s in samples), default=0.0)
    full = [
        max(s.values()) / (sum(s.values()) / len(s))
        for s in samples
        if s and peak and sum(s.values()) >= FULL_LOAD * peak
    ]
    ratios = []
    totals: dict[str, float] = {}
    for s in samples:
        for k, v in s.items():
            totals[k] = totals.get(k, 0.0) + v
        mean = sum(s.values()) / len(s) if s else 0.0
        if mean > 0:
            ratios.append(max(s.values()) / mean)
    mean_total = sum(totals.values()) / len(totals) if totals else 0.0
    return {
        "samples": len(samples),
        "busy_samples": len(ratios),
        "max_over_mean_max": max(ratios, default=math.nan),
        "max_over_mean_mean": sum(ratios) / len(ratios) if ratios else math.nan,
        "max_over_mean_max_at_full_load": max(full, default=math.nan),
        "max_over_mean_of_averages": max(totals.values()) / mean_total if mean_total > 0 else math.nan,
    }


class LoadSampler:
    """Calls `source()` (replica -> running + waiting) every SAMPLE_PERIOD_S while running; use as `async with`."""

    def __init__(self, source: Callable[[], Awaitable[dict[str, float]]], period_s: float = SAMPLE_PERIOD_S) -> None:
        self.source, self.period_s = source, period_s
        self.samples: list[dict[str, float]] = []
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                self.samples.append(await self.source())
            except Exception:  # noqa: BLE001  # a missed sample is no reason to end a benchmark
                pass
            await asyncio.sleep(max(0.0, self.period_s - (time.monotonic() - t0)))

    async def __aenter__(self) -> LoadSampler:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def inflight_balance(results: Sequence[RequestResult], group_firsts: int, period_s: float = SAMPLE_PERIOD_S) -> dict:
    """max/mean of the requests in flight per engine replica, rebuilt from the records, by phase: `steady` from the
    first send after the `group_firsts` to the last send (the load generator keeps its full concurrency in flight),
    `tail` after it (the drain: one request against none is 2.0 whatever the router does). Per phase: the ratio
    every `period_s` and its worst over every send and end instant (the exact maximum, not a sample)."""
    ok = [r for r in results if r.ok and r.engine and math.isfinite(r.end)]
    engines = sorted({r.engine for r in ok})
    starts = sorted(r.start for r in results)
    if len(engines) < 2 or len(starts) <= group_firsts:
        return {}

    def ratio(t: float) -> float:
        n = Counter(r.engine for r in ok if r.start <= t < r.end)
        loads = [n.get(e, 0) for e in engines]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else math.nan

    last_end = max(r.end for r in ok)
    out: dict[str, dict[str, Any]] = {}
    for name, lo, hi in (("steady", starts[group_firsts], starts[-1]), ("tail", starts[-1], last_end)):
        ticks = [lo + k * period_s for k in range(int((hi - lo) / period_s) + 1)]
        events = [t for r in ok for t in (r.start, r.end) if lo <= t <= hi]
        sampled = [x for x in map(ratio, ticks) if not math.isnan(x)]
        exact = [x for x in map(ratio, events) if not math.isnan(x)]
        out[name] = {
            "from_s": lo,
            "to_s": hi,
            "samples": len(sampled),
            "worst_sample": max(sampled, default=math.nan),
            "mean_sample": sum(sampled) / len(sampled) if sampled else math.nan,
            "samples_above_1_5": sum(x > 1.5 + 1e-9 for x in sampled),
            "worst_instant": max(exact, default=math.nan),
        }
    return out
