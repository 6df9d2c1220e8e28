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
