"""The PNG of a run: latency distributions and throughput over time (matplotlib, Agg backend).

Top row: histograms of TTFT, ITL and E2E latency with mean / p50 / p99 marked (a long tail past
3x p99 is folded into the last bin and counted in the panel). Bottom: the CDFs of all four
latencies on a log axis, and per-second output tokens/s with requests in flight and completed
requests/s (the last, partial second is drawn at its real width). Must not: compute statistics
beyond what it draws (they come from the result dict).
Tests: tests/loadtest/test_bench.py (the file is written and not blank).
"""

from __future__ import annotations

import math
from pathlib import Path

COLORS = {"ttft": "#1f77b4", "tpot": "#9467bd", "itl": "#2ca02c", "e2el": "#d62728"}
LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _finite_ms(values: list) -> list[float]:
    return [v * 1e3 for v in values if v is not None and math.isfinite(v)]


def _hist(ax, values_ms: list[float], key: str, result: dict) -> None:  # noqa: ANN001  # matplotlib Axes
    import numpy as np

    title = f"{LABELS[key]} distribution"
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel(f"{LABELS[key]} (ms)")
    ax.set_ylabel("count" if key != "itl" else "count (token gaps)")
    if not values_ms:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    p99 = result.get(f"p99_{key}_ms") or max(values_ms)
    upper = max(values_ms)
    folded = 0
    if upper > 3 * p99 > 0:
        upper = 3 * p99
        folded = sum(v > upper for v in values_ms)
    low = min(values_ms)
    data = np.clip(values_ms, None, upper)
    ax.hist(
        data,
        bins=np.linspace(min(low, 0.0) if low < 0.05 * upper else 0.9 * low, upper, 50),
        color=COLORS[key],
        alpha=0.75,
        edgecolor="white",
        linewidth=0.4,
    )
    for stat, style in (("mean", "-"), ("median", "--"), ("p99", ":")):
        v = result.get(f"{stat}_{key}_ms")
        if v is not None and math.isfinite(v):
            name = "p50" if stat == "median" else stat
            ax.axvline(v, color="black", linestyle=style, linewidth=1.2, label=f"{name} {v:.1f} ms")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    if folded:
        ax.text(
            0.98,
            0.55,
            f"{folded} values > {upper:.0f} ms\nin the last bin",
            ha="right",
            va="top",
            transform=ax.transAxes,
            fontsize=8,
            color="dimgrey",
        )
    ax.grid(axis="y", alpha=0.3)


def _cdf(ax, series: dict[str, list[float]]) -> None:  # noqa: ANN001
    import numpy as np

    ax.set_title("Latency CDFs", fontsize=11, fontweight="bold")
    drawn = False
    for key, vals in series.items():
        if not vals:
            continue
        xs = np.sort(np.asarray(vals))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.step(xs, ys, where="post", color=COLORS[key], linewidth=1.6, label=f"{LABELS[key]} (n={len(xs)})")
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="upper left")
    for q in (0.5, 0.9, 0.99):
        ax.axhline(q, color="grey", linewidth=0.6, linestyle=":")
        ax.text(1.0, q, f" p{q * 100:g}", transform=ax.get_yaxis_transform(), fontsize=7, va="center", color="grey")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")


def _throughput(ax, tl: dict, last_send: float | None) -> None:  # noqa: ANN001
    ax.set_title("Throughput over time (1 s buckets)", fontsize=11, fontweight="bold")
    ax.set_xlabel("time since benchmark start (s)")
    ax.set_ylabel("output tokens / s", color="#ff7f0e")
    t = tl.get("t") or []
    if not t:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    widths = tl.get("width") or [1.0] * len(t)
    bars = ax.bar(
        t,
        tl["output_tokens_per_s"],
        width=[0.92 * w for w in widths],
        align="edge",
        color="#ff7f0e",
        alpha=0.6,
        label="output tokens/s",
    )
    ax.tick_params(axis="y", labelcolor="#ff7f0e")
    ax.grid(axis="y", alpha=0.3)
    right = ax.twinx()
    mid = [x + w / 2 for x, w in zip(t, widths)]
    (flight,) = right.plot(
        mid, tl["in_flight"], color="#1f77b4", marker=".", linewidth=1.5, label="requests in flight (mean)"
    )
    (done,) = right.plot(
        mid,
        tl["completed_per_s"],
        color="#2ca02c",
        linestyle="--",
        marker=".",
        linewidth=1.2,
        label="completed requests/s",
    )
    right.set_ylabel("requests")
    right.set_ylim(bottom=0)
    handles = [bars, flight, done]
    if last_send is not None:
        handles.append(
            ax.axvline(
                last_send, color="dimgrey", linestyle=":", linewidth=1.2, label=f"last request sent ({last_send:.1f} s)"
            )
        )
    ax.legend(handles=handles, fontsize=8, loc="upper left", framealpha=0.9)
    ax.set_xlim(0, t[-1] + widths[-1])


def write_plot(result: dict, path: str | Path, *, title: str) -> None:
    """Draw the run's figure to `path` (PNG).

    Args:
        result: report.build_result's dict (per-request arrays and the timeline).
        title: first line of the figure title (e.g. the server and the load).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    itls = [g for per in result["itls"] for g in per]
    series = {
        "ttft": _finite_ms(result["ttfts"]),
        "tpot": _finite_ms(result["tpots"]),
        "itl": _finite_ms(itls),
        "e2el": _finite_ms(result["e2els"]),
    }
    fig = plt.figure(figsize=(16, 9.5), constrained_layout=True)
    grid = fig.add_gridspec(2, 3)
    for col, key in enumerate(("ttft", "itl", "e2el")):
        _hist(fig.add_subplot(grid[0, col]), series[key], key, result)
    _cdf(fig.add_subplot(grid[1, 0]), series)
    _throughput(fig.add_subplot(grid[1, 1:]), result["timeline"], max(result["start_times"], default=None))
    sub = (
        f"{result['completed']} requests ok, {result['failed']} failed in {result['duration']:.1f} s  |  "
        f"{result['request_throughput']:.2f} req/s, {result['output_throughput']:.0f} output tok/s  |  "
        f"mean TTFT {result['mean_ttft_ms']:.1f} ms, mean ITL {result['mean_itl_ms']:.1f} ms"
    )
    fig.suptitle(f"{title}\n{sub}", fontsize=12)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
