"""Prefix-cache load testing, the pure parts: the shared-prefix order, hit rate, landing, balance, turn report.

The multi-turn replay against a real app is in tests/replicas/test_engine_router.py (slow)."""

from __future__ import annotations

import json
import math

from loadtest import datasets as ds
from loadtest.http_client import _on_event
from loadtest.metrics import RequestResult
from loadtest.multiturn import TurnRecord, conversations, turn_report
from loadtest.prefix_stats import balance, inflight_balance, landing, token_hit_rate


def test_shared_prefix_group_firsts_lead_then_shuffled() -> None:
    reqs = ds.shared_prefix_requests(
        128, groups=8, prefix_len=2048, input_len=128, output_len=32, seed=0, group_firsts_first=True
    )
    assert [r.group for r in reqs[:8]] == list(range(8))
    assert all(r.prompt_len == 2176 == len(r.prompt) and isinstance(r.prompt, tuple) for r in reqs)
    prefix = {r.group: r.prompt[:2048] for r in reqs[:8]}
    assert len(set(prefix.values())) == 8
    assert all(r.prompt[:2048] == prefix[r.group] for r in reqs)  # the group field names the prefix
    rest = [r.group for r in reqs[8:]]
    assert sorted(rest) == sorted(list(range(8)) * 15)
    assert rest != sorted(rest)  # shuffled
    plain = ds.shared_prefix_requests(128, groups=8, prefix_len=2048, input_len=128, output_len=32, seed=0)
    assert sorted(r.prompt for r in plain) == sorted(r.prompt for r in reqs)  # same prompts, other order


def _result(prompt: int, cached: int | None, engine: str = "", group: int | None = None) -> RequestResult:
    r = RequestResult(prompt, 4, start=0.0, end=1.0, usage_prompt_tokens=prompt, engine=engine, group=group)
    r.usage_cached_tokens = cached
    return r


def test_usage_cached_tokens_parsed() -> None:
    r = RequestResult(100, 4, start=0.0)
    usage = {"prompt_tokens": 100, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 64}}
    assert not _on_event(json.dumps({"choices": [], "usage": usage}).encode(), r, 1.0)
    assert (r.usage_prompt_tokens, r.usage_cached_tokens) == (100, 64)
    r2 = RequestResult(100, 4, start=0.0)
    _on_event(json.dumps({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 4}}).encode(), r2, 1.0)
    assert r2.usage_cached_tokens is None  # a server without the field


def test_hit_rate_landing_and_balance() -> None:
    res = [_result(2176, 0, "a", 0), _result(2176, 2048, "a", 0), _result(2176, 2048, "b", 0), _result(2176, None)]
    failed = _result(2176, 2048, "a", 1)
    failed.error = "timeout"
    hr = token_hit_rate([*res, failed])
    assert hr["cached_tokens"] == 4096 and hr["prompt_tokens"] == 4 * 2176
    assert math.isclose(hr["token_hit_rate"], 4096 / (4 * 2176)) and hr["requests_reporting_cached_tokens"] == 3
    land = landing([*res, failed])
    assert land["groups"] == {0: {"engines": {"a": 2, "b": 1}, "top_share": 2 / 3}}
    assert land["min_top_share"] == 2 / 3 and land["engines_named"]
    b = balance([{"a": 6, "b": 2}, {"a": 0, "b": 0}, {"a": 3, "b": 5}])
    assert b["busy_samples"] == 2 and b["max_over_mean_max"] == 1.5
    assert math.isclose(b["max_over_mean_mean"], (1.5 + 5 / 4) / 2)
    assert math.isclose(b["max_over_mean_of_averages"], 9 / 8)
    tail = balance([{"a": 4, "b": 4}, {"a": 5, "b": 3}, {"a": 1, "b": 0}])
    assert tail["max_over_mean_max"] == 2.0 and tail["max_over_mean_max_at_full_load"] == 5 / 4


def test_turn_report_floor_is_previous_header_rounded_down() -> None:
    recs = [
        TurnRecord(0, 1, header_start=330, prompt_tokens=335, cached_tokens=0),
        TurnRecord(0, 2, header_start=420, prompt_tokens=425, cached_tokens=320),  # floor 320: reached
        TurnRecord(0, 3, header_start=530, prompt_tokens=535, cached_tokens=383),  # floor 384: missed
        TurnRecord(1, 1, header_start=100, prompt_tokens=105, cached_tokens=0),
        TurnRecord(1, 2, header_start=200, prompt_tokens=205, cached_tokens=None),  # floor 64, none reported
    ]
    rows = {r["turn"]: r for r in turn_report(recs)}
    assert rows[1]["reached_floor"] == "-" and math.isnan(rows[1]["mean_floor"])
    assert rows[2]["reached_floor"] == "1/2" and rows[2]["mean_floor"] == (320 + 64) / 2
    assert rows[3]["reached_floor"] == "0/1" and rows[3]["mean_cached_tokens"] == 383


def test_conversations_are_seeded() -> None:
    a = conversations(3, turns=6, seed=1)
    assert a == conversations(3, turns=6, seed=1) and a != conversations(3, turns=6, seed=2)
    assert all(len(c.users) == 6 for c in a) and len({c.system for c in a}) == 3


def test_inflight_balance_rebuilds_each_replica_at_one_instant() -> None:
    """Two group-firsts, then a steady phase from t=2 to t=5 (the last send) and a drain tail; counts by hand."""

    def r(start: float, end: float, engine: str) -> RequestResult:
        return RequestResult(prompt_len=1, output_len=1, start=start, end=end, engine=engine)

    res = [
        r(0.0, 1.5, "A"),  # group firsts
        r(0.0, 1.0, "B"),
        r(2.0, 9.0, "A"),  # steady: A holds 3 from t=4, B holds 1 from t=2 to 4.5, then 1 again from t=5
        r(3.0, 8.0, "A"),
        r(4.0, 6.0, "A"),
        r(2.0, 4.5, "B"),
        r(5.0, 5.5, "B"),
        r(4.8, 4.9, "C"),  # failed: sent, so a send of the phase, but in flight nowhere
    ]
    res[-1].error = "timeout"
    out = inflight_balance(res, group_firsts=2, period_s=1.0)
    steady, tail = out["steady"], out["tail"]
    assert (steady["from_s"], steady["to_s"]) == (2.0, 5.0)
    # ticks 2, 3, 4, 5: A/B = 1/1, 2/1, 3/1, 3/1 -> 1.0, 1.333, 1.5, 1.5
    assert steady["samples"] == 4
    assert math.isclose(steady["worst_sample"], 1.5) and steady["samples_above_1_5"] == 0
    assert math.isclose(steady["mean_sample"], (1 + 4 / 3 + 1.5 + 1.5) / 4)
    # at t=4.5 B's request ends: 3 vs 0 -> 2.0, an instant no 1-second sample hit
    assert math.isclose(steady["worst_instant"], 2.0)
    # the tail (5 .. 9): at 6, 8 and 9 A alone holds requests -> 2.0
    assert math.isclose(tail["worst_sample"], 2.0)
