"""Per-request measurements and their aggregation (the metric vocabulary of `vllm bench serve`).

TTFT: send -> first token-bearing stream event. ITL: gaps between consecutive token-bearing
events (per chunk; one token per event on epserve). E2E: send -> end of stream.
TPOT: (E2E - TTFT) / (output tokens - 1), requests with more than one token only.
Goodput (DistServe): completed requests per second that meet every SLO given.
All times in seconds here; the report converts to ms. Must not: do I/O.
Tests: tests/loadtest/test_bench.py (percentiles against numpy, goodput counting).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)
SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el", "e2el": "e2el"}


@dataclass
class RequestResult:
    """One request's outcome. Times are seconds on the runner's clock (0 = benchmark start).

    Args:
        prompt_len, output_len: what the dataset planned.
        start, end: send time and end of stream (or failure).
        chunk_times: arrival time of every token-bearing stream event.
        chunk_tokens: tokens in each of those events (1 per SSE event; len(token_ids) over gRPC).
        usage_prompt_tokens, usage_completion_tokens: the server's usage (final event), if sent.
        usage_cached_tokens: usage.prompt_tokens_details.cached_tokens (prompt tokens the prefix cache saved), if sent.
        engine: the engine replica that ran it (the `x-epserve-engine` response header; "" when absent).
        group: the dataset's prefix group of the request (shared-prefix), else None.
        error: error kind ("http_429", "timeout", "stream_error", ...) or None on success.
    """

    prompt_len: int
    output_len: int
    start: float
    end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None
    engine: str = ""
    group: int | None = None
    error: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def stream_tokens(self) -> int:
        """Output tokens counted from the stream events."""
        return sum(self.chunk_tokens)

    @property
    def output_tokens(self) -> int:
        """The server's count when it sent usage, else the stream's."""
        return self.usage_completion_tokens if self.usage_completion_tokens is not None else self.stream_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.prompt_len

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        n, ttft = self.output_tokens, self.ttft
        return (self.e2e - ttft) / (n - 1) if n > 1 and ttft is not None else None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default).

    Returns nan for an empty list.
    """
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: list[float], percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, float]:
    """mean, median, std (population), min, max and p<q> of `values` (nan when empty)."""
    if not values:
        nan = math.nan
        return {"mean": nan, "median": nan, "std": nan, "min": nan, "max": nan} | {f"p{q:g}": nan for q in percentiles}
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
    out = {"mean": mean, "median": percentile(values, 50), "std": std, "min": min(values), "max": max(values)}
    return out | {f"p{q:g}": percentile(values, q) for q in percentiles}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50", "e2e:2000"]` (milliseconds) -> {"ttft": 0.5, "tpot": 0.05, "e2el": 2.0} (seconds).

    Keys: ttft, tpot, itl (every gap of the request), e2e (alias e2el).

    Raises:
        ValueError: unknown key, missing colon, or a non-positive number.
    """
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key.strip().lower() not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY in ttft, tpot, itl, e2e; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be > 0 ms")
        slos[SLO_KEYS[key.strip().lower()]] = ms / 1e3
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """A successful request whose TTFT, TPOT, every ITL gap and E2E are within the SLOs given."""
    if not r.ok:
        return False
    checks = {
        "ttft": lambda: r.ttft is not None and r.ttft <= slos["ttft"],
        "tpot": lambda: r.tpot is None or r.tpot <= slos["tpot"],
        "itl": lambda: all(g <= slos["itl"] for g in r.itl),
        "e2el": lambda: r.e2e <= slos["e2el"],
    }
    return all(checks[k]() for k in slos)


def timeline(results: list[RequestResult], bucket_s: float = 1.0) -> dict[str, list[float]]:
    """Per time bucket from 0 (start `t`, `width`): output tokens/s, completed requests/s, mean requests in flight.

    The last bucket ends at the last request's end, so its rates are over its real (shorter) width.
    """
    ends = [r.end for r in results if math.isfinite(r.end)]
    if not ends:
        return {"t": [], "width": [], "output_tokens_per_s": [], "completed_per_s": [], "in_flight": []}
    t_end = max(ends)
    n = int(t_end // bucket_s) + 1
    tokens, done, busy = [0.0] * n, [0.0] * n, [0.0] * n
    for r in results:
        for t, k in zip(r.chunk_times, r.chunk_tokens):
            tokens[min(int(t // bucket_s), n - 1)] += k
        if not math.isfinite(r.end):
            continue
        if r.ok:
            done[min(int(r.end // bucket_s), n - 1)] += 1
        for b in range(int(r.start // bucket_s), min(int(r.end // bucket_s), n - 1) + 1):
            busy[b] += max(0.0, min(r.end, (b + 1) * bucket_s) - max(r.start, b * bucket_s))  # overlap, s
    widths = [bucket_s] * (n - 1) + [max(t_end - (n - 1) * bucket_s, 1e-9)]
    return {
        "t": [b * bucket_s for b in range(n)],
        "width": widths,
        "output_tokens_per_s": [x / w for x, w in zip(tokens, widths)],
        "completed_per_s": [x / w for x, w in zip(done, widths)],
        "in_flight": [x / w for x, w in zip(busy, widths)],
    }


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at any instant (an end at the same time as a start counts first)."""
    events = sorted([(r.start, 1) for r in results] + [(r.end, -1) for r in results if math.isfinite(r.end)])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


def summarize(
    results: list[RequestResult],
    duration_s: float,
    *,
    slos: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = PERCENTILES,
) -> dict:
    """The aggregate of one run (successful requests only, but every error counted by kind).

    Returns:
        A flat dict: completed, failed, errors (kind -> count), token totals (server usage where
        sent, and as counted from the stream), throughputs (per second of `duration_s`), goodput,
        and for ttft/tpot/itl/e2el the keys `<stat>_<metric>_ms` (mean, median, std, pXX).
    """
    ok = [r for r in results if r.ok]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.e2e for r in ok],
    }
    out: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_stream_output_tokens": sum(r.stream_tokens for r in ok),
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": total_out / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (total_in + total_out) / duration_s if duration_s > 0 else math.nan,
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in ok)
        out["goodput_slos_ms"] = {k: v * 1e3 for k, v in slos.items()}
        out["good_requests"] = good
        out["request_goodput"] = good / duration_s if duration_s > 0 else math.nan
    for metric, values in series.items():
        for stat, v in describe(values, percentiles).items():
            out[f"{stat}_{metric}_ms"] = v * 1e3
    return out
