"""`epserve tiny-checkpoint DIR`: write a random-weight checkpoint in the real layout (the embedded model's
small dims by default; larger dims, or a target size, for GPU benchmarks)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from epserve.cli import UserError
from model_shards.tiny_checkpoint import (
    LARGE,
    CheckpointSizes,
    checkpoint_bytes,
    sizes_for_target,
    write_tiny_checkpoint,
)

SIZE_FLAGS = {  # flag -> CheckpointSizes field
    "--layers": "layers",
    "--hidden-size": "hidden_size",
    "--experts": "num_experts",
    "--moe-intermediate-size": "moe_intermediate_size",
    "--shared-intermediate-size": "shared_expert_intermediate_size",
    "--vocab-size": "vocab_size",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write a random-weight Qwen3.5-MoE checkpoint (real layout)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument(
        "--expert-layout",
        choices=["fused", "per-expert"],
        default="fused",
        help="fused experts.gate_up_proj (BF16 release) or experts.N.* (FP8 release, HF saves)",
    )
    p.add_argument("--fp8", action="store_true", help="block-quantised e4m3 weights with bf16 scales")
    default = CheckpointSizes()
    for flag, field in SIZE_FLAGS.items():
        p.add_argument(flag, type=int, default=None, help=f"default {getattr(default, field)}")
    p.add_argument(
        "--target-gib",
        type=float,
        default=None,
        help="add experts (a multiple of 8) until the weights hold at least this many GiB; dims not given "
        f"default to hidden {LARGE.hidden_size}, expert width {LARGE.moe_intermediate_size}, shared width "
        f"{LARGE.shared_expert_intermediate_size} (--experts is then not allowed)",
    )
    p.set_defaults(run=run)


def sizes_from_args(args: argparse.Namespace) -> CheckpointSizes:
    """The CheckpointSizes the flags ask for (ValueError naming the flag on a bad value)."""
    given = {field: getattr(args, field_attr(flag)) for flag, field in SIZE_FLAGS.items()}
    given = {k: v for k, v in given.items() if v is not None}
    if args.target_gib is None:
        return CheckpointSizes(**given)
    if "num_experts" in given:
        raise ValueError("--experts and --target-gib both set the expert count: give one")
    if args.target_gib <= 0:
        raise ValueError(f"--target-gib must be > 0, got {args.target_gib}")
    return sizes_for_target(args.target_gib, dataclasses.replace(LARGE, **given), fp8=args.fp8)


def field_attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = sizes_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from e  # a bad flag value: exit 2 with the message
    t0 = time.perf_counter()
    out = write_tiny_checkpoint(args.dir, seed=args.seed, expert_layout=args.expert_layout, fp8=args.fp8, sizes=sizes)
    gib = checkpoint_bytes(sizes, fp8=args.fp8) / 2**30
    print(
        f"wrote {out} ({args.expert_layout} experts{', fp8' if args.fp8 else ''}; {sizes.layers} layers, hidden "
        f"{sizes.hidden_size}, {sizes.num_experts} experts; {gib:.2f} GiB) in {time.perf_counter() - t0:.1f} s"
    )
    return 0
