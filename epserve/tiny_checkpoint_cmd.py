"""`epserve tiny-checkpoint DIR`: write the small random-weight checkpoint in the real layout."""

from __future__ import annotations

import argparse
import time

from model_shards.tiny_checkpoint import write_tiny_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write a small random-weight Qwen3.5-MoE checkpoint (real layout)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument(
        "--expert-layout",
        choices=["fused", "per-expert"],
        default="fused",
        help="fused experts.gate_up_proj (BF16 release) or experts.N.* (FP8 release, HF saves)",
    )
    p.add_argument("--fp8", action="store_true", help="block-quantised e4m3 weights with bf16 scales")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = write_tiny_checkpoint(args.dir, seed=args.seed, expert_layout=args.expert_layout, fp8=args.fp8)
    print(
        f"wrote {out} ({args.expert_layout} experts{', fp8' if args.fp8 else ''}) in {time.perf_counter() - t0:.1f} s"
    )
    return 0
