"""Serving metrics (replicas/serving/metrics.py): a replica's registry, the hub's cluster totals, the text.

Oracle: prometheus_client's own parser (`text_string_to_metric_families`, independent of how the text
was made) reads every exposition back; expected values are counted here from the raw observations
(bucket i holds the observations <= its bound), never taken from the code under test. Unit tests,
no Ray: the hub is the same class the app runs as an actor (tests/replicas/test_serving.py reads
/metrics through the real app).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicas.serving.metrics import (
    GAUGE_STALE_S,
    ITL_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    MetricsHub,
    MetricsRegistry,
    merge,
)

pytestmark = pytest.mark.timeout(120)


def parse(text: str) -> dict[str, tuple[str, str, list]]:
    """family name -> (type, help, samples) by the independent parser."""
    return {f.name: (f.type, f.documentation, f.samples) for f in text_string_to_metric_families(text)}


def value(families: dict, sample_name: str, **labels: str) -> float:
    """The one sample of that name whose labels include `labels`."""
    family = sample_name.removeprefix("epserve:")
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        family = family.removesuffix(suffix)
    found = [
        s.value
        for s in families["epserve:" + family][2]
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (sample_name, labels, found)
    return found[0]


def expected_buckets(values: list[float], bounds: tuple[float, ...]) -> dict[str, float]:
    """Cumulative counts by `le` as Prometheus defines them, counted directly."""
    out = {_le(b): float(sum(v <= b for v in values)) for b in bounds}
    out["+Inf"] = float(len(values))
    return out


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def buckets(families: dict, name: str, **labels: str) -> dict[str, float]:
    return {
        s.labels["le"]: s.value
        for s in families["epserve:" + name][2]
        if s.name == f"epserve:{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
    }


TTFT_A = [0.0004, 0.001, 0.03, 0.5, 2.5, 3000.0]  # on a bound counts in it; beyond the last: +Inf only
TTFT_B = [0.002, 0.04, 0.04, 7.0]


def replica(tokens: int, ttfts: list[float], running: int, blocks_used: int, blocks_total: int) -> MetricsRegistry:
    r = MetricsRegistry()
    for _ in range(tokens):
        r.inc("generation_tokens")
    r.inc("prompt_tokens", 17)
    r.inc("request_success", finished_reason="stop")
    r.inc("request_success", 2, finished_reason="length")
    for t in ttfts:
        r.observe("time_to_first_token_seconds", t)
    r.set("num_requests_running", running)
    r.set("kv_blocks_used", blocks_used)
    r.set("kv_blocks_total", blocks_total)
    return r


def test_replica_exposition_types_help_and_values() -> None:
    r = replica(5, TTFT_A, running=3, blocks_used=4, blocks_total=16)
    r.observe("inter_token_latency_seconds", 0.02)
    fams = parse(r.exposition())
    assert fams["epserve:generation_tokens"][0] == "counter"
    assert fams["epserve:num_requests_running"][0] == "gauge"
    assert fams["epserve:time_to_first_token_seconds"][0] == "histogram"
    assert fams["epserve:time_to_first_token_seconds"][1].startswith("Histogram of time from arrival")
    assert value(fams, "epserve:generation_tokens_total") == 5
    assert value(fams, "epserve:prompt_tokens_total") == 17
    assert value(fams, "epserve:request_success_total", finished_reason="length") == 2
    assert value(fams, "epserve:num_requests_running") == 3
    assert buckets(fams, "time_to_first_token_seconds") == expected_buckets(TTFT_A, TTFT_BUCKETS)
    assert value(fams, "epserve:time_to_first_token_seconds_count") == len(TTFT_A)
    assert value(fams, "epserve:time_to_first_token_seconds_sum") == pytest.approx(sum(TTFT_A))
    # vLLM's bounds per metric (inter-token latency starts at 10 ms, TTFT at 1 ms)
    assert set(buckets(fams, "inter_token_latency_seconds")) == set(expected_buckets([], ITL_BUCKETS))


def test_hub_sums_replicas_and_merges_histogram_buckets() -> None:
    hub = MetricsHub("tiny")
    hub.push("a", replica(5, TTFT_A, running=3, blocks_used=4, blocks_total=16).snapshot())
    hub.push("b", replica(7, TTFT_B, running=1, blocks_used=8, blocks_total=16).snapshot())
    fams = parse(hub.exposition())
    assert value(fams, "epserve:generation_tokens_total", model_name="tiny") == 12
    assert value(fams, "epserve:prompt_tokens_total") == 34
    assert value(fams, "epserve:request_success_total", finished_reason="stop") == 2
    assert value(fams, "epserve:request_success_total", finished_reason="length") == 4
    assert value(fams, "epserve:num_requests_running") == 4
    assert value(fams, "epserve:kv_cache_usage_perc") == pytest.approx(12 / 32)  # used over total, not a mean
    assert "epserve:kv_blocks_used" not in fams  # the parts are folded into the fraction
    assert buckets(fams, "time_to_first_token_seconds") == expected_buckets(TTFT_A + TTFT_B, TTFT_BUCKETS)
    assert value(fams, "epserve:time_to_first_token_seconds_count") == len(TTFT_A) + len(TTFT_B)
    assert value(fams, "epserve:time_to_first_token_seconds_sum") == pytest.approx(sum(TTFT_A + TTFT_B))
    for _, _, samples in fams.values():
        assert all(s.labels.get("model_name") == "tiny" for s in samples)


def test_counters_never_go_down_and_gauges_leave_with_their_replica() -> None:
    hub = MetricsHub("tiny")
    a, b, c = (replica(n, [0.1] * n, running=n, blocks_used=n, blocks_total=10) for n in (2, 3, 4))
    for rid, r in (("a", a), ("b", b), ("c", c)):
        hub.push(rid, r.snapshot())
    before = parse(hub.exposition())
    assert value(before, "epserve:generation_tokens_total") == 9
    assert value(before, "epserve:num_requests_running") == 9

    hub.retire("a")  # stopped cleanly
    stale = c.snapshot()
    stale.time -= GAUGE_STALE_S + 1  # c crashed: its last push grows old
    hub.snapshots["c"] = stale
    b.inc("generation_tokens")
    hub.push("b", b.snapshot())
    hub.push("a", a.snapshot())  # a late push from the retired replica brings nothing back
    assert hub.departed() == ["a"]
    after = parse(hub.exposition())
    assert value(after, "epserve:generation_tokens_total") == 10
    assert value(after, "epserve:time_to_first_token_seconds_count") == 9
    assert value(after, "epserve:num_requests_running") == 3  # b's only
    assert value(after, "epserve:kv_cache_usage_perc") == pytest.approx(3 / 10)


def test_a_count_that_restarts_is_carried_on() -> None:
    """The engine sets its preemption count into `counters`; if that count restarts, the counter goes on."""
    r = MetricsRegistry()
    seen = []
    for raw in (3.0, 5.0, 1.0, 2.0):
        r.counters[("num_preemptions", ())] = raw
        seen.append(value(parse(r.exposition()), "epserve:num_preemptions_total"))
    assert seen == [3, 5, 6, 7]
    with pytest.raises(ValueError, match="generation_tokens can only increase"):
        r.inc("generation_tokens", -1)


def test_label_values_are_escaped() -> None:
    hub = MetricsHub('model "q"\\x')
    r = MetricsRegistry()
    odd = 'a "quoted"\\ value\nwith a newline'
    r.inc("request_errors", kind=odd)
    r.observe("e2e_request_latency_seconds", 1.0, kind=odd)
    hub.push("a", r.snapshot())
    fams = parse(hub.exposition())
    assert value(fams, "epserve:request_errors_total", kind=odd, model_name='model "q"\\x') == 1
    assert value(fams, "epserve:e2e_request_latency_seconds_count", kind=odd) == 1


def test_histograms_with_different_bounds_merge_to_a_lower_bound() -> None:
    """Replicas of two versions (different bounds) still add up: each count at its largest bound <= the le."""
    old, new = Histogram((1.0, 10.0)), Histogram((0.5, 1.0, 5.0))
    for v in (0.2, 0.9, 3.0, 20.0):
        old.observe(v)
    for v in (0.4, 0.7, 4.0):
        new.observe(v)
    merged = merge([_snap({("x", ()): old}), _snap({("x", ()): new})], now=time.time()).histograms[("x", ())]
    assert merged.buckets == (0.5, 1.0, 5.0, 10.0)
    # le=0.5: old has no bound <= 0.5 (0), new 1; le=1: 2+2; le=5: old's 1.0 bound (2) + 3; le=10: 3+3; +Inf: 7
    assert merged.cumulative() == [(0.5, 1), (1.0, 4), (5.0, 5), (10.0, 6), (math.inf, 7)]
    assert merged.n == 7 and merged.total == pytest.approx(0.2 + 0.9 + 3.0 + 20.0 + 0.4 + 0.7 + 4.0)


def _snap(histograms: dict) -> object:
    from replicas.serving.metrics import Snapshot

    return Snapshot({}, {}, histograms, time.time())


def test_ingress_counts_http_requests_by_route(embedded_model_dir: Path) -> None:
    """The real FastAPI app of the ingress: answered requests by route and status; unknown paths as one label."""
    from fastapi.testclient import TestClient

    from replicas.api.ingress import Ingress, build_api
    from replicas.serving.app_args import AppArgs

    ing = Ingress(None, AppArgs(model=str(embedded_model_dir), served_model_name="tiny").model_dump())
    with TestClient(build_api(ing)) as client:
        for path in ("/v1/models", "/v1/models", "/no/such/a", "/no/such/b", "/metrics"):
            client.get(path)
    fams = parse(ing.metrics.exposition())
    assert value(fams, "epserve:http_requests_total", route="/v1/models", status="200") == 2
    assert value(fams, "epserve:http_requests_total", route="other", status="404") == 2
    assert value(fams, "epserve:http_requests_total", route="/metrics", status="503") == 1  # no hub here
