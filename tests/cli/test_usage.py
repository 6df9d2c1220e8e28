"""Bad flags name the command they follow: its own usage and error line, exit status 2.

Oracle: argparse's usage line of each sub-parser ("usage: epserve COMMAND ..."), as the user sees
when passing -h to that command.
"""

from __future__ import annotations

import pytest

from epserve.cli import COMMANDS, main

pytestmark = pytest.mark.timeout(120)

# What each command needs to get past its required arguments (never run: the bad flag stops it first).
REQUIRED = {
    "tiny-checkpoint": ["out"],
    "inspect": ["dir"],
    "generate": ["--model", "m", "--prompt", "hi"],
    "plan": ["--model", "m", "--gpu-memory-gib", "80"],
    "serve": [],
    "bench": ["--base-url", "http://h"],
    "rebalance": ["--address", "h:1"],
    "reset-prefix-cache": [],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_flag_after_a_command_prints_that_commands_usage(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, *REQUIRED[command], "--no-such-flag", "7"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"usage: epserve {command} "), err
    assert f"epserve {command}: error: unrecognized arguments: --no-such-flag 7" in err
    with pytest.raises(SystemExit):
        main([command, "-h"])
    help_usage = capsys.readouterr().out.split("\n\n")[0]
    assert err.split("\n" + f"epserve {command}: error")[0].strip() == help_usage.strip()


def test_unknown_flag_before_the_command_prints_the_top_level_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--no-such-flag", "inspect", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: epserve [-h] COMMAND")
    assert "epserve: error: unrecognized arguments: --no-such-flag" in err
