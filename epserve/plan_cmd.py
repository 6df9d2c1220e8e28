"""`epserve plan`: will a model fit a GPU cluster as D trunk + X expert ranks, and how many sequences.

A thin shim over cluster/capacity.py (`plan_capacity`, pure arithmetic from config.json, or from
a published model's dimensions by name (model_shards/published_models.py); no weights read, no
Ray, no download): prints the layout, weights per GPU of each pool, cache room, sequences
of --max-model-len that fit, the node of every rank (placed by all-to-all traffic), the bytes
per decode step on every link, the network floor and, with --hbm-tbps, the HBM floor and the
decode floor (their maximum: two micro-batches overlap compute and communication).
Exit 0: it fits. 1: it does not (reason on stderr as `epserve plan: error: ...`) or the model's
config cannot be read. 2: a flag value out of range.
Tests: tests/cluster/test_capacity.py (CLI exit codes and JSON keys via subprocess).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.capacity import (
    DEFAULT_ACTIVATION_RESERVE_GIB,
    DEFAULT_BLOCK_SIZE,
    GIB,
    TRUNK_GROUPS,
    CapacityPlan,
    plan_capacity,
)
from cluster.topology import Topology
from cluster.traffic import DEFAULT_NIC_GBPS, DEFAULT_NVLINK_GBPS, LINK_KINDS, RankTraffic
from epserve.cli import UserError
from model_shards.config import ModelConfig, from_hf_config
from model_shards.published_models import published_config, published_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="capacity plan: D trunk + X expert GPUs, weights per GPU, sequences that fit")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint folder or config.json path (only the config is read), "
        f"or a published model's name: {', '.join(published_names())}",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory per GPU in GiB (e.g. 140 for H200)")
    p.add_argument(
        "--weight-format",
        choices=["bf16", "fp8"],
        help="weights as served (default: fp8 when the config has a quantization_config, else bf16)",
    )
    p.add_argument("--trunk-ranks", type=int, help="trunk ranks D (default: the GPUs the experts leave)")
    p.add_argument(
        "--expert-ranks",
        type=int,
        help="expert ranks X (default: among the splits of all GPUs that fit, the most decode tokens/s: the least "
        "decode floor, or network floor without --hbm-tbps, per token; ties to fewer expert ranks)",
    )
    p.add_argument("--max-model-len", type=int, help="tokens per sequence (default: max_position_embeddings)")
    p.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="R extra expert copies per MoE layer for load balancing (each expert rank holds (E + R) / X slots)",
    )
    p.add_argument("--hbm-tbps", type=float, help="HBM bandwidth per GPU in TB/s for the decode floor (H200: 4.8)")
    p.add_argument(
        "--nic-gbps",
        type=float,
        default=DEFAULT_NIC_GBPS,
        help=f"inter-node bandwidth per GPU, each way, Gb/s (one NIC per GPU; default {DEFAULT_NIC_GBPS:g})",
    )
    p.add_argument(
        "--nvlink-gbps",
        type=float,
        default=DEFAULT_NVLINK_GBPS,
        help="intra-node (NVLink) bandwidth per GPU, each way, Gb/s (default "
        f"{DEFAULT_NVLINK_GBPS:g} = 450 GB/s: NVLink 4 on H100 SXM and H200 SXM)",
    )
    p.add_argument(
        "--decode-batch",
        type=int,
        help="decode tokens per trunk rank for the all-to-all traffic (default: the sequences that fit a trunk GPU)",
    )
    p.add_argument("--output", choices=["text", "json"], default="text")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help=argparse.SUPPRESS)
    p.add_argument(
        "--activation-reserve-gib", type=float, default=DEFAULT_ACTIVATION_RESERVE_GIB, help=argparse.SUPPRESS
    )
    p.set_defaults(run=run)


def _model_config(model: str) -> ModelConfig:
    """A folder or config.json path when one exists, else a published model's name."""
    if Path(model).exists():
        return from_hf_config(model)
    try:
        return published_config(model)
    except KeyError:
        raise UserError(
            f"--model {model}: no such folder or config.json, and not a published model name "
            f"({', '.join(published_names())})"
        ) from None


