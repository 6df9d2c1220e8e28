"""Capacity planning (`plan_capacity`, `epserve plan`): bytes, cache sizes, D/X choice, refusals.

Proves: weight bytes per group equal model_spec §1.4's published parameter counts x 2 (bf16)
exactly, and its published totals (793.6 GB bf16 without MTP, 25.17 MB / 12.58 MB per expert,
12.0 / 6.0 GiB per layer of experts, FP8 total ~399.5 GB); KV 30,720 B/token and 4 MiB of
recurrent state per layer (§1.5); the smallest X of the docstring's worked example and the
automatic D/X (the most decode tokens per second among splits that fit) against brute force and by hand; plans
that cannot run are refused with a reason; bad values raise ValueError; the CLI's exit codes
and JSON keys (subprocess). Oracle: the published figures, not our own tensor table. The 397B
config is built here from model_spec §1.1; the shared/configs files, when present, must agree.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster.capacity import (
    FP8_RELEASE_NOT_CONVERTED,
    GIB,
    plan_capacity,
    smallest_expert_ranks,
    weight_bytes_by_group,
)
from cluster.placement import ExpertMap
from cluster.topology import Topology
from model_shards.config import QuantConfig, from_hf_config, tiny
from model_shards.weights import expected_tensors

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO.parent / "shared" / "configs"
H200_NODE = dict(gpus_per_node=8, gpu_memory_gib=140.0)
LEN = 262144

# model_spec §1.4, parameters of the 397B model (HF model, incl. vision, no MTP).
EMBED = 1_017_118_720
GDN = 5_310_639_360
ATTN = 1_572_871_680
ROUTERS = 125_829_120
EXPERTS = 386_547_056_640
SHARED = 755_220_480
NORMS = 495_616
VISION = 456_010_480
MTP = 6_595_568_128
PER_EXPERT = 3 * 4096 * 1024  # 12,582,912
FP8_SCALES_PER_EXPERT = 768  # bf16 block scales of one expert (§1.4)


def config_397b(*, fp8: bool = False, mtp: bool = True) -> dict[str, Any]:
    """Qwen3.5-397B-A17B's config.json, written from model_spec §1.1 (independent of shared/configs)."""
    text = {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": 248320,
        "hidden_size": 4096,
        "num_hidden_layers": 60,
        "full_attention_interval": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 64,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
        "mtp_num_hidden_layers": 1 if mtp else 0,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    out: dict[str, Any] = {
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "vision_config": {
            "depth": 27,
            "hidden_size": 1152,
            "num_heads": 16,
            "intermediate_size": 4304,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "num_position_embeddings": 2304,
            "out_hidden_size": 4096,
        },
    }
    if fp8:
        out["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": list(FP8_RELEASE_NOT_CONVERTED),
        }
    return out


def _plan(cfg_dict: dict[str, Any], *, nodes: int = 1, fmt: str = "bf16", **kw: Any):  # noqa: ANN202, ANN401
    topo = Topology(nodes=nodes, **{**H200_NODE, **kw.pop("topology", {})})
    return plan_capacity(
        from_hf_config(cfg_dict), topo, weight_format=fmt, max_model_len=kw.pop("max_model_len", LEN), **kw
    )


# ------------------------------------------------------------------------------ weight bytes vs §1.4
def test_bf16_groups_equal_published_params_times_two() -> None:
    g = weight_bytes_by_group(from_hf_config(config_397b()))
    assert g["embed"] == g["lm_head"] == 2 * EMBED
    assert g["layers"] == 2 * (GDN + ATTN + ROUTERS + SHARED + NORMS)
    assert g["experts"] == 2 * EXPERTS
    assert g["vision"] == 2 * VISION
    assert g["mtp_trunk"] + g["mtp_experts"] == 2 * MTP
    assert g["mtp_experts"] == 2 * 512 * PER_EXPERT  # the MTP layer's full MoE


def test_bf16_published_totals() -> None:
    plan = _plan(config_397b())
    g = plan.weight_bytes
    no_mtp = plan.total_weight_bytes - g["mtp_trunk"] - g["mtp_experts"]
    assert round(no_mtp / 1e9, 1) == 793.6
    assert round(no_mtp / GIB, 1) == 739.1
    assert round(plan.total_weight_bytes / 1e9, 1) == 806.8  # BF16 + MTP
    per_expert_layer = g["experts"] // (60 * 512)
    assert per_expert_layer == 2 * PER_EXPERT and round(per_expert_layer / 1e6, 2) == 25.17
    assert round(512 * per_expert_layer / GIB, 1) == 12.0
    assert plan.bytes_per_expert == 61 * 2 * PER_EXPERT  # 60 decoder layers + the MTP layer


def test_fp8_published_totals() -> None:
    plan = _plan(config_397b(fp8=True), fmt="fp8")
    g = plan.weight_bytes
    per_expert_layer = g["experts"] // (60 * 512)
    assert per_expert_layer == PER_EXPERT + 2 * FP8_SCALES_PER_EXPERT
    assert round(PER_EXPERT / 1e6, 2) == 12.58
    assert round(512 * per_expert_layer / GIB, 1) == 6.0
    no_mtp = plan.total_weight_bytes - g["mtp_trunk"] - g["mtp_experts"]
    assert abs(no_mtp / 1e9 - 399.5) < 0.05
    assert abs(plan.total_weight_bytes / 1e9 - 406) < 0.5  # "FP8 + MTP ≈ 406 GB"
    # Kept bf16 per §5.3: embeddings, lm_head and the vision tower are exactly 2 bytes per parameter.
    assert g["embed"] == g["lm_head"] == 2 * EMBED and g["vision"] == 2 * VISION


def test_trunk_gpu_holds_every_non_expert_part() -> None:
    plan = _plan(config_397b())
    mtp_trunk_params = MTP - 512 * PER_EXPERT
    assert plan.trunk_gpu_weight_bytes == 2 * (
        2 * EMBED + GDN + ATTN + ROUTERS + SHARED + NORMS + VISION + mtp_trunk_params
    )


def test_fp8_from_bf16_config_uses_the_release_list_and_says_so() -> None:
    from_bf16 = _plan(config_397b(), fmt="fp8")
    from_fp8 = _plan(config_397b(fp8=True), fmt="fp8")
    assert from_bf16.weight_bytes == from_fp8.weight_bytes
    assert any("ASSUMED" in a and "mtp.fc" in a for a in from_bf16.assumptions)
    assert not any("ASSUMED" in a for a in from_fp8.assumptions)


def test_bf16_from_fp8_config_ignores_quantisation() -> None:
    plan = _plan(config_397b(fp8=True), fmt="bf16")
    assert plan.weight_bytes == _plan(config_397b()).weight_bytes
    assert any("ignored" in a for a in plan.assumptions)


def test_fused_table_gives_the_per_expert_bytes() -> None:
    """The planner counts the fused layout; the per-expert layout of the same model has the same bytes."""
    cfg = tiny(quant=QuantConfig(block_rows=32, block_cols=32, modules_to_not_convert=("mlp.gate", "lm_head")))
    specs = expected_tensors(
        cfg, prefix="model.language_model.", layout="per-expert", mtp_layout="per-expert", vision=False
    )
    per_expert_total = sum(math.prod(s.shape) * (1 if s.fp8 else 2) for s in specs.values())
    assert sum(weight_bytes_by_group(cfg).values()) == per_expert_total


@pytest.mark.skipif(not (CONFIGS / "qwen3.5-397b-a17b-fp8.config.json").exists(), reason=f"no {CONFIGS}")
def test_shared_config_files_agree_with_the_spec() -> None:
    for name, fp8 in (("qwen3.5-397b-a17b.config.json", False), ("qwen3.5-397b-a17b-fp8.config.json", True)):
        ours = _plan(config_397b(fp8=fp8), fmt="fp8" if fp8 else "bf16")
        theirs = plan_capacity(
            from_hf_config(CONFIGS / name),
            Topology(nodes=1, **H200_NODE),
            weight_format="fp8" if fp8 else "bf16",
            max_model_len=LEN,
        )
        assert theirs.weight_bytes == ours.weight_bytes and theirs.bytes_per_sequence == ours.bytes_per_sequence


# ------------------------------------------------------------------------------ caches vs §1.5
def test_kv_and_state_sizes() -> None:
    no_mtp = _plan(config_397b(mtp=False))
    assert no_mtp.kv_bytes_per_token == 30_720
    conv = 12_288 * 3 * 2
    recurrent = 64 * 128 * 128 * 4
    assert recurrent == 4 * 2**20
    assert no_mtp.state_bytes_per_slot == 45 * (conv + recurrent)
    assert round(no_mtp.state_bytes_per_slot / 2**20) == 183
    assert no_mtp.bytes_per_sequence == 7.5 * GIB + no_mtp.state_bytes_per_slot  # 262,144 tokens -> 7.5 GiB KV
    with_mtp = _plan(config_397b())
    assert with_mtp.kv_bytes_per_token == 30_720 + 2_048  # "the MTP layer adds 2 KiB/token"


def test_partial_block_rounds_up() -> None:
    plan = _plan(config_397b(mtp=False), max_model_len=17, block_size=16)
    assert plan.bytes_per_sequence == 32 * 30_720 + plan.state_bytes_per_slot


def test_sequences_fill_the_trunk_room() -> None:
    plan = _plan(config_397b(), nodes=2)
    room = 140 * GIB - 8 * GIB - plan.trunk_gpu_weight_bytes
    assert plan.trunk_cache_bytes == room
    assert plan.sequences_per_trunk_gpu == room // plan.bytes_per_sequence == 13
    assert plan.sequences_total == 13 * plan.trunk_ranks


def test_prefix_states_are_carved_out_of_the_kv_room() -> None:
    # the same trunk GPU: 13 full-length sequences; a quarter of what their state slots leave holds saved states
    plan = _plan(config_397b(), nodes=2)
    room, slot = plan.trunk_cache_bytes, plan.state_bytes_per_slot
    want = (room - 13 * slot) // 4 // slot
    assert plan.prefix_state_checkpoints == want > 0 and plan.prefix_state_bytes == want * slot
    assert plan.sequences_with_prefix_states == (room - want * slot) // plan.bytes_per_sequence < 13
    assert plan.fits  # the states only take KV blocks: no plan is refused for them


# ------------------------------------------------------------------------------ D and X
def test_smallest_x_worked_example() -> None:
    """The docstring's worked example of the smallest X that fits (bf16, 2 x 8 x 140 GiB): X = 6. With no decode
    tokens every split serves 0 tokens/s, so the automatic choice ties and goes to the fewest expert ranks: X = 6."""
    plan = _plan(config_397b(), nodes=2, decode_tokens_per_trunk=0, hbm_tbps=4.8)
    assert (plan.trunk_ranks, plan.expert_ranks) == (10, 6)
    assert not _plan(config_397b(), nodes=2, expert_ranks=5).fits
    assert plan.experts_per_rank == (86, 86, 85, 85, 85, 85)
    assert plan.expert_gpu_weight_bytes == 86 * plan.bytes_per_expert
    assert round(plan.expert_gpu_weight_bytes / GIB, 2) == 122.95
    assert 103 * plan.bytes_per_expert + 8 * GIB > 140 * GIB  # X = 5 would not fit
    assert plan.fits and plan.reason == ""


def _brute_force_auto(nodes: int, fmt: str, **kw: Any) -> tuple[int, int]:  # noqa: ANN401  # _plan's keywords
    """Every split of the cluster's GPUs planned with D and X given; the most D x T / floor among those that fit
    (floor = max(HBM, network) from each plan's own floors), ties to fewer X."""
    gpus = nodes * 8
    best: tuple[float, int] | None = None
    for x in range(1, gpus):
        p = _plan(config_397b(fp8=fmt == "fp8"), nodes=nodes, fmt=fmt, trunk_ranks=gpus - x, expert_ranks=x, **kw)
        if not p.fits:
            continue
        assert p.network_floor_ms is not None
        floor = p.network_floor_ms if p.decode_floor_ms is None else max(p.decode_floor_ms, p.network_floor_ms)
        score = (gpus - x) * p.decode_tokens_per_trunk / floor
        if best is None or score > best[0]:  # strictly more: an equal score keeps the smaller X
            best = (score, x)
    assert best is not None
    return gpus - best[1], best[1]


@pytest.mark.parametrize(
    "nodes,fmt,kw",
    [
        (2, "bf16", {"hbm_tbps": 4.8}),
        (4, "fp8", {"hbm_tbps": 4.8}),
        (2, "fp8", {"hbm_tbps": 3.35, "topology": {"gpu_memory_gib": 79.6}}),
        (4, "bf16", {}),  # no HBM figure: the network floor alone
        (2, "bf16", {"hbm_tbps": 4.8, "redundant_experts": 32}),  # only X dividing 544 fit
    ],
)
def test_auto_layout_is_the_best_split_by_brute_force(nodes: int, fmt: str, kw: dict[str, Any]) -> None:
    auto = _plan(config_397b(fp8=fmt == "fp8"), nodes=nodes, fmt=fmt, max_model_len=32768, **dict(kw))
    want = _brute_force_auto(nodes, fmt, max_model_len=32768, **dict(kw))
    assert auto.fits and (auto.trunk_ranks, auto.expert_ranks) == want
    assert auto.layout_rule.startswith("auto: the X with the least")
    assert any(a.startswith("auto layout: X scanned") for a in auto.assumptions)


def test_auto_layout_four_h200_nodes_fp8_by_hand() -> None:
    """The case the scan fixes: 4 x 8 x H200 at fp8, 32k. The smallest X that fits (3, D = 29) is network-bound at
    146 ms; the scan picks D = X = 16, 4 + 4 per node. Busiest link by hand: an expert's NIC receives 12 remote
    trunks' 101 tokens x top-10 x 60 layers / 16 rows of (4096 x 2 + 4) B, then sends them back (4096 x 2 B), at
    400 Gb/s = 50 GB/s: 7.453 + 7.449 = 14.90 ms, above the HBM floor (7.11 ms)."""
    plan = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", max_model_len=32768, hbm_tbps=4.8)
    assert (plan.trunk_ranks, plan.expert_ranks, plan.sequences_per_trunk_gpu) == (16, 16, 101)
    assert sorted((plan.rank_nodes[:16].count(n), plan.rank_nodes[16:].count(n)) for n in range(4)) == [(4, 4)] * 4
    rows = 12 * 101 * 10 * 60 / 16
    expect_ms = (rows * (8192 + 4) + rows * 8192) / 50e9 * 1e3
    assert plan.network_floor_ms == pytest.approx(expect_ms) and round(expect_ms, 2) == 14.90
    assert plan.decode_floor_ms is not None and plan.decode_floor_ms < expect_ms
    assert plan.decode_floor_overlap_ms == pytest.approx(expect_ms)
    old = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", max_model_len=32768, hbm_tbps=4.8, expert_ranks=3)
    assert old.fits and old.trunk_ranks == 29 and old.network_floor_ms is not None and old.network_floor_ms > 140
    # more tokens per second: 16 x 101 / 14.9 ms against 29 x 101 / 146 ms
    assert 16 / expect_ms > 5 * 29 / old.network_floor_ms


def test_given_flags_win_over_the_scan() -> None:
    given = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", max_model_len=32768, hbm_tbps=4.8, expert_ranks=3)
    assert (given.trunk_ranks, given.expert_ranks) == (29, 3) and given.layout_rule.startswith("given X")
    given_d = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", max_model_len=32768, hbm_tbps=4.8, trunk_ranks=26)
    assert (given_d.trunk_ranks, given_d.expert_ranks) == (26, 6) and given_d.layout_rule.startswith("given D")


def test_experts_per_rank_follow_the_contiguous_map() -> None:
    plan = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", trunk_ranks=27)
    m = ExpertMap.contiguous(num_experts=512, num_moe_layers=1, expert_ranks=plan.expert_ranks)
    assert plan.expert_ranks == 5
    assert list(plan.experts_per_rank) == [len(m.experts_of(j)[0]) for j in range(5)] == [103, 103, 102, 102, 102]


def test_given_x_takes_the_rest_as_trunk() -> None:
    plan = _plan(config_397b(fp8=True), fmt="fp8", expert_ranks=4)
    assert (plan.trunk_ranks, plan.expert_ranks, plan.experts_per_rank) == (4, 4, (128,) * 4)


def test_smallest_expert_ranks() -> None:
    assert smallest_expert_ranks(num_experts=16, bytes_per_expert=10, budget_bytes=40) == 4
    assert smallest_expert_ranks(num_experts=16, bytes_per_expert=10, budget_bytes=39) == 6  # ceil(16/5) = 4 > 3
    assert smallest_expert_ranks(num_experts=16, bytes_per_expert=10, budget_bytes=9) is None


def test_redundant_experts_take_slots_on_every_expert_rank() -> None:
    # 512 + 32 = 544 slots; X = 6 and 7 do not divide 544 (X = 6 would hold 91 slots = 130 GiB + 8 > 140),
    # X = 8 does: 68 slots of 1.43 GiB each per expert GPU
    plan = _plan(config_397b(), nodes=2, redundant_experts=32)
    assert (plan.trunk_ranks, plan.expert_ranks, plan.experts_per_rank) == (8, 8, (68,) * 8)
    assert plan.expert_gpu_weight_bytes == 68 * plan.bytes_per_expert
    assert plan.fits and any("32 redundant expert copies" in a for a in plan.assumptions)
    assert smallest_expert_ranks(num_experts=544, bytes_per_expert=1, budget_bytes=544, divides=True) == 1
    assert smallest_expert_ranks(num_experts=544, bytes_per_expert=1, budget_bytes=80, divides=True) == 8  # 7 fits, no


def test_redundant_experts_that_do_not_divide_are_refused() -> None:
    plan = _plan(config_397b(), nodes=2, expert_ranks=6, redundant_experts=32)
    assert not plan.fits and "do not divide" in plan.reason and "544 slots" in plan.reason
    with pytest.raises(ValueError, match="redundant_experts must be >= 0"):
        _plan(config_397b(), nodes=2, redundant_experts=-1)


def test_x0_keeps_every_expert_in_the_trunk() -> None:
    cfg = tiny()
    plan = plan_capacity(
        cfg,
        Topology(nodes=1, gpus_per_node=1, gpu_memory_gib=1.0),
        weight_format="bf16",
        expert_ranks=0,
        max_model_len=4096,
        activation_reserve_gib=0.5,
    )
    assert (plan.trunk_ranks, plan.expert_ranks, plan.experts_per_rank) == (1, 0, ())
    assert plan.trunk_gpu_weight_bytes == plan.total_weight_bytes  # tiny has no vision tower: all of it
    assert plan.fits and plan.sequences_per_trunk_gpu > 0


# ------------------------------------------------------------------------------ refusals
def test_one_node_of_80gib_in_bf16_is_refused() -> None:
    plan = _plan(config_397b(), topology={"gpu_memory_gib": 80.0})
    assert not plan.fits
    assert "too few GPUs" in plan.reason and "11 expert GPUs" in plan.reason and "has 8" in plan.reason


def test_given_x_too_small_for_the_experts() -> None:
    plan = _plan(config_397b(), expert_ranks=2, trunk_ranks=1)
    assert not plan.fits
    assert "experts do not fit: 256 experts per expert GPU" in plan.reason and "X >= 6 would fit" in plan.reason


def test_given_d_and_x_beyond_the_cluster() -> None:
    plan = _plan(config_397b(), trunk_ranks=4, expert_ranks=6)
    assert not plan.fits and "D = 4 + X = 6 = 10 GPUs; the cluster has 8" in plan.reason


def test_trunk_that_does_not_fit() -> None:
    plan = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", topology={"gpu_memory_gib": 20.0})
    assert not plan.fits and "trunk weights do not fit a trunk GPU" in plan.reason


def test_no_room_for_one_sequence() -> None:
    plan = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", topology={"gpu_memory_gib": 22.0})
    assert plan.trunk_cache_bytes > 0 and plan.sequences_per_trunk_gpu == 0
    assert not plan.fits and "no room for even one sequence: 262144 tokens need 8.18 GiB" in plan.reason
    assert _plan(config_397b(fp8=True), nodes=4, fmt="fp8", topology={"gpu_memory_gib": 22.0}, max_model_len=8192).fits


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmt": "int4"}, "weight_format must be one of .* got 'int4'"),
        ({"max_model_len": 0}, r"max_model_len must be in \[1, 262144\].* got 0"),
        ({"max_model_len": 262145}, "got 262145"),
        ({"block_size": 0}, "block_size must be >= 1, got 0"),
        ({"kv_dtype_bytes": 3}, "kv_dtype_bytes must be 1, 2 or 4, got 3"),
        ({"activation_reserve_gib": -1.0}, "activation_reserve_gib must be >= 0, got -1.0"),
        ({"hbm_tbps": 0.0}, "hbm_tbps must be > 0, got 0.0"),
        ({"expert_ranks": 513}, "expert_ranks 513 exceeds num_experts 512"),
        ({"expert_ranks": 0, "trunk_ranks": 2}, "supports one trunk rank"),
        ({"trunk_ranks": 0}, "--trunk-ranks must be >= 1, got 0"),
        ({"topology": {"gpus_per_node": 0, "gpu_memory_gib": 0.0}}, "needs GPUs: gpus_per_node is 0"),
    ],
    ids=["format", "len-0", "len-too-long", "block", "kv-dtype", "reserve", "hbm", "x-gt-e", "x0-d2", "d0", "cpu"],
)
def test_bad_values_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _plan(config_397b(), **kwargs)


