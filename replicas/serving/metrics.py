"""Serving metrics: per-process registries, a cluster-wide hub, and Prometheus text.

Each engine (and ingress) replica keeps a `MetricsRegistry` and pushes a snapshot to the
app's `MetricsHub` actor about once a second; `/metrics` renders the hub's sum over every
replica that ever reported (counters and histograms of removed replicas keep counting;
their gauges are dropped once stale), so it shows cluster-wide totals, not one replica's.
Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `epserve:time_to_first_token_seconds`).
Tests: tests/replicas/test_metrics.py and the serving tests.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field

PREFIX = "epserve:"
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
GAUGE_STALE_S = 15.0

HELP = {
    "time_to_first_token_seconds": "Time from arrival to the first generated token.",
    "inter_token_latency_seconds": "Time between consecutive generated tokens of a sequence.",
    "e2e_request_latency_seconds": "Time from arrival to the end of a request.",
    "request_queue_time_seconds": "Time a request waited before its first scheduling.",
    "num_requests_running": "Sequences with caches assigned.",
    "num_requests_waiting": "Sequences waiting for admission.",
    "kv_cache_usage_perc": "Fraction of KV blocks in use (cluster-wide).",
    "state_slot_usage_perc": "Fraction of DeltaNet state slots in use (cluster-wide).",
    "prompt_tokens": "Prompt tokens of finished requests.",
    "generation_tokens": "Generated tokens.",
    "request_success": "Finished requests by finish reason.",
    "request_errors": "Requests that ended in an error, by kind.",
    "requests_aborted": "Requests aborted before they finished (client gone, deadline, shutdown).",
    "num_preemptions": "Sequences preempted for lack of cache.",
    "expert_load_imbalance": "Max over mean tokens per expert rank, mean over MoE layers (1 = balanced).",
    "spec_decode_num_draft_tokens": "Draft tokens proposed by MTP.",
    "spec_decode_num_accepted_tokens": "Draft tokens accepted.",
    "http_requests": "HTTP requests by route and status code.",
}


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        self.n += other.n


Labels = tuple[tuple[str, str], ...]


@dataclass
class Snapshot:
    """A replica's metrics at one moment (picklable)."""

    counters: dict[tuple[str, Labels], float]
    gauges: dict[tuple[str, Labels], float]
    histograms: dict[tuple[str, Labels], Histogram]
    time: float


class MetricsRegistry:
    """One process's metrics; cheap to update on the hot path."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, Labels], float] = {}
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.histograms: dict[tuple[str, Labels], Histogram] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = Histogram()
        hist.observe(value)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            counters=dict(self.counters),
            gauges=dict(self.gauges),
            histograms={k: Histogram(h.buckets, list(h.counts), h.total, h.n) for k, h in self.histograms.items()},
            time=time.time(),
        )


def merge(snapshots: list[Snapshot], *, now: float | None = None) -> Snapshot:
    """Sum counters and histograms of all snapshots; gauges of fresh snapshots only. Usage
    fractions are recomputed from the summed used/total gauges."""
    now = time.time() if now is None else now
    out = Snapshot({}, {}, {}, now)
    for snap in snapshots:
        for k, v in snap.counters.items():
            out.counters[k] = out.counters.get(k, 0.0) + v
        for k, h in snap.histograms.items():
            if k not in out.histograms:
                out.histograms[k] = Histogram(h.buckets)
            out.histograms[k].merge(h)
        if now - snap.time <= GAUGE_STALE_S:
            for k, v in snap.gauges.items():
                out.gauges[k] = out.gauges.get(k, 0.0) + v
    for used, total, perc in (
        ("kv_blocks_used", "kv_blocks_total", "kv_cache_usage_perc"),
        ("state_slots_used", "state_slots_total", "state_slot_usage_perc"),
    ):
        u, t = out.gauges.pop((used, ()), None), out.gauges.pop((total, ()), None)
        if u is not None and t:
            out.gauges[(perc, ())] = u / t
    imbalance = [(k, v) for k, v in out.gauges.items() if k[0] == "expert_load_imbalance_sum"]
    count = out.gauges.pop(("expert_load_imbalance_count", ()), 0.0)
    for k, v in imbalance:
        del out.gauges[k]
        if count:
            out.gauges[("expert_load_imbalance", ())] = v / count
    return out


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def render(snapshot: Snapshot, *, model_name: str) -> str:
    """Prometheus text exposition (version 0.0.4) of a merged snapshot."""
    lines: list[str] = []
    base = (("model_name", model_name),)

    def head(name: str, kind: str) -> None:
        lines.append(f"# HELP {PREFIX}{name} {HELP.get(name, name)}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")

    for name in sorted({k[0] for k in snapshot.counters}):
        head(name, "counter")
        for (n, labels), v in sorted(snapshot.counters.items()):
            if n == name:
                lines.append(f"{PREFIX}{name}_total{_labels(base + labels)} {_num(v)}")
    for name in sorted({k[0] for k in snapshot.gauges}):
        head(name, "gauge")
        for (n, labels), v in sorted(snapshot.gauges.items()):
            if n == name:
                lines.append(f"{PREFIX}{name}{_labels(base + labels)} {_num(v)}")
    for name in sorted({k[0] for k in snapshot.histograms}):
        head(name, "histogram")
        for (n, labels), h in sorted(snapshot.histograms.items(), key=lambda kv: kv[0]):
            if n != name:
                continue
            acc = 0
            for bound, c in zip(list(h.buckets) + [math.inf], h.counts):
                acc += c
                lines.append(f"{PREFIX}{name}_bucket{_labels(base + labels, (('le', _num(bound)),))} {acc}")
            lines.append(f"{PREFIX}{name}_sum{_labels(base + labels)} {_num(h.total)}")
            lines.append(f"{PREFIX}{name}_count{_labels(base + labels)} {h.n}")
    return "\n".join(lines) + "\n"


class MetricsHub:
    """Latest snapshot of every replica of one app (a named Ray actor; see replicas/serving/app.py)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, Snapshot] = {}

    def push(self, replica_id: str, snapshot: Snapshot) -> None:
        self.snapshots[replica_id] = snapshot

    def merged(self) -> Snapshot:
        return merge(list(self.snapshots.values()))

    def counter_by_replica(self, name: str) -> dict[str, float]:
        """One counter's value per reporting replica (to see which replicas served)."""
        return {rid: sum(v for (n, _), v in snap.counters.items() if n == name) for rid, snap in self.snapshots.items()}
