"""Entry point of the `epserve` console script: one sub-command per module, flags per design.md.

Each command module exposes `add_parser(subparsers)` and `run(args) -> int`. User errors
(bad checkpoint, bad flag values) print one clear line on stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "tiny-checkpoint": "epserve.tiny_checkpoint_cmd",
    "inspect": "epserve.inspect_cmd",
    "generate": "epserve.generate_cmd",
    "plan": "epserve.plan_cmd",
    "serve": "epserve.serve_cmd",
    "bench": "epserve.bench_cmd",
    "rebalance": "epserve.rebalance_cmd",
    "reset-prefix-cache": "epserve.reset_prefix_cache_cmd",
}


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description="Expert-parallel serving of Qwen3.5-MoE on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # command not built in this version
            raise
        mod.add_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, reporting unknown flags with the usage of the sub-command they follow.

    argparse leaves flags a sub-parser does not know to the top-level parser, whose error shows the
    top-level usage ("epserve [-h] COMMAND ..."); the sub-command's own usage is the useful one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        message = f"unrecognized arguments: {' '.join(extra)}"
        if argv.index(extra[0]) < argv.index(args.command):
            parser.error(message)  # before the command name: a top-level flag
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"epserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        # Config/checkpoint/tokenizer errors carry a message naming the problem.
        print(f"epserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m epserve.cli` runs this file as __main__, a second copy of the module: dispatch to the
    # importable one so its UserError is the one the commands raise.
    from epserve.cli import main as _main

    sys.exit(_main())