# ------------------------------------------------------------------------------ decode floor
def test_decode_floor_matches_the_landscape_figure() -> None:
    """serving_landscape §2.4: FP8 EP16, every expert touched: ~5.1 ms of experts + ~1.8 ms of trunk = 6.9 ms."""
    plan = _plan(config_397b(fp8=True), nodes=4, fmt="fp8", expert_ranks=16, trunk_ranks=8, hbm_tbps=4.8)
    expert_ms = 32 * 60 * (PER_EXPERT + 2 * FP8_SCALES_PER_EXPERT) / 4.8e12 * 1e3
    assert plan.decode_expert_stream_bytes / 4.8e12 * 1e3 == pytest.approx(expert_ms)
    assert abs(expert_ms - (6.9 - 1.8)) < 0.1
    assert plan.decode_floor_ms is not None and abs(plan.decode_floor_ms - 6.9) < 0.3
    assert plan.decode_floor_ms == pytest.approx(
        (plan.decode_trunk_stream_bytes + plan.decode_expert_stream_bytes) / 4.8e12 * 1e3
    )
    g = plan.weight_bytes
    assert plan.decode_trunk_stream_bytes == g["lm_head"] + g["layers"]  # no embed table, vision or MTP
    assert plan.decode_floor_with_cache_ms == pytest.approx(
        plan.decode_floor_ms + plan.sequences_per_trunk_gpu * plan.bytes_per_sequence / 4.8e12 * 1e3
    )