def run(args: argparse.Namespace) -> int:
    model = args.model
    cfg = _model_config(model)
    weight_format = args.weight_format or ("fp8" if cfg.quant is not None else "bf16")
    max_len = cfg.max_position_embeddings if args.max_model_len is None else args.max_model_len
    try:
        topology = Topology(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib)
        plan = plan_capacity(
            cfg,
            topology,
            weight_format=weight_format,
            trunk_ranks=args.trunk_ranks,
            expert_ranks=args.expert_ranks,
            max_model_len=max_len,
            block_size=args.block_size,
            activation_reserve_gib=args.activation_reserve_gib,
            hbm_tbps=args.hbm_tbps,
            redundant_experts=args.redundant_experts,
            nic_gbps=args.nic_gbps,
            nvlink_gbps=args.nvlink_gbps,
            decode_tokens_per_trunk=args.decode_batch,
        )
    except ValueError as exc:  # out-of-range flags: the message names the value
        raise UserError(str(exc)) from None
    if args.output == "json":
        print(json.dumps({"model": str(model), **plan.to_json()}, indent=2))
    else:
        print(render(plan, model=str(model)))
    if not plan.fits:
        print(f"epserve plan: error: does not fit: {plan.reason}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------ text report
def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _room(n: int, what: str) -> str:
    """'9.75 GiB free' or 'SHORT by 51.02 GiB': a refused layout never prints negative memory."""
    return f"{_gib(n)} {what}" if n >= 0 else f"SHORT by {_gib(-n)}"


def _counts(per_rank: tuple[int, ...]) -> str:
    """'86 x 2, 85 x 4': experts per rank, grouped (the contiguous map puts the larger ones first)."""
    groups: dict[int, int] = {}
    for n in per_rank:
        groups[n] = groups.get(n, 0) + 1
    return ", ".join(f"{n} x {k}" if k > 1 else str(n) for n, k in groups.items())


def render(plan: CapacityPlan, *, model: str) -> str:
    """The human-readable report (one line per fact, assumptions last)."""
    w = plan.weight_bytes
    trunk_parts = ", ".join(f"{g} {w[g] / GIB:.2f}" for g in TRUNK_GROUPS if w[g])
    lines = [
        f"model        {model} ({plan.weight_format})",
        f"cluster      {plan.nodes} node(s) x {plan.gpus_per_node} GPUs x {plan.gpu_memory_gib:g} GiB = "
        f"{plan.total_gpus} GPUs",
        f"layout       D = {plan.trunk_ranks} trunk + X = {plan.expert_ranks} expert ranks = {plan.gpus_used} GPUs "
        f"({plan.layout_rule})",
        f"weights      {_gib(plan.total_weight_bytes)} per model copy; one expert over {plan.num_moe_layers} MoE "
        f"layers {plan.bytes_per_expert / 2**20:.1f} MiB",
    ]
    if plan.expert_ranks:
        lines.append(
            f"experts      {plan.num_experts} per MoE layer"
            + (f" + {plan.redundant_experts} redundant copies" if plan.redundant_experts else "")
            + f"; per expert rank: {_counts(plan.experts_per_rank)}"
        )
        lines.append(
            f"expert GPU   {_gib(plan.expert_gpu_weight_bytes)} weights (fullest rank) + "
            f"{_gib(plan.activation_reserve_bytes)} reserve, {_room(plan.expert_gpu_free_bytes, 'free')}"
        )
    else:
        lines.append(f"experts      all {plan.num_experts} inside the trunk rank (X = 0)")
    lines += [
        f"trunk GPU    {_gib(plan.trunk_gpu_weight_bytes)} weights ({trunk_parts} GiB) + "
        f"{_gib(plan.activation_reserve_bytes)} reserve, {_room(plan.trunk_cache_bytes, 'for KV + state')}",
        f"sequence     {plan.max_model_len} tokens = {_gib(plan.bytes_per_sequence)} "
        f"(KV {plan.kv_bytes_per_token} B/token in blocks of {plan.block_size}, "
        f"state slot {plan.state_bytes_per_slot / 2**20:.1f} MiB)",
        f"capacity     {plan.sequences_per_trunk_gpu} sequences per trunk GPU, {plan.sequences_total} in total",
        f"prefix cache up to {plan.prefix_state_checkpoints} saved states per trunk GPU "
        f"({_gib(plan.prefix_state_bytes)}, carved out of the KV blocks; {plan.sequences_with_prefix_states} "
        "sequences per trunk GPU with all of them kept; --prefix-state-slots caps them, --no-prefix-cache: none)",
    ]
    lines += _network_lines(plan)
    if plan.decode_floor_ms is not None:
        assert plan.decode_floor_with_cache_ms is not None
        lines.append(
            f"HBM floor    {plan.decode_floor_ms:.2f} ms/step at {plan.hbm_tbps:g} TB/s (trunk streams "
            f"{_gib(plan.decode_trunk_stream_bytes)}, fullest expert rank {_gib(plan.decode_expert_stream_bytes)}); "
            f"{plan.decode_floor_with_cache_ms:.2f} ms with every cached sequence read once"
        )
    if plan.decode_floor_overlap_ms is not None:
        assert plan.network_floor_ms is not None and plan.decode_floor_lockstep_ms is not None
        lines.append(
            f"decode floor {plan.decode_floor_overlap_ms:.2f} ms/step = max(HBM {plan.decode_floor_ms:.2f}, network "
            f"{plan.network_floor_ms:.2f}) with m = 2 micro-batches overlapping; lock-step (m = 1) "
            f"{plan.decode_floor_lockstep_ms:.2f} ms"
        )
    lines.append("fits         yes" if plan.fits else f"fits         NO: {plan.reason}")
    lines.append("assumptions")
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else str(a))
            start = b if b is not None else start
    return ", ".join(out)


