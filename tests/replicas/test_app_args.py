"""`AppArgs`: the one model that validates every way of configuring the Serve app.

Known answers: a typo is an error naming the field, contradictory layouts and key settings are
refused, defaults that depend on other fields resolve as documented. (YAML and KubeRay configs go
through the same model: tests/k8s/test_manifests.py.)
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from replicas.serving.app_args import CPU_COLLECTIVE_DEADLINE_S, GPU_COLLECTIVE_DEADLINE_S, AppArgs, AutoscalingArgs


def test_unknown_field_is_an_error_naming_it() -> None:
    with pytest.raises(ValidationError, match="trunk_rank"):
        AppArgs.model_validate({"trunk_rank": 2})
    with pytest.raises(ValidationError, match="max_replica\\b"):
        AppArgs.model_validate({"engine_autoscaling": {"max_replica": 2}})


def test_several_trunk_ranks_need_expert_ranks() -> None:
    with pytest.raises(ValidationError, match="expert_ranks 0"):
        AppArgs(trunk_ranks=2, expert_ranks=0)
    assert AppArgs(trunk_ranks=2, expert_ranks=1).trunk_ranks == 2


def test_autoscaling_bounds() -> None:
    with pytest.raises(ValidationError, match=r"max_replicas \(1\) < min_replicas \(2\)"):
        AutoscalingArgs(min_replicas=2, max_replicas=1)
    cfg = AutoscalingArgs(min_replicas=2, max_replicas=3).serve_config()
    assert (cfg["min_replicas"], cfg["initial_replicas"], cfg["max_replicas"]) == (2, 2, 3)


def test_collective_deadline_defaults_by_device() -> None:
    assert AppArgs().collective_deadline_s == CPU_COLLECTIVE_DEADLINE_S == 5.0
    assert AppArgs(gpus=True).collective_deadline_s == GPU_COLLECTIVE_DEADLINE_S == 30.0
    assert AppArgs(gpus=True, collective_deadline_s=7.5).collective_deadline_s == 7.5


def test_micro_batches_defaults_by_device_and_bounds() -> None:
    assert AppArgs().micro_batches == 1  # CPU ranks: off
    assert AppArgs(gpus=True).micro_batches == 2  # GPUs: ping-pong
    assert AppArgs(gpus=True, micro_batches=1).micro_batches == 1
    with pytest.raises(ValidationError, match="micro_batches"):
        AppArgs(micro_batches=0)


def test_serve_micro_batches_flag_reaches_app_args(capsys: pytest.CaptureFixture) -> None:
    from epserve.cli import main

    assert main(["serve", "--micro-batches", "0"]) == 2  # refused by AppArgs before anything starts
    assert "micro_batches" in capsys.readouterr().err


def test_api_key_direct_or_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="not both"):
        AppArgs(api_key="k", api_key_env="EPSERVE_TEST_KEY")
    assert AppArgs(api_key="k1").resolved_api_key() == "k1"
    assert AppArgs().resolved_api_key() is None
    monkeypatch.setenv("EPSERVE_TEST_KEY", "from-env")
    assert AppArgs(api_key_env="EPSERVE_TEST_KEY").resolved_api_key() == "from-env"
    monkeypatch.setenv("EPSERVE_TEST_KEY", "")
    with pytest.raises(ValueError, match="EPSERVE_TEST_KEY, which is unset or empty"):
        AppArgs(api_key_env="EPSERVE_TEST_KEY").resolved_api_key()
    # the key never shows in the model's repr (logs of the args)
    assert "k1" not in repr(AppArgs(api_key="k1"))


def test_body_limit_in_bytes() -> None:
    assert AppArgs(max_request_body_mb=1.5).max_request_body_bytes() == 1572864


def test_group_nodes_place_ranks_by_traffic_in_node_bundles() -> None:
    """D = 2, X = 2 over 2 nodes: a trunk and an expert on each node (each expert hears one remote trunk, not
    two); the replica's CPU joins node 0's bundle; bundles go on distinct nodes."""
    from replicas.serving.app import _engine_bundles, resource_demand

    a = AppArgs(trunk_ranks=2, expert_ranks=2, gpus=True, group_nodes=2)
    nodes = a.group_rank_nodes()
    assert nodes is not None and sorted((nodes[:2].count(n), nodes[2:].count(n)) for n in (0, 1)) == [(1, 1), (1, 1)]
    layout = _engine_bundles(a)
    assert layout.bundles == ({"GPU": 2.0, "CPU": 3.0}, {"GPU": 2.0, "CPU": 2.0})
    assert layout.strategy == "STRICT_SPREAD"
    assert [layout.bundle_of(r) for r in range(4)] == list(nodes)
    assert resource_demand(a, at_max=False)["GPU"] == 4.0
    assert AppArgs(trunk_ranks=2, expert_ranks=2).group_rank_nodes() is None  # unset: one bundle per rank
    with pytest.raises(ValidationError, match="group_nodes 5 exceeds the group's 4 ranks"):
        AppArgs(trunk_ranks=2, expert_ranks=2, group_nodes=5)