def test_no_floor_without_bandwidth() -> None:
    plan = _plan(config_397b())
    assert plan.decode_floor_ms is None and plan.decode_floor_with_cache_ms is None


# ------------------------------------------------------------------------------ CLI (subprocess)
def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = "from epserve.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "plan", *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plan") / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config_397b()))
    return d


def test_cli_json_when_it_fits(model_dir: Path) -> None:
    out = _cli(
        "--model",
        str(model_dir),
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gib",
        "140",
        "--weight-format",
        "fp8",
        "--max-model-len",
        "32768",
        "--hbm-tbps",
        "4.8",
        "--output",
        "json",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in (
        "model",
        "weight_format",
        "trunk_ranks",
        "expert_ranks",
        "experts_per_rank",
        "weight_bytes",
        "trunk_gpu_weight_bytes",
        "expert_gpu_weight_bytes",
        "trunk_cache_bytes",
        "kv_bytes_per_token",
        "state_bytes_per_slot",
        "bytes_per_sequence",
        "sequences_per_trunk_gpu",
        "sequences_total",
        "decode_floor_ms",
        "decode_floor_with_cache_ms",
        "fits",
        "reason",
        "assumptions",
        "total_gpus",
        "gpus_used",
        "total_weight_bytes",
    ):
        assert key in data, key
    assert data["fits"] is True and data["weight_format"] == "fp8"
    # the scan's choice (RESULTS-plan.md: 12.14 ms, 66.6k tok/s against X = 3's 46.44 ms, 28.3k)
    assert (data["trunk_ranks"], data["expert_ranks"]) == (8, 8)
    assert any("ASSUMED" in a for a in data["assumptions"])  # fp8 from a bf16 config


def test_cli_refuses_with_reason_and_exit_1(model_dir: Path) -> None:
    out = _cli("--model", str(model_dir / "config.json"), "--gpu-memory-gib", "80", "--max-model-len", "262144")
    assert out.returncode == 1
    assert out.stderr.startswith("epserve plan: error: does not fit: too few GPUs")
    assert "fits         NO: too few GPUs" in out.stdout


def test_cli_bad_value_exit_2(model_dir: Path) -> None:
    out = _cli("--model", str(model_dir), "--gpu-memory-gib", "140", "--max-model-len", "0")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "epserve plan: error: max_model_len must be in [1, 262144] (the model's max_position_embeddings), got 0"
    )