def _network_lines(plan: CapacityPlan) -> list[str]:
    """Placement by node, MiB per decode step on every link (ranks alike grouped), the network floor."""
    if not plan.rank_nodes:
        return []
    d = plan.trunk_ranks
    nodes = []
    for n in range(max(plan.rank_nodes) + 1):
        trunks = [r for r in range(d) if plan.rank_nodes[r] == n]
        experts = [r - d for r in range(d, len(plan.rank_nodes)) if plan.rank_nodes[r] == n]
        parts = ([f"trunk {_ranges(trunks)}"] if trunks else []) + ([f"expert {_ranges(experts)}"] if experts else [])
        nodes.append(f"node {n}: " + ", ".join(parts))
    lines = ["placement    " + "; ".join(nodes) + " (by all-to-all traffic)"]
    if not plan.links:
        return lines
    lines.append(
        f"all-to-all   per decode step, {plan.decode_tokens_per_trunk} tokens per trunk rank, MiB on each GPU's "
        "NIC out / NIC in / NVLink out / NVLink in:"
    )
    groups: dict[tuple[int, str, tuple[float, ...]], list[RankTraffic]] = {}
    for t in plan.links:
        key = (t.node, t.role, tuple(round(t.of(k) / 2**20, 1) for k in LINK_KINDS))
        groups.setdefault(key, []).append(t)
    for (node, role, mib), ranks in groups.items():
        ids = [t.rank - (d if role == "expert" else 0) for t in ranks]
        name = f"node {node} {role} {_ranges(ids)}"
        lines.append(f"  {name:<24} " + " / ".join(f"{v:.1f}" for v in mib))
    assert plan.network_floor_ms is not None and plan.network_floor_rank_order_ms is not None
    lines.append(
        f"network floor {plan.network_floor_ms:.2f} ms/step at NIC {plan.nic_gbps:g} Gb/s, NVLink "
        f"{plan.nvlink_gbps:g} Gb/s per GPU each way (ranks in rank order: {plan.network_floor_rank_order_ms:.2f} ms)"
    )
    return lines
