"""The prefix cache's flags, shared by `epserve serve` (into AppArgs' prefix_* fields) and `epserve generate`.

`--no-prefix-cache`, `--prefix-state-slots N`, `--prefix-states-per-path K`, `--prefix-probe-interval T`: the knobs
of replicas/engine/prefix_config.py and the state checkpoints each trunk rank allocates (`CacheSizes`).
Tests: tests/replicas/test_prefix_flags.py.
"""

from __future__ import annotations

import argparse

from epserve.cli import UserError
from replicas.engine.prefix_config import PrefixCacheConfig


def add_prefix_cache_flags(p: argparse.ArgumentParser) -> None:
    """The prefix cache's knobs (AppArgs prefix_*; replicas/engine/prefix_config.py), on `serve` and `generate`."""
    p.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help="prefill every prompt from token 0 (default: reuse cached shared prefixes)",
    )
    p.add_argument(
        "--prefix-state-slots",
        type=int,
        metavar="N",
        help="saved DeltaNet states per trunk rank for the prefix cache (default: max_num_seqs; on GPUs a cap, "
        "carved out of at most a quarter of the KV cache memory)",
    )
    p.add_argument(
        "--prefix-states-per-path",
        type=int,
        metavar="K",
        help="saved states along one path of the prefix tree, at most (default 4)",
    )
    p.add_argument(
        "--prefix-probe-interval",
        type=int,
        metavar="T",
        help="a new prompt path saves provisional states every T tokens (a multiple of 64; 0 = off; default 512)",
    )


def prefix_cache_from_args(args: argparse.Namespace, *, num_slots: int) -> tuple[PrefixCacheConfig, int]:
    """The prefix cache's config and the state checkpoints per trunk rank from the `--prefix-*` flags (defaults as
    AppArgs': on, max_num_seqs states, 4 per path, probes every 512 tokens)."""
    enabled = args.prefix_cache is not False
    slots = num_slots if args.prefix_state_slots is None else args.prefix_state_slots
    if slots < 0:
        raise UserError(f"--prefix-state-slots must be >= 0, got {slots}")
    try:
        config = PrefixCacheConfig(
            enabled=enabled,
            states_per_path=4 if args.prefix_states_per_path is None else args.prefix_states_per_path,
            probe_interval=512 if args.prefix_probe_interval is None else args.prefix_probe_interval,
        )
    except ValueError as exc:
        flag = "--prefix-states-per-path" if "states_per_path" in str(exc) else "--prefix-probe-interval"
        raise UserError(f"{flag}: {exc}") from None
    return config, slots if enabled else 0