# Invocations `epserve plan` accepted (exit 0) before placement by traffic (checked against commit 648b3d9): the new
# flags have defaults, so each must still be accepted, and now prints the placement and the network floor.
PREVIOUSLY_ACCEPTED = [
    ["--model", "Qwen3.5-397B-A17B", "--gpu-memory-gib", "140"],
    ["--model", "Qwen3.5-397B-A17B", "--gpu-memory-gib", "140", "--nodes", "4", "--hbm-tbps", "4.8"],
    [
        "--model",
        "Qwen3.5-397B-A17B",
        "--gpu-memory-gib",
        "140",
        "--nodes",
        "2",
        "--weight-format",
        "bf16",
        "--max-model-len",
        "32768",
    ],  # fmt: skip
    [
        "--model",
        "Qwen3.5-397B-A17B",
        "--gpu-memory-gib",
        "140",
        "--nodes",
        "4",
        "--trunk-ranks",
        "16",
        "--expert-ranks",
        "16",
        "--weight-format",
        "fp8",
        "--hbm-tbps",
        "4.8",
    ],  # fmt: skip
    [
        "--model",
        "Qwen3.5-397B-A17B",
        "--gpu-memory-gib",
        "140",
        "--nodes",
        "2",
        "--redundant-experts",
        "16",
        "--output",
        "json",
    ],  # fmt: skip
    ["--model", "Qwen3.5-397B-A17B", "--gpu-memory-gib", "140", "--nodes", "2", "--trunk-ranks", "4"],
    ["--model", "Qwen3.5-397B-A17B", "--gpu-memory-gib", "140", "--gpus-per-node", "4", "--nodes", "3"],
    ["--model", "Qwen3.5-35B-A3B-FP8", "--gpu-memory-gib", "140", "--expert-ranks", "0"],
    ["--model", "Qwen3.5-35B-A3B-FP8", "--gpu-memory-gib", "80", "--nodes", "2", "--hbm-tbps", "3.35"],
]


