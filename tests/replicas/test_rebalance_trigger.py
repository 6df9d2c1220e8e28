"""When an engine replica rebalances by itself (replicas/serving/rebalance_trigger.py): known answers by step."""

from __future__ import annotations

import pytest

from replicas.serving.app_args import AppArgs
from replicas.serving.rebalance_trigger import RebalanceTrigger


def test_every_n_steps() -> None:
    t = RebalanceTrigger(interval_steps=10, threshold=None)
    assert t.enabled and not t.wants_check(1000)
    assert t.decide(9) is None
    assert t.decide(10) == "every 10 steps"
    t.fired(12)
    assert t.decide(21) is None and t.decide(22) is not None


def test_threshold_with_checks_spaced_and_a_cooldown() -> None:
    t = RebalanceTrigger(interval_steps=None, threshold=1.2, cooldown_steps=100, check_steps=32)
    assert not t.wants_check(99)  # cooldown from the start: the window must fill first
    assert t.wants_check(100)
    assert t.decide(100, 1.1) is None  # balanced enough
    assert not t.wants_check(120)  # the next check waits check_steps
    assert t.wants_check(132)
    assert t.decide(132, 1.5) == "max/mean 1.500 > 1.2"
    t.fired(132)
    assert not t.wants_check(200) and t.decide(200, 1.5) is None  # inside the cooldown
    assert t.wants_check(232) and t.decide(232, 1.5) is not None


def test_off_by_default_and_bad_values_named() -> None:
    a = AppArgs()
    assert a.rebalance_interval_steps is None and a.rebalance_imbalance_threshold is None
    assert not RebalanceTrigger(interval_steps=None, threshold=None).enabled
    with pytest.raises(ValueError, match="threshold must be > 1.0"):
        RebalanceTrigger(interval_steps=None, threshold=0.9)
    with pytest.raises(ValueError, match="rebalance_imbalance_threshold"):
        AppArgs(expert_ranks=2, rebalance_imbalance_threshold=1.0)
    with pytest.raises(ValueError, match="expert_ranks"):
        AppArgs(rebalance_interval_steps=100)  # no expert ranks: nothing to rebalance
