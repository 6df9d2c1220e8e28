"""Serving metrics: per-process registries, a cluster-wide hub, and Prometheus text from prometheus_client.

Each engine and ingress replica keeps a `MetricsRegistry` and pushes a snapshot to the app's
`MetricsHub` actor about once a second (`push_forever`); `/metrics` on the ingress is the hub's
exposition of the sum over every replica that ever reported: counters and histograms of departed
replicas keep counting (their last snapshot stays), gauges count live replicas only (a retired
replica's or a silent one's are dropped), so the numbers are cluster totals, not one replica's.

Names are vLLM's with our prefix (`vllm:time_to_first_token_seconds` -> `epserve:time_to_first_token_seconds`);
README.md "Metrics" lists them. The text is prometheus_client's exposition (`generate_latest`) of a custom
collector over a snapshot, each process with its own explicit `CollectorRegistry` (never the global one).
NOTE: the hot path (one `inc` and one `observe` per generated token) writes plain dicts, not
prometheus_client's instruments, which take a lock per call and scan buckets linearly (about 3x the cost
measured here); the engine also reads and sets `counters` directly.
Tests: tests/replicas/test_metrics.py (registry, hub, exposition), tests/replicas/test_serving.py (/metrics).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("ray.serve.epserve.metrics")

PREFIX = "epserve:"
# vLLM's buckets for the metrics it has (same bounds, so dashboards and SLO queries carry over)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# ours (engine step time and anything without its own bounds): 1 ms .. 160 s
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
BUCKETS: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "inter_token_latency_seconds": ITL_BUCKETS,
    "e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
}
GAUGE_STALE_S = 15.0  # a replica silent this long counts as gone for gauges (it pushes every second)

HELP = {
    "time_to_first_token_seconds": "Histogram of time from arrival to the first generated token in seconds.",
    "inter_token_latency_seconds": "Histogram of time between consecutive generated tokens of a sequence in seconds.",
    "e2e_request_latency_seconds": "Histogram of time from arrival to the end of a request in seconds.",
    "request_queue_time_seconds": "Histogram of time a request waited before its first scheduling in seconds.",
    "step_time_seconds": "Histogram of engine step time (one batch through the expert-parallel group) in seconds.",
    "num_requests_running": "Number of sequences with caches assigned.",
    "num_requests_waiting": "Number of sequences waiting for admission.",
    "kv_cache_usage_perc": "KV-cache usage over all engine replicas. 1 means 100 percent usage.",
    "state_slot_usage_perc": "DeltaNet state slot usage over all engine replicas. 1 means 100 percent usage.",
    "prompt_tokens": "Number of prompt tokens of finished requests.",
    "generation_tokens": "Number of generated tokens.",
    "request_success": "Count of finished requests by finish reason.",
    "request_errors": "Count of requests that ended in an error, by kind.",
    "requests_aborted": "Count of requests aborted before they finished (client gone, deadline, shutdown).",
    "num_preemptions": "Cumulative number of preemptions for lack of cache.",
    "expert_load_imbalance": "Max over mean tokens per expert rank, mean over MoE layers and replicas (1 = balanced).",
    "expert_rank_tokens_per_step": "Routed rows an expert rank receives per step (moving window), by replica and rank.",
    "expert_layer_imbalance": "Max over mean rows per expert rank in one MoE layer (moving window), by replica, layer.",
    "expert_rebalances": "Count of automatic expert rebalances (AppArgs triggers), by result (ok, failed).",
    "expert_padding_rows_per_step": "Empty capacity slots sent to expert ranks per step (moving window), by replica.",
    "spec_decode_num_draft_tokens": "Number of draft tokens proposed by MTP.",
    "spec_decode_num_accepted_tokens": "Number of draft tokens accepted.",
    "http_requests": "Count of HTTP requests by route and status code.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "prefix_cache_states_stored": "Count of DeltaNet states saved into the prefix cache.",
    "prefix_cache_states_evicted": "Count of DeltaNet states evicted from the prefix cache.",
    "prefix_cache_states": "DeltaNet states held by the prefix cache.",
    "prefix_cache_blocks": "KV-cache blocks held by the prefix cache.",
    # one replica's parts of the cluster figures above (its own exposition shows them; the hub's combines them)
    "kv_blocks_used": "KV-cache blocks in use on this replica.",
    "kv_blocks_total": "KV-cache blocks of this replica.",
    "state_slots_used": "DeltaNet state slots in use on this replica.",
    "state_slots_total": "DeltaNet state slots of this replica.",
    "expert_load_imbalance_sum": "This replica's expert-load imbalance (the hub averages it over replicas).",
    "expert_load_imbalance_count": "1 on a replica that reports expert-load imbalance.",
}

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]

# Engine.stats() keys of the prefix cache -> metrics here: cumulative counts (exported as counters) and levels (gauges)
PREFIX_CACHE_COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prefix_cache_states_stored",
    "prefix_cache_states_evicted",
)
PREFIX_CACHE_GAUGES = ("prefix_cache_states", "prefix_cache_blocks")


@dataclass
class Histogram:
    """Per-bucket counts (`counts[i]` for `buckets[i-1] < v <= buckets[i]`, the last one for +Inf)."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # bisect_left: a value on a bound is `le` it
        self.total += value
        self.n += 1

    def observe_many(self, value: float, k: int) -> None:
        """`observe(value)` k times (the engine's tokens of one step share one clock reading)."""
        self.counts[bisect.bisect_left(self.buckets, value)] += k
        self.total += value * k
        self.n += k

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, +Inf last: Prometheus' `_bucket` samples."""
        out, acc = [], 0
        for bound, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            out.append((bound, acc))
        return out

    def merge(self, other: Histogram) -> None:
        if other.buckets == self.buckets:
            self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        else:  # replicas of different versions: count each at its largest bound <= ours (a lower bound)
            bounds = tuple(sorted(set(self.buckets) | set(other.buckets)))
            mine, theirs = self.cumulative(), other.cumulative()
            cum = [_cum_at(mine, b) + _cum_at(theirs, b) for b in bounds] + [self.n + other.n]
            self.buckets = bounds
            self.counts = [c - p for c, p in zip(cum, [0, *cum[:-1]])]
        self.total += other.total
        self.n += other.n