@pytest.mark.parametrize("argv", PREVIOUSLY_ACCEPTED, ids=lambda a: " ".join(a[1:]))
def test_cli_still_accepts_what_it_accepted(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from epserve.cli import main

    assert main(["plan", *argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if "--output" in argv:
        data = json.loads(out)
        assert data["network_floor_ms"] > 0 and len(data["rank_nodes"]) == data["gpus_used"]
    elif "--expert-ranks" in argv and argv[argv.index("--expert-ranks") + 1] == "0":
        assert "placement    node 0: trunk 0" in out and "network floor" not in out  # no exchange at X = 0
    else:
        assert "placement    node 0:" in out and "network floor" in out
        assert ("decode floor" in out) == ("--hbm-tbps" in argv)


def test_cli_link_flags(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In-process (`main`), as the subprocess tests above already prove the entry point."""
    from epserve.cli import main

    base = ["plan", "--model", str(model_dir), "--nodes", "2", "--gpu-memory-gib", "140", "--max-model-len", "32768"]

    def run(*extra: str) -> tuple[int, str, str]:
        rc = main([*base, *extra])
        out = capsys.readouterr()
        return rc, out.out, out.err

    slow = json.loads(run("--output", "json", "--nic-gbps", "200", "--decode-batch", "10")[1])
    fast = json.loads(run("--output", "json", "--nic-gbps", "400", "--decode-batch", "20")[1])
    assert slow["network_floor_ms"] == pytest.approx(fast["network_floor_ms"])  # half the bytes at half the speed
    assert (slow["nic_gbps"], slow["decode_tokens_per_trunk"]) == (200.0, 10)
    rc, _, err = run("--nvlink-gbps", "0")
    assert rc == 2 and err.strip() == "epserve plan: error: nvlink_gbps must be > 0, got 0.0"
    rc, _, err = run("--decode-batch", "-1")
    assert rc == 2 and "decode_tokens_per_trunk must be >= 0, got -1" in err
