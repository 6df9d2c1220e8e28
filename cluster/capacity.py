"""Capacity planning: will a model fit a GPU cluster as D trunk ranks + X expert ranks, and how much
KV / DeltaNet state is left for sequences.

Owns: `plan_capacity`, a pure function from a `ModelConfig` and a `Topology` to a `CapacityPlan`
(frozen): the D/X choice, experts per expert rank (the contiguous `ExpertMap`), weight bytes per
GPU of each pool, the cache room on trunk GPUs, sequences of `max_model_len` that fit, the
HBM floor of a decode step, the node of every rank (placed by traffic, cluster/traffic.py), the
all-to-all bytes per step on every link, the network floor, and the decode floor (their
maximum). Weight bytes come from `model_shards.weights.expected_tensors` (the one name/shape
table), cache bytes from `CachePools.bytes_per_block` / `bytes_per_slot`.
Must not: read weights, import Ray, or print (epserve/plan_cmd.py formats).
Tests: tests/cluster/test_capacity.py (oracle: model_spec §1.4-1.5 published figures), tests/cluster/test_traffic.py.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import TypedDict

from cluster.placement import ExpertMap
from cluster.topology import GroupShape, Topology
from cluster.traffic import (
    DEFAULT_NIC_GBPS,
    DEFAULT_NVLINK_GBPS,
    LinkSpeeds,
    RankTraffic,
    network_floor_s,
    place_by_traffic,
    rank_order_nodes,
    step_traffic,
)
from model_shards.cache import CachePools
from model_shards.cache_sizing import PREFIX_STATE_SHARE
from model_shards.config import MULTIMODAL_MODEL_TYPE, ModelConfig, QuantConfig
from model_shards.published_models import FP8_RELEASE_BLOCK, FP8_RELEASE_NOT_CONVERTED
from model_shards.weights import MTP_PREFIX, MULTIMODAL_PREFIX, TEXT_PREFIX, expected_tensors

GIB = 2**30
WEIGHT_FORMATS = ("bf16", "fp8")
BF16_BYTES = 2  # every unquantised weight and every FP8 block scale is stored bf16 (model_spec §5.3)
DEFAULT_BLOCK_SIZE = 16  # the engine's KV block size (epserve generate --block-size)
# Per GPU: CUDA context + cuBLAS workspace (~1 GiB), NCCL / all-to-all buffers (~1-2 GiB), a chunked
# prefill's activations (8k tokens x ~20k-wide projections, bf16: < 1 GiB each), decode logits
# (256 x 248k fp32 = 0.25 GiB), with headroom for allocator fragmentation.
DEFAULT_ACTIVATION_RESERVE_GIB = 8.0
# FP8_RELEASE_NOT_CONVERTED / FP8_RELEASE_BLOCK (model_shards/published_models.py): the official FP8
# releases' modules_to_not_convert and blocks; used only when planning fp8 from a bf16 config.
# Keys of `CapacityPlan.weight_bytes`: where each group of tensors lives.
TRUNK_GROUPS = ("embed", "lm_head", "layers", "mtp_trunk", "vision")  # every trunk GPU holds all of these
EXPERT_GROUPS = ("experts", "mtp_experts")  # split over the expert GPUs


@dataclass(frozen=True)
class CapacityPlan:
    """What `plan_capacity` decided and computed. Bytes are exact integers; GiB = 2**30 bytes.

    Attributes:
        trunk_ranks, expert_ranks: D and X; `layout_rule` says how they were chosen.
        experts_per_rank: expert slots each expert rank holds in every MoE layer (contiguous map; with
            `redundant_experts` R, (E + R) / X slots each: the balancer's copies of hot experts).
        redundant_experts: R extra expert copies per MoE layer (cluster/expert_balance.py places them).
        weight_bytes: one copy of the model by group (TRUNK_GROUPS + EXPERT_GROUPS).
        bytes_per_expert: one routed expert over every MoE layer (MTP layer included).
        trunk_gpu_weight_bytes / expert_gpu_weight_bytes: weights on one trunk GPU / the fullest expert GPU.
        trunk_cache_bytes: what a trunk GPU has left for KV blocks and state slots (may be negative).
        bytes_per_sequence: KV blocks of `max_model_len` tokens + one DeltaNet state slot.
        sequences_per_trunk_gpu, sequences_total: sequences of `max_model_len` that fit (per GPU, all D).
        prefix_state_checkpoints: the most saved DeltaNet states (prefix cache) a trunk GPU carves out of its KV
            memory beside the `sequences_per_trunk_gpu` slots (model_shards/cache_sizing.py: at most
            `PREFIX_STATE_SHARE` of what the slots leave; the runtime takes min(this, --prefix-state-slots)).
        prefix_state_bytes: their bytes; sequences_with_prefix_states: full-length sequences whose KV still fits
            beside them (never a refusal: the states only take KV blocks).
        decode_floor_ms: HBM floor of one decode step (weights only), None without `hbm_tbps`.
        decode_floor_with_cache_ms: the same plus reading every cached sequence of a trunk GPU once.
        nic_gbps, nvlink_gbps: link speeds per GPU, each way (cluster/traffic.py's model).
        decode_tokens_per_trunk: decode batch per trunk rank the traffic is computed for.
        rank_nodes: node of every global rank, placed by traffic (empty when the group does not fit the GPUs).
        links: every rank's all-to-all bytes per decode step on NIC and NVLink, each way.
        network_floor_ms: busiest link's time per decode step (dispatch phase + combine phase).
        network_floor_rank_order_ms: the same with ranks in rank order filling nodes (PACK), for comparison.
        decode_floor_overlap_ms: max(HBM floor, network floor): m = 2 micro-batches overlap compute and
            communication (the larger of the two per micro-batch, times m); None without `hbm_tbps`.
        decode_floor_lockstep_ms: HBM floor + network floor: m = 1, nothing overlaps.
        fits: whether the plan works; `reason` says why not (empty when it fits).
        assumptions: every modelling choice a reader should know about, one sentence each.
    """

    weight_format: str
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    trunk_ranks: int
    expert_ranks: int
    layout_rule: str
    num_experts: int
    num_moe_layers: int
    experts_per_rank: tuple[int, ...]
    redundant_experts: int
    weight_bytes: dict[str, int]
    bytes_per_expert: int
    trunk_gpu_weight_bytes: int
    expert_gpu_weight_bytes: int
    activation_reserve_bytes: int
    trunk_cache_bytes: int
    expert_gpu_free_bytes: int
    max_model_len: int
    block_size: int
    kv_bytes_per_token: int
    state_bytes_per_slot: int
    bytes_per_sequence: int
    sequences_per_trunk_gpu: int
    sequences_total: int
    hbm_tbps: float | None
    decode_trunk_stream_bytes: int
    decode_expert_stream_bytes: int
    decode_floor_ms: float | None
    decode_floor_with_cache_ms: float | None
    fits: bool
    reason: str
    assumptions: tuple[str, ...]
    nic_gbps: float = DEFAULT_NIC_GBPS
    nvlink_gbps: float = DEFAULT_NVLINK_GBPS
    decode_tokens_per_trunk: int = 0
    rank_nodes: tuple[int, ...] = ()
    links: tuple[RankTraffic, ...] = ()
    network_floor_ms: float | None = None
    network_floor_rank_order_ms: float | None = None
    decode_floor_overlap_ms: float | None = None
    decode_floor_lockstep_ms: float | None = None
    prefix_state_checkpoints: int = 0
    prefix_state_bytes: int = 0
    sequences_with_prefix_states: int = 0

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpus_used(self) -> int:
        return self.trunk_ranks + self.expert_ranks

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        out["experts_per_rank"] = list(self.experts_per_rank)
        out["assumptions"] = list(self.assumptions)
        out["rank_nodes"] = list(self.rank_nodes)
        out["links"] = [asdict(t) for t in self.links]
        out.update(total_gpus=self.total_gpus, gpus_used=self.gpus_used, total_weight_bytes=self.total_weight_bytes)
        return out


# ------------------------------------------------------------------------------ weights
def planning_config(cfg: ModelConfig, weight_format: str) -> tuple[ModelConfig, list[str]]:
    """The config whose tensor table describes the weights as served, and what was assumed.

    bf16: no quantisation (an FP8 config's quantization_config is ignored: the bf16 release of the same
    architecture). fp8: the config's own quantization_config, or, for a bf16 config, the FP8 release's
    `modules_to_not_convert` with 128x128 blocks.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if weight_format == "bf16":
        notes = ["bf16: every weight 2 bytes"]
        if cfg.quant is not None:
            notes.append("bf16 planned from an FP8 config: its quantization_config is ignored (the bf16 release)")
        return cfg.with_overrides(quant=None), notes
    if cfg.quant is not None:
        return cfg, [
            f"fp8: modules_to_not_convert from the config ({', '.join(cfg.quant.modules_to_not_convert)}), "
            f"{cfg.quant.block_rows}x{cfg.quant.block_cols} blocks, bf16 scales"
        ]
    quant = QuantConfig(
        block_rows=FP8_RELEASE_BLOCK[0],
        block_cols=FP8_RELEASE_BLOCK[1],
        modules_to_not_convert=FP8_RELEASE_NOT_CONVERTED,
    )
    return cfg.with_overrides(quant=quant), [
        "fp8 planned from a bf16 config: ASSUMED the Qwen3.5-397B-A17B-FP8 release's modules_to_not_convert "
        f"({', '.join(FP8_RELEASE_NOT_CONVERTED)}), 128x128 blocks, bf16 scales"
    ]


def weight_bytes_by_group(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of one copy of the model by group, from `expected_tensors` (fused expert layout).

    FP8 weights count 1 byte per element, everything else (scales included) 2 bytes. Groups:
    embed, lm_head, layers (mixers, routers, shared experts, norms, final norm), mtp_trunk (the MTP
    head without its routed experts), vision, experts (routed, decoder layers), mtp_experts.
    """
    prefix = MULTIMODAL_PREFIX if cfg.model_type == MULTIMODAL_MODEL_TYPE else TEXT_PREFIX
    specs = expected_tensors(
        cfg, prefix=prefix, layout="fused", mtp_layout="fused" if cfg.has_mtp else None, vision=cfg.vision is not None
    )
    out = dict.fromkeys(TRUNK_GROUPS + EXPERT_GROUPS, 0)
    for name, spec in specs.items():
        nbytes = math.prod(spec.shape) * (1 if spec.fp8 else BF16_BYTES)
        routed = ".mlp.experts." in name
        if spec.part == "vision":
            group = "vision"
        elif name.startswith(MTP_PREFIX):
            group = "mtp_experts" if routed else "mtp_trunk"
        elif routed:
            group = "experts"
        elif name.startswith(f"{prefix}embed_tokens."):
            group = "embed"
        elif name.startswith("lm_head."):
            group = "lm_head"
        else:
            group = "layers"
        out[group] += nbytes
    return out


# ------------------------------------------------------------------------------ D and X
def _experts_per_rank(num_experts: int, expert_ranks: int) -> tuple[int, ...]:
    if expert_ranks == 0:
        return ()
    owners = ExpertMap.contiguous(num_experts=num_experts, num_moe_layers=1, expert_ranks=expert_ranks).owners[0]
    counts = Counter(ranks[0] for ranks in owners)
    return tuple(counts[j] for j in range(expert_ranks))


def smallest_expert_ranks(
    *, num_experts: int, bytes_per_expert: int, budget_bytes: int, divides: bool = False
) -> int | None:
    """The smallest X whose fullest shard (ceil(E/X) experts, or slots) fits `budget_bytes` (and, with `divides`,
    divides them evenly); None if none does."""
    for x in range(1, num_experts + 1):
        if divides and num_experts % x:
            continue
        if -(-num_experts // x) * bytes_per_expert <= budget_bytes:
            return x
    return None


def _choose_shape(
    *, total_gpus: int, num_experts: int, trunk_ranks: int | None, expert_ranks: int | None, x_min: int | None
) -> tuple[int, int, str, list[str]]:
    """(D, X, rule, reasons it cannot run). When the GPUs are too few, D/X are what the plan would need."""
    # No X fits: plan the widest split the cluster allows and let the expert check name the problem.
    need_x = x_min if x_min is not None else min(num_experts, max(total_gpus - 1, 1))
    if trunk_ranks is None and expert_ranks is None:
        if x_min is not None and x_min + 1 > total_gpus:
            return (
                1,
                x_min,
                "auto",
                [
                    f"too few GPUs: the experts need {x_min} expert GPUs and the trunk at least 1, "
                    f"{x_min + 1} GPUs in all; the cluster has {total_gpus}"
                ],
            )
        return max(total_gpus - need_x, 1), need_x, "auto: smallest X whose expert shard fits, the rest trunk ranks", []
    if trunk_ranks is None:
        assert expert_ranks is not None
        if expert_ranks == 0:
            return 1, 0, "given X = 0: experts inside the single trunk rank", []
        if expert_ranks + 1 > total_gpus:
            return (
                1,
                expert_ranks,
                "given X",
                [
                    f"too few GPUs: X = {expert_ranks} expert ranks + at least 1 trunk "
                    f"rank need {expert_ranks + 1} GPUs; the cluster has {total_gpus}"
                ],
            )
        return total_gpus - expert_ranks, expert_ranks, "given X, the other GPUs trunk ranks", []
    if expert_ranks is None:
        x = min(num_experts, total_gpus - trunk_ranks)
        if x < 1:
            return (
                trunk_ranks,
                need_x,
                "given D",
                [
                    f"too few GPUs: D = {trunk_ranks} trunk ranks leave no GPU for "
                    f"expert ranks on a cluster of {total_gpus}"
                ],
            )
        return trunk_ranks, x, "given D, the other GPUs expert ranks (at most one per expert)", []
    if trunk_ranks + expert_ranks > total_gpus:
        return (
            trunk_ranks,
            expert_ranks,
            "given D and X",
            [
                f"too few GPUs: D = {trunk_ranks} + X = {expert_ranks} = {trunk_ranks + expert_ranks} GPUs; "
                f"the cluster has {total_gpus}"
            ],
        )
    return trunk_ranks, expert_ranks, "given D and X", []


# ------------------------------------------------------------------------------ the plan
def plan_capacity(
    cfg: ModelConfig,
    topology: Topology,
    *,
    weight_format: str,
    trunk_ranks: int | None = None,
    expert_ranks: int | None = None,
    max_model_len: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    kv_dtype_bytes: int = 2,
    activation_reserve_gib: float = DEFAULT_ACTIVATION_RESERVE_GIB,
    hbm_tbps: float | None = None,
    redundant_experts: int = 0,
    nic_gbps: float = DEFAULT_NIC_GBPS,
    nvlink_gbps: float = DEFAULT_NVLINK_GBPS,
    decode_tokens_per_trunk: int | None = None,
) -> CapacityPlan:
    """Plan one expert-parallel group on a GPU cluster: D trunk GPUs and X expert GPUs, disjoint pools.

    Choosing D and X (when neither is given): every GPU is used, and X is scanned from 1 to
    min(E, GPUs - 1) (D = the other GPUs); among the splits that fit, the one with the least decode
    floor per decode token of the group wins, i.e. the most tokens per second at full batch:
    D x T / floor, T the decode batch per trunk rank, floor = max(HBM, network) with m = 2 overlap
    (the network floor alone without `hbm_tbps`); ties go to fewer expert ranks (`auto_layout`).
    Why per token and not the step floor alone: the step floor with T fixed per trunk only falls
    as D shrinks (fewer senders, smaller expert shards), down to D = 1, which serves the fewest
    sequences. The smallest X whose fullest shard (ceil(E/X) experts of every MoE layer, the MTP
    layer's included) plus the activation reserve fits one GPU is the first split that fits;
    when none fits, that X is planned and refused with the reason (as before the scan). Given only
    X, D takes the rest; given only D, X takes the rest (capped at E); given flags always win.

    Worked example of the smallest X (397B, bf16, 2 nodes x 8 x 140 GiB, reserve 8 GiB): one expert
    over 61 MoE layers is 61 x 25.17 MB = 1.43 GiB; X = 5 holds 103 experts = 147.3 GiB (too much),
    X = 6 holds 86 = 122.95 GiB, + 8 <= 140, so X = 6 (86, 86, 85, 85, 85, 85 experts). With the
    network counted, 4 nodes of H200 at fp8 go from X = 3 (D = 29: 146 ms network-bound floor) to
    X = 16 (D = 16: 14.9 ms), benchmarks/RESULTS-plan.md.

    A trunk GPU holds embed + lm_head + all mixers + routers + shared experts + norms + the MTP
    head's non-expert part + the vision tower, an activation reserve, and in what is left KV blocks
    and DeltaNet state slots. One sequence of `max_model_len` takes ceil(len / block_size) KV blocks
    (all attention layers, + the MTP layer's when the config has one) and one state slot (conv
    bf16, recurrent fp32). The decode floor (with `hbm_tbps`, TB/s = 1e12 B/s) assumes a full
    batch touches every expert of a rank, one batch in flight (trunk and expert pools take turns
    layer by layer, so their times add), plain decode without MTP speculation: the trunk streams
    everything but the embedding table (a row gather), the vision tower and the MTP head, the fullest
    expert rank streams its decoder-layer experts.

    Args:
        cfg: the model (`from_hf_config`); topology: nodes x GPUs x GiB per GPU.
        weight_format: "bf16" or "fp8" (see `planning_config`).
        trunk_ranks, expert_ranks: D and X, or None to choose (above). X = 0: experts in the one trunk rank.
        max_model_len: tokens per sequence the cache must hold (<= max_position_embeddings).
        block_size: tokens per KV block; kv_dtype_bytes: 2 (bf16) or 1 (fp8 KV).
        activation_reserve_gib: kept free on every GPU for activations, buffers and the CUDA context.
        hbm_tbps: HBM bandwidth per GPU in TB/s (4.8 for H200) for the decode floor; None skips it.
        redundant_experts: R extra copies per MoE layer for load balancing: every expert rank holds (E + R) / X
            expert slots (so X must divide E + R; the automatic X is the smallest that fits and divides).
        nic_gbps, nvlink_gbps: inter-node (one NIC per GPU) and intra-node bandwidth per GPU, each way, Gb/s.
        decode_tokens_per_trunk: decode batch per trunk rank for the traffic (default: the sequences that fit).

    Traffic: ranks are placed on nodes by `place_by_traffic` (the busiest link carries the least); a
    decode step moves, per decoder MoE layer, every trunk's T x top-k rows (hidden x 2 bytes, bf16 on
    the wire, + a 4-byte expert id) to the expert ranks and the answers back (cluster/traffic.py).
    Returns:
        The `CapacityPlan`; `fits` False with `reason` when it cannot run.
    Raises:
        ValueError: a value out of range (named with the value).
    """
    _validate(
        cfg,
        topology,
        weight_format=weight_format,
        trunk_ranks=trunk_ranks,
        expert_ranks=expert_ranks,
        max_model_len=max_model_len,
        block_size=block_size,
        kv_dtype_bytes=kv_dtype_bytes,
        activation_reserve_gib=activation_reserve_gib,
        hbm_tbps=hbm_tbps,
        redundant_experts=redundant_experts,
    )
    speeds = LinkSpeeds(nic_gbps=nic_gbps, nvlink_gbps=nvlink_gbps)  # raises on a non-positive speed
    if decode_tokens_per_trunk is not None and decode_tokens_per_trunk < 0:
        raise ValueError(f"decode_tokens_per_trunk must be >= 0, got {decode_tokens_per_trunk}")
    if trunk_ranks is None and expert_ranks is None:
        fitting = [
            plan_capacity(
                cfg,
                topology,
                weight_format=weight_format,
                trunk_ranks=topology.total_gpus - x,
                expert_ranks=x,
                max_model_len=max_model_len,
                block_size=block_size,
                kv_dtype_bytes=kv_dtype_bytes,
                activation_reserve_gib=activation_reserve_gib,
                hbm_tbps=hbm_tbps,
                redundant_experts=redundant_experts,
                nic_gbps=nic_gbps,
                nvlink_gbps=nvlink_gbps,
                decode_tokens_per_trunk=decode_tokens_per_trunk,
            )
            for x in range(1, min(cfg.num_experts, topology.total_gpus - 1) + 1)
        ]
        chosen = auto_layout([p for p in fitting if p.fits])
        if chosen is not None:
            return chosen
        # nothing fits: plan the smallest X that would (below) so the refusal names the problem
    served, assumptions = planning_config(cfg, weight_format)
    groups = weight_bytes_by_group(served)
    e = cfg.num_experts
    expert_total = groups["experts"] + groups["mtp_experts"]
    # Fused tensors are [E, ...] per MoE layer (scales too), so one expert's share is exact.
    assert expert_total % e == 0, (expert_total, e)
    per_expert = expert_total // e
    gpu_bytes = int(topology.gpu_memory_gib * GIB)
    reserve = int(activation_reserve_gib * GIB)
    slots = e + redundant_experts
    x_min = smallest_expert_ranks(
        num_experts=slots, bytes_per_expert=per_expert, budget_bytes=gpu_bytes - reserve, divides=redundant_experts > 0
    )
    d, x, rule, reasons = _choose_shape(
        total_gpus=topology.total_gpus, num_experts=e, trunk_ranks=trunk_ranks, expert_ranks=expert_ranks, x_min=x_min
    )
    if redundant_experts and x and slots % x:
        reasons.append(
            f"X = {x} expert ranks do not divide the {e} experts + {redundant_experts} redundant copies "
            f"({slots} slots) evenly; the balancer gives every expert rank the same number of slots"
        )
    per_rank = _experts_per_rank(slots, x) if x else ()
    if redundant_experts and x:
        assumptions.append(
            f"{redundant_experts} redundant expert copies per MoE layer: each expert rank holds {slots // x} slots "
            "(one more expert's weights per extra slot); decode streams every slot of the fullest rank"
        )

    trunk_weights = sum(groups[g] for g in TRUNK_GROUPS) + (expert_total if x == 0 else 0)
    expert_weights = max(per_rank, default=0) * per_expert
    expert_free = gpu_bytes - reserve - expert_weights if x else 0
    cache_room = gpu_bytes - reserve - trunk_weights
    reasons += _memory_reasons(
        x=x,
        x_min=x_min,
        per_rank=per_rank,
        expert_free=expert_free,
        expert_weights=expert_weights,
        cache_room=cache_room,
        trunk_weights=trunk_weights,
        reserve_gib=activation_reserve_gib,
        gpu_gib=topology.gpu_memory_gib,
    )

    kv_token, slot, per_seq = sequence_bytes(
        cfg, max_model_len=max_model_len, block_size=block_size, kv_dtype_bytes=kv_dtype_bytes
    )
    seqs = max(cache_room, 0) // per_seq
    ckpts = int((max(cache_room, 0) - seqs * slot) * PREFIX_STATE_SHARE) // slot
    seqs_with_ckpts = max(0, max(cache_room, 0) - ckpts * slot) // per_seq
    if cache_room >= 0 and seqs == 0:
        reasons.append(
            f"no room for even one sequence: {max_model_len} tokens need {per_seq / GIB:.2f} GiB "
            f"(KV + DeltaNet state), a trunk GPU has {cache_room / GIB:.2f} GiB left"
        )
    assumptions += _cache_assumptions(cfg, kv_dtype_bytes, block_size, activation_reserve_gib)

    # Plain decode: no embedding table (a row gather), vision tower or MTP head; decoder-layer experts only.
    trunk_stream = groups["lm_head"] + groups["layers"] + (groups["experts"] if x == 0 else 0)
    expert_stream = max(per_rank, default=0) * (groups["experts"] // e)
    floor = floor_cache = None
    if hbm_tbps is not None:
        floor = (trunk_stream + expert_stream) / (hbm_tbps * 1e12) * 1e3
        floor_cache = floor + seqs * per_seq / (hbm_tbps * 1e12) * 1e3
        assumptions.append(
            "HBM floor: full batch touches every expert of a rank; trunk and expert pools take "
            "turns (times add); no MTP speculation; embedding rows gathered, vision tower idle"
        )
    tokens = seqs if decode_tokens_per_trunk is None else decode_tokens_per_trunk
    net = _network(
        cfg, topology, speeds, d=d, x=x, per_rank=per_rank, tokens=tokens, assumptions=assumptions, hbm_ms=floor
    )
    return CapacityPlan(
        weight_format=weight_format,
        nodes=topology.nodes,
        gpus_per_node=topology.gpus_per_node,
        gpu_memory_gib=topology.gpu_memory_gib,
        trunk_ranks=d,
        expert_ranks=x,
        layout_rule=rule,
        num_experts=e,
        num_moe_layers=cfg.num_moe_layers,
        experts_per_rank=per_rank,
        redundant_experts=redundant_experts,
        weight_bytes=groups,
        bytes_per_expert=per_expert,
        trunk_gpu_weight_bytes=trunk_weights,
        expert_gpu_weight_bytes=expert_weights,
        activation_reserve_bytes=reserve,
        trunk_cache_bytes=cache_room,
        expert_gpu_free_bytes=expert_free,
        max_model_len=max_model_len,
        block_size=block_size,
        kv_bytes_per_token=kv_token,
        state_bytes_per_slot=slot,
        bytes_per_sequence=per_seq,
        sequences_per_trunk_gpu=seqs,
        sequences_total=seqs * d,
        hbm_tbps=hbm_tbps,
        decode_trunk_stream_bytes=trunk_stream,
        decode_expert_stream_bytes=expert_stream,
        decode_floor_ms=floor,
        decode_floor_with_cache_ms=floor_cache,
        fits=not reasons,
        reason="; ".join(reasons),
        assumptions=tuple(assumptions),
        nic_gbps=nic_gbps,
        nvlink_gbps=nvlink_gbps,
        decode_tokens_per_trunk=tokens,
        prefix_state_checkpoints=ckpts,
        prefix_state_bytes=ckpts * slot,
        sequences_with_prefix_states=seqs_with_ckpts,
        **net,
    )


def tokens_per_s_bound(plan: CapacityPlan) -> float:
    """Decode tokens per second of the whole group at full batch: D x T / decode floor (max(HBM, network), m = 2
    overlap; the network floor alone when the plan has no HBM floor). 0 when the floor is unknown or zero."""
    floor = plan.decode_floor_overlap_ms if plan.decode_floor_overlap_ms is not None else plan.network_floor_ms
    if not floor:
        return 0.0
    return plan.trunk_ranks * plan.decode_tokens_per_trunk * 1e3 / floor


def auto_layout(candidates: list[CapacityPlan]) -> CapacityPlan | None:
    """The automatic D/X among plans that fit (all GPUs used, X scanned): the most decode tokens per second
    (`tokens_per_s_bound`, the least floor per token), ties to fewer expert ranks; None when none fits.
    The chosen plan's `layout_rule` and assumptions say what it was chosen over."""
    if not candidates:
        return None
    best = max(candidates, key=lambda p: (tokens_per_s_bound(p), -p.expert_ranks))
    first = min(candidates, key=lambda p: p.expert_ranks)
    by_net = best.decode_floor_overlap_ms is None
    what = "network floor" if by_net else "decode floor"
    note = (
        f"auto layout: X scanned over the {len(candidates)} splits that fit (X = {first.expert_ranks} to "
        f"{max(p.expert_ranks for p in candidates)}, every GPU used); X = {best.expert_ranks} gives "
        f"{tokens_per_s_bound(best):,.0f} decode tokens/s at full batch (D x T / {what}); the smallest X that fits "
        f"(X = {first.expert_ranks}) gives {tokens_per_s_bound(first):,.0f}"
    )
    rule = f"auto: the X with the least {what} per decode token among the splits that fit, the rest trunk ranks"
    return replace(best, layout_rule=rule, assumptions=(*best.assumptions, note))


class _Network(TypedDict, total=False):
    rank_nodes: tuple[int, ...]
    links: tuple[RankTraffic, ...]
    network_floor_ms: float
    network_floor_rank_order_ms: float
    decode_floor_overlap_ms: float
    decode_floor_lockstep_ms: float


def _network(
    cfg: ModelConfig,
    topology: Topology,
    speeds: LinkSpeeds,
    *,
    d: int,
    x: int,
    per_rank: tuple[int, ...],
    tokens: int,
    assumptions: list[str],
    hbm_ms: float | None,
) -> _Network:
    """rank_nodes, links and the floors that need them (nothing when the group exceeds the cluster)."""
    if d + x > topology.total_gpus:
        return {}
    shape = GroupShape(trunk_ranks=d, expert_ranks=x)
    nodes = place_by_traffic(shape, nodes=topology.nodes, slots_per_node=topology.gpus_per_node, speeds=speeds)
    if x == 0:
        return {"rank_nodes": nodes, "network_floor_ms": 0.0, "network_floor_rank_order_ms": 0.0}
    shares = tuple(n / sum(per_rank) for n in per_rank)  # uniform routing over expert slots

    def traffic(rank_nodes: tuple[int, ...]) -> tuple[RankTraffic, ...]:
        return step_traffic(
            shape,
            rank_nodes,
            shares,
            tokens_per_trunk=tokens,
            top_k=cfg.num_experts_per_tok,
            moe_layers=cfg.num_layers,
            hidden=cfg.hidden_size,
        )

    links = traffic(nodes)
    net_ms = network_floor_s(links, speeds) * 1e3
    packed_ms = network_floor_s(traffic(rank_order_nodes(shape, topology.gpus_per_node)), speeds) * 1e3
    assumptions.append(
        f"all-to-all: {tokens} decode tokens per trunk rank, uniform routing over expert slots, top-"
        f"{cfg.num_experts_per_tok} rows of {cfg.hidden_size} x 2 B (bf16) + 4 B id out and the answers back per "
        f"decoder MoE layer, payload only (no capacity padding); one {speeds.nic_gbps:g} Gb/s NIC per GPU, "
        f"NVLink {speeds.nvlink_gbps:g} Gb/s per GPU, each way; a phase lasts as long as its busiest link"
    )
    out: _Network = {
        "rank_nodes": nodes,
        "links": links,
        "network_floor_ms": net_ms,
        "network_floor_rank_order_ms": packed_ms,
    }
    if hbm_ms is not None:
        out["decode_floor_overlap_ms"] = max(hbm_ms, net_ms)
        out["decode_floor_lockstep_ms"] = hbm_ms + net_ms
        assumptions.append(
            "decode floor with overlap: m = 2 micro-batches, each as long as the larger of its compute (HBM) and "
            "its communication, so the step is max(HBM, network); a micro-batch that re-reads every expert's "
            "weights would pay the HBM part m times; lock-step (m = 1) adds them"
        )
    return out


def sequence_bytes(
    cfg: ModelConfig, *, max_model_len: int, block_size: int, kv_dtype_bytes: int
) -> tuple[int, int, int]:
    """(KV bytes per token, DeltaNet state bytes per slot, bytes of one sequence of `max_model_len`).

    KV covers every attention layer plus the MTP layer's when the config has one (it shares the
    block tables); a sequence takes whole blocks. The conv state stays bf16 whatever the KV dtype
    and the recurrent state is fp32 (model_spec §1.5).
    """
    kv_token = CachePools.bytes_per_block(cfg, block_size=1, dtype_bytes=kv_dtype_bytes, with_mtp=cfg.has_mtp)
    slot = CachePools.bytes_per_slot(cfg, dtype_bytes=BF16_BYTES)
    return kv_token, slot, -(-max_model_len // block_size) * block_size * kv_token + slot


def _memory_reasons(
    *,
    x: int,
    x_min: int | None,
    per_rank: tuple[int, ...],
    expert_free: int,
    expert_weights: int,
    cache_room: int,
    trunk_weights: int,
    reserve_gib: float,
    gpu_gib: float,
) -> list[str]:
    out = []
    if x and expert_free < 0:
        hint = f"; X >= {x_min} would fit" if x_min is not None else "; even one expert per GPU does not fit"
        out.append(
            f"experts do not fit: {max(per_rank)} experts per expert GPU = {expert_weights / GIB:.1f} GiB + "
            f"{reserve_gib:g} GiB reserve > {gpu_gib:g} GiB{hint}"
        )
    if cache_room < 0:
        what = "trunk + all experts (X = 0)" if x == 0 else "trunk weights"
        out.append(
            f"{what} do not fit a trunk GPU: {trunk_weights / GIB:.1f} GiB + {reserve_gib:g} GiB reserve > "
            f"{gpu_gib:g} GiB"
        )
    return out


def _cache_assumptions(cfg: ModelConfig, kv_dtype_bytes: int, block_size: int, reserve_gib: float) -> list[str]:
    mtp = " + the MTP layer" if cfg.has_mtp else ""
    return [
        f"KV cache: {len(cfg.attention_layers)} attention layers{mtp}, {kv_dtype_bytes}-byte entries, "
        f"blocks of {block_size} tokens; every sequence reserved at max_model_len",
        f"DeltaNet state: one slot per sequence, conv bf16 + recurrent fp32, {len(cfg.linear_layers)} layers",
        f"activation reserve {reserve_gib:g} GiB on every GPU (context, NCCL buffers, prefill activations, logits)",
    ]


def _validate(
    cfg: ModelConfig,
    topology: Topology,
    *,
    weight_format: str,
    trunk_ranks: int | None,
    expert_ranks: int | None,
    max_model_len: int,
    block_size: int,
    kv_dtype_bytes: int,
    activation_reserve_gib: float,
    hbm_tbps: float | None,
    redundant_experts: int = 0,
) -> None:
    if redundant_experts < 0:
        raise ValueError(f"redundant_experts must be >= 0, got {redundant_experts}")
    if redundant_experts and expert_ranks == 0:
        raise ValueError("redundant_experts needs expert ranks (X >= 1): with X = 0 every expert is in the trunk")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    if not topology.has_gpus:
        raise ValueError(f"capacity planning needs GPUs: gpus_per_node is {topology.gpus_per_node}")
    if not 1 <= max_model_len <= cfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len must be in [1, {cfg.max_position_embeddings}] (the model's "
            f"max_position_embeddings), got {max_model_len}"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if kv_dtype_bytes not in (1, 2, 4):
        raise ValueError(f"kv_dtype_bytes must be 1, 2 or 4, got {kv_dtype_bytes}")
    if activation_reserve_gib < 0:
        raise ValueError(f"activation_reserve_gib must be >= 0, got {activation_reserve_gib}")
    if hbm_tbps is not None and hbm_tbps <= 0:
        raise ValueError(f"hbm_tbps must be > 0, got {hbm_tbps}")
    if expert_ranks is not None and expert_ranks > cfg.num_experts:
        raise ValueError(
            f"expert_ranks {expert_ranks} exceeds num_experts {cfg.num_experts}: some ranks would hold nothing"
        )
    if trunk_ranks is not None or expert_ranks is not None:
        # GroupShape owns the D/X rules (D >= 1, X >= 0, X = 0 only with D = 1); its messages name the values.
        GroupShape(
            trunk_ranks=1 if trunk_ranks is None else trunk_ranks,
            expert_ranks=1 if expert_ranks is None else expert_ranks,
        )
