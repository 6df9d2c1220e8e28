"""The prefix cache's flags and AppArgs fields (epserve/prefix_flags.py, replicas/serving/app_args.py).

Known answers: defaults (on, max_num_seqs state checkpoints, 4 per path, probes every 512 tokens), each flag
landing in its AppArgs field / PrefixCacheConfig knob, and bad values refused with a message naming the flag
(AppArgs: a validation error naming the field; the CLI: one line on stderr and a non-zero exit).
"""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from epserve.cli import UserError, main
from epserve.prefix_flags import add_prefix_cache_flags, prefix_cache_from_args
from replicas.engine.prefix_config import PrefixCacheConfig
from replicas.serving.app_args import AppArgs

pytestmark = pytest.mark.timeout(60)


def test_app_args_defaults_and_fields() -> None:
    a = AppArgs(max_num_seqs=7)
    assert a.prefix_cache_config() == PrefixCacheConfig(enabled=True, states_per_path=4, probe_interval=512)
    assert a.prefix_state_checkpoints() == 7
    b = AppArgs(prefix_state_slots=3, prefix_states_per_path=2, prefix_probe_interval=0)
    assert b.prefix_state_checkpoints() == 3
    assert b.prefix_cache_config() == PrefixCacheConfig(enabled=True, states_per_path=2, probe_interval=0)
    off = AppArgs(prefix_cache=False, prefix_state_slots=3)
    assert off.prefix_state_checkpoints() == 0 and not off.prefix_cache_config().enabled


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("prefix_probe_interval", 100, "multiple of 64"),
        ("prefix_probe_interval", -64, "prefix_probe_interval"),
        ("prefix_states_per_path", 0, "prefix_states_per_path"),
        ("prefix_state_slots", -1, "prefix_state_slots"),
    ],
)
def test_app_args_refuse_bad_values(field: str, value: int, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        AppArgs.model_validate({field: value})


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_prefix_cache_flags(p)
    return p.parse_args(argv)


def test_flags_to_config_and_checkpoints() -> None:
    config, slots = prefix_cache_from_args(_parse([]), num_slots=5)
    assert config == PrefixCacheConfig() and slots == 5
    argv = ["--prefix-state-slots", "9", "--prefix-states-per-path", "3", "--prefix-probe-interval", "128"]
    config, slots = prefix_cache_from_args(_parse(argv), num_slots=5)
    assert config == PrefixCacheConfig(enabled=True, states_per_path=3, probe_interval=128) and slots == 9
    config, slots = prefix_cache_from_args(_parse(["--no-prefix-cache", *argv]), num_slots=5)
    assert not config.enabled and slots == 0
    for bad, flag in (
        (["--prefix-probe-interval", "65"], "--prefix-probe-interval"),
        (["--prefix-states-per-path", "0"], "--prefix-states-per-path"),
        (["--prefix-state-slots", "-2"], "--prefix-state-slots"),
    ):
        with pytest.raises(UserError, match=flag):
            prefix_cache_from_args(_parse(bad), num_slots=5)


def test_serve_flags_reach_app_args() -> None:
    from epserve.cli import build_parser, parse_args
    from epserve.serve_cmd import load_args

    args = parse_args(build_parser(), ["serve", "--no-prefix-cache", "--prefix-state-slots", "2"])
    a = load_args(args)
    assert a.prefix_cache is False and a.prefix_state_slots == 2
    args = parse_args(build_parser(), ["serve", "--prefix-probe-interval", "1024", "--prefix-states-per-path", "6"])
    a = load_args(args)
    assert a.prefix_cache and a.prefix_probe_interval == 1024 and a.prefix_states_per_path == 6
    with pytest.raises(UserError, match="prefix_probe_interval"):
        load_args(parse_args(build_parser(), ["serve", "--prefix-probe-interval", "100"]))


def test_cli_exits_non_zero_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--prompt-ids", "1,2,3", "--prefix-probe-interval", "100"])
    assert code != 0
    assert "--prefix-probe-interval" in capsys.readouterr().err
    code = main(["serve", "--prefix-states-per-path", "0"])
    assert code != 0
    assert "prefix_states_per_path" in capsys.readouterr().err
