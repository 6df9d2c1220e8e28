"""The results of a run: the summary table (laid out like `vllm bench serve`) and the JSON file.

JSON keys follow vLLM's result file (completed, total_input_tokens, request_throughput,
mean_ttft_ms, p99_itl_ms, input_lens, output_lens, ttfts, itls, ...) so tools that read those
read ours; we add errors by kind, the stream-counted token total, the send lateness, the
per-second timeline and the run's configuration. Must not: measure. Tests: tests/loadtest/test_bench.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loadtest.metrics import PERCENTILES, RequestResult, describe, peak_concurrency, summarize, timeline
from loadtest.prefix_stats import landing, token_hit_rate
from loadtest.runner import RunOutcome

WIDTH = 50
METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def build_result(
    outcome: RunOutcome,
    *,
    config: dict,
    slos: dict[str, float] | None = None,
    percentiles: tuple[float, ...] = PERCENTILES,
) -> dict:
    """Everything a run produced, JSON-ready (nan becomes null when written)."""
    res = outcome.results
    out = {"config": config, **summarize(res, outcome.duration_s, slos=slos, percentiles=percentiles)}
    starts = [r.start for r in res]
    out["achieved_send_rate"] = (
        (len(starts) - 1) / (max(starts) - min(starts)) if len(starts) > 1 and max(starts) > min(starts) else math.nan
    )
    for stat, v in describe(outcome.send_lag_s, percentiles).items():
        out[f"{stat}_send_lag_ms"] = v * 1e3
    tl = timeline(res)
    out["peak_output_throughput"] = max(tl["output_tokens_per_s"], default=math.nan)
    out["peak_concurrent_requests"] = peak_concurrency(res)
    out["warmup"] = {
        "requests": len(outcome.warmup),
        "prompt_tokens": sum(r.prompt_tokens for r in outcome.warmup),
        "completion_tokens": sum(r.output_tokens for r in outcome.warmup),
    }
    out["prefix_cache"] = token_hit_rate(res)
    if any(r.group is not None for r in res):
        out["prefix_cache"]["landing"] = landing(res)
    out["timeline"] = tl
    out.update(_per_request(res))
    return out


def _per_request(res: list[RequestResult]) -> dict:
    return {
        "start_times": [r.start for r in res],
        "input_lens": [r.prompt_tokens for r in res],
        "output_lens": [r.output_tokens if r.ok else 0 for r in res],
        "ttfts": [r.ttft if r.ok else None for r in res],
        "tpots": [r.tpot if r.ok else None for r in res],
        "e2els": [r.e2e if r.ok else None for r in res],
        "itls": [r.itl if r.ok else [] for r in res],
        "request_errors": [None if r.ok else f"{r.error}: {r.error_detail}".rstrip(": ") for r in res],
    }


def _clean(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_json(result: dict, path: str | Path) -> None:
    """Write the result (nan and inf as null, so any JSON reader takes it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_clean(result), indent=1) + "\n")


def _row(label: str, value: object, fmt: str = "") -> str:
    if isinstance(value, float):
        value = "n/a" if math.isnan(value) else format(value, fmt or ".2f")
    return f"{label:<40} {value:<10}"


def summary_table(result: dict, percentiles: tuple[float, ...] = PERCENTILES) -> str:
    """The text table printed at the end of `epserve bench`."""
    c = result["config"]
    rate = c.get("request_rate", math.inf)
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="="),
        _row("Successful requests:", result["completed"]),
        _row("Failed requests:", result["failed"]),
    ]
    for kind, n in sorted(result["errors"].items()):
        lines.append(_row(f"  {kind}:", n))
    if c.get("max_concurrency"):
        lines.append(_row("Maximum request concurrency:", c["max_concurrency"]))
    lines += [
        _row("Request rate configured (RPS):", "inf" if math.isinf(rate) else float(rate)),
        _row("Request rate achieved (RPS, sends):", result["achieved_send_rate"]),
        _row("Benchmark duration (s):", result["duration"]),
        _row("Total input tokens:", result["total_input_tokens"]),
        _row("Total generated tokens:", result["total_output_tokens"]),
        _row("Request throughput (req/s):", result["request_throughput"]),
    ]
    if "request_goodput" in result:
        slo = " ".join(f"{k}<={v:g}ms" for k, v in result["goodput_slos_ms"].items())
        lines.append(_row("Request goodput (req/s):", result["request_goodput"]))
        lines.append(_row(f"  ({slo})", f"{result['good_requests']} good"))
    lines += [
        _row("Output token throughput (tok/s):", result["output_throughput"]),
        _row("Peak output token throughput (tok/s):", float(result["peak_output_throughput"])),
        _row("Peak concurrent requests:", result["peak_concurrent_requests"]),
        _row("Total token throughput (tok/s):", result["total_token_throughput"]),
    ]
    pc = result.get("prefix_cache")
    if pc:
        lines.append(_row("Prefix cache token hit rate:", float(pc["token_hit_rate"]), ".3f"))
        if "landing" in pc:
            lines.append(_row("Min share of a group on one engine:", float(pc["landing"]["min_top_share"]), ".3f"))
    for key, (title, short) in METRIC_TITLES.items():
        lines.append("{s:{c}^{n}}".format(s=title, n=WIDTH, c="-"))
        lines.append(_row(f"Mean {short} (ms):", result[f"mean_{key}_ms"]))
        lines.append(_row(f"Median {short} (ms):", result[f"median_{key}_ms"]))
        for q in percentiles:
            if q != 50:
                lines.append(_row(f"P{q:g} {short} (ms):", result[f"p{q:g}_{key}_ms"]))
    lines.append("=" * WIDTH)
    return "\n".join(lines)