def _cum_at(cumulative: list[tuple[float, int]], bound: float) -> int:
    i = bisect.bisect_right([b for b, _ in cumulative], bound)
    return cumulative[i - 1][1] if i else 0


@dataclass
class Snapshot:
    """A replica's metrics at one moment (picklable; what replicas push and the hub sums)."""

    counters: dict[Key, float]
    gauges: dict[Key, float]
    histograms: dict[Key, Histogram]
    time: float


def _key(name: str, labels: dict[str, str]) -> Key:
    return (name, tuple(sorted((k, str(v)) for k, v in labels.items())) if labels else ())


class MetricsRegistry:
    """One process's metrics; cheap to update on the hot path.

    `counters` is a plain dict keyed by (name, sorted label pairs): the engine sets a cumulative
    count into it directly. A count that drops (the thing counting restarted) is carried on, so the
    exported counter never goes down.
    """

    def __init__(self) -> None:
        self.counters: dict[Key, float] = {}
        self.gauges: dict[Key, float] = {}
        self.histograms: dict[Key, Histogram] = {}
        self._reset_offset: dict[Key, float] = {}
        self._last_raw: dict[Key, float] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshot))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value < 0:
            raise ValueError(f"counter {name} can only increase, got inc({value})")
        key = _key(name, labels)
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[_key(name, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.histogram(name, **labels).observe(value)

    def histogram(self, name: str, **labels: str) -> Histogram:
        """The histogram itself, for a hot path that observes it once per token (no key lookup per value)."""
        key = _key(name, labels)
        hist = self.histograms.get(key)
        if hist is None:
            hist = self.histograms[key] = Histogram(BUCKETS.get(name, LATENCY_BUCKETS))
        return hist

    def snapshot(self) -> Snapshot:
        counters = {}
        for key, raw in self.counters.items():
            if raw < self._last_raw.get(key, 0.0):
                self._reset_offset[key] = self._reset_offset.get(key, 0.0) + self._last_raw[key]
            self._last_raw[key] = raw
            counters[key] = raw + self._reset_offset.get(key, 0.0)
        return Snapshot(
            counters=counters,
            gauges=dict(self.gauges),
            histograms={k: Histogram(h.buckets, list(h.counts), h.total, h.n) for k, h in self.histograms.items()},
            time=time.time(),
        )

    def exposition(self) -> str:
        """This process's metrics as Prometheus text (what a replica would serve alone)."""
        return generate_latest(self.registry).decode()


def record_prefix_cache(registry: MetricsRegistry, stats: dict[str, Any]) -> None:
    """Copy the prefix cache's figures (`Engine.prefix_cache_stats()`, also in `Engine.stats()`) into `registry`:
    its cumulative counts as counters (set, not added: the registry carries a count that restarts, so the exported
    counter never goes down) and its levels as gauges. A key the engine does not report counts 0."""
    for name in PREFIX_CACHE_COUNTERS:
        registry.counters[(name, ())] = float(stats.get(name, 0))
    for name in PREFIX_CACHE_GAUGES:
        registry.set(name, float(stats.get(name, 0)))


def merge(snapshots: list[Snapshot], *, now: float | None = None, live: set[int] | None = None) -> Snapshot:
    """Sum counters and histograms of all snapshots; gauges of live ones only (`live`: indices into
    `snapshots`; by default those pushed within GAUGE_STALE_S). Usage fractions are recomputed from
    the summed used/total gauges, the expert-load imbalance as the mean over replicas."""
    now = time.time() if now is None else now
    out = Snapshot({}, {}, {}, now)
    for i, snap in enumerate(snapshots):
        for k, v in snap.counters.items():
            out.counters[k] = out.counters.get(k, 0.0) + v
        for k, h in snap.histograms.items():
            if k not in out.histograms:
                out.histograms[k] = Histogram(h.buckets)
            out.histograms[k].merge(h)
        if (i in live) if live is not None else now - snap.time <= GAUGE_STALE_S:
            for k, v in snap.gauges.items():
                out.gauges[k] = out.gauges.get(k, 0.0) + v
    for used, total, perc in (
        ("kv_blocks_used", "kv_blocks_total", "kv_cache_usage_perc"),
        ("state_slots_used", "state_slots_total", "state_slot_usage_perc"),
    ):
        u, t = out.gauges.pop((used, ()), None), out.gauges.pop((total, ()), None)
        if u is not None and t:
            out.gauges[(perc, ())] = u / t
    imbalance = out.gauges.pop(("expert_load_imbalance_sum", ()), None)
    count = out.gauges.pop(("expert_load_imbalance_count", ()), 0.0)
    if imbalance is not None and count:
        out.gauges[("expert_load_imbalance", ())] = imbalance / count
    return out


class SnapshotCollector(Collector):
    """A prometheus_client collector over snapshots from `source`, with `labels` on every sample."""

    def __init__(self, source: Callable[[], Snapshot], labels: dict[str, str] | None = None) -> None:
        self.source = source
        self.labels = labels or {}

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        yield from _families(snap.counters, CounterMetricFamily, self.labels)
        yield from _families(snap.gauges, GaugeMetricFamily, self.labels)
        for name, series in _by_name(snap.histograms).items():
            names = _label_names(self.labels, series)
            fam = HistogramMetricFamily(PREFIX + name, HELP.get(name, name), labels=names)
            for labels, h in series:
                buckets = [(floatToGoString(b), float(c)) for b, c in h.cumulative()]
                fam.add_metric(_label_values(names, self.labels, labels), buckets, sum_value=h.total)
            yield fam


def _by_name(values: dict[Key, Any]) -> dict[str, list[tuple[Labels, Any]]]:
    out: dict[str, list[tuple[Labels, Any]]] = {}
    for (name, labels), v in sorted(values.items(), key=lambda kv: kv[0]):
        out.setdefault(name, []).append((labels, v))
    return out


def _label_names(base: dict[str, str], series: list[tuple[Labels, Any]]) -> list[str]:
    own = sorted({k for labels, _ in series for k, _ in labels} - set(base))
    return [*base, *own]


def _label_values(names: list[str], base: dict[str, str], labels: Labels) -> list[str]:
    mine = {**base, **dict(labels)}
    return [mine.get(n, "") for n in names]


def _families(values: dict[Key, float], kind: Any, base: dict[str, str]) -> Iterator[Metric]:  # noqa: ANN401  # a family class
    for name, series in _by_name(values).items():
        names = _label_names(base, series)
        fam = kind(PREFIX + name, HELP.get(name, name), labels=names)
        for labels, v in series:
            fam.add_metric(_label_values(names, base, labels), v)
        yield fam


def exposition(snapshot: Snapshot, *, model_name: str) -> str:
    """Prometheus text exposition of `snapshot`, every sample labelled with `model_name` (as vLLM does)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot, {"model_name": model_name}))
    return generate_latest(registry).decode()


class MetricsHub:
    """Latest snapshot of every replica of one app (a named Ray actor; see replicas/serving/app.py).

    A departed replica's last snapshot stays, so cluster counters never go down; its gauges count
    until it retires (a clean stop) or falls silent for GAUGE_STALE_S.
    """

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.snapshots: dict[str, Snapshot] = {}
        self.retired: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.merged, {"model_name": model_name}))

    def push(self, replica_id: str, snapshot: Snapshot) -> None:
        if replica_id not in self.retired:  # a push racing the retirement would bring its gauges back
            self.snapshots[replica_id] = snapshot

    def retire(self, replica_id: str) -> None:
        """The replica stopped: keep its counters and histograms, drop its gauges now."""
        self.retired.add(replica_id)
        snap = self.snapshots.get(replica_id)
        if snap is not None:
            snap.gauges = {}

    def merged(self) -> Snapshot:
        return merge(list(self.snapshots.values()))

    def departed(self) -> list[str]:
        """Replicas that retired (stopped cleanly): their counts stay in the totals, their gauges do not."""
        return sorted(self.retired)

    def exposition(self) -> str:
        """/metrics: the cluster totals as Prometheus text."""
        return generate_latest(self.registry).decode()

    def counter_by_replica(self, name: str) -> dict[str, float]:
        """One counter's value per reporting replica (to see which replicas served)."""
        return {rid: sum(v for (n, _), v in snap.counters.items() if n == name) for rid, snap in self.snapshots.items()}

    def gauge_by_replica(self, names: list[str]) -> dict[str, float]:
        """The sum of gauges `names` per live replica (e.g. running + waiting: the load balance of the engines)."""
        now = time.time()
        return {
            rid: sum(v for (n, _), v in snap.gauges.items() if n in names)
            for rid, snap in self.snapshots.items()
            if rid not in self.retired and now - snap.time <= GAUGE_STALE_S and any(n in names for n, _ in snap.gauges)
        }


async def push_forever(
    hub: Any,  # noqa: ANN401  # a MetricsHub actor handle
    replica_id: str,
    registry: MetricsRegistry,
    period_s: float,
    before: Callable[[], None] | None = None,
    on_loop: Callable[[], None] | None = None,
) -> None:
    """Push `registry`'s snapshot to `hub` every `period_s` (run as a task; `on_loop` runs first on the event loop,
    for state only the loop may read, e.g. the engine's; then `before` in a thread)."""
    while True:
        await asyncio.sleep(period_s)
        try:
            if on_loop is not None:
                on_loop()
            if before is not None:
                await asyncio.to_thread(before)
            hub.push.remote(replica_id, registry.snapshot())
        except Exception as exc:  # noqa: BLE001  # metrics must never take serving down
            log.warning("metrics push failed: %s", exc)


def retire_from_hub(hub: Any, replica_id: str, registry: MetricsRegistry) -> None:  # noqa: ANN401  # actor handle
    """A stopping replica's last push, then its retirement (its gauges leave the totals at once)."""
    try:
        hub.push.remote(replica_id, registry.snapshot())
        hub.retire.remote(replica_id)  # calls from one caller run in order: after the push
    except Exception as exc:  # noqa: BLE001  # a hub gone with the cluster: nothing to report to
        log.warning("metrics retirement failed: %s", exc)
