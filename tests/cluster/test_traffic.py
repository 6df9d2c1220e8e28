"""All-to-all traffic per decode step, the network floor, and placement by traffic (cluster/traffic.py).

Proves: `step_traffic` gives hand-computed bytes on every directional link (NIC vs NVLink by node,
dispatch rows carry a 4-byte id, combine rows do not); the network floor is the busiest dispatch
link plus the busiest combine link; `expert_shares` splits a redundant expert's rows over its
copies; `place_by_traffic` reaches the brute-force optimum (every assignment of ranks to nodes)
on small cases, halves the busiest link of the docstring's worked example, keeps rank order with
X = 0 and refuses groups larger than the cluster; `plan_placement(rank_nodes=...)` builds one bundle
per node (the replica's resources in node 0's) under STRICT_SPREAD; the capacity plan's network
floor of the real 397B shape equals a hand formula and the decode floor is max(HBM, network).
Oracles: hand arithmetic and exhaustive search, never the code's own output.
"""

from __future__ import annotations

import itertools

import pytest

from cluster.capacity import plan_capacity
from cluster.placement import ExpertMap, plan_placement
from cluster.topology import GroupShape, Topology
from cluster.traffic import (
    LinkSpeeds,
    expert_shares,
    network_floor_s,
    place_by_traffic,
    rank_order_nodes,
    step_traffic,
)
from model_shards.config import from_hf_config
from tests.cluster.test_capacity import config_397b

pytestmark = pytest.mark.timeout(120)

SPEEDS = LinkSpeeds(nic_gbps=400.0, nvlink_gbps=3600.0)
NIC_BPS, NVL_BPS = 50e9, 450e9


# ------------------------------------------------------------------------------ bytes per link
def test_known_bytes_one_trunk_and_one_expert_per_node() -> None:
    """D = 2, X = 2, node 0 = trunk 0 + expert 0, node 1 = trunk 1 + expert 1; 3 tokens, top-2, 5 layers."""
    shape = GroupShape(trunk_ranks=2, expert_ranks=2)
    t = step_traffic(shape, (0, 1, 0, 1), (0.5, 0.5), tokens_per_trunk=3, top_k=2, moe_layers=5, hidden=8)
    rows = 3 * 2 * 5 * 0.5  # rows one trunk sends one expert rank per step: 15
    out_b, back_b = 8 * 2 + 4, 8 * 2  # bf16 row + int32 id; answer rows carry no id
    trunk0, trunk1, expert0, expert1 = t
    assert (trunk0.role, expert1.role, expert1.node) == ("trunk", "expert", 1)
    for tr in (trunk0, trunk1):
        assert (tr.nic_out, tr.nvlink_out) == (rows * out_b, rows * out_b)  # half to the local expert, half away
        assert (tr.nic_in, tr.nvlink_in) == (rows * back_b, rows * back_b)
    for ex in (expert0, expert1):
        assert (ex.nic_in, ex.nvlink_in) == (rows * out_b, rows * out_b)
        assert (ex.nic_out, ex.nvlink_out) == (rows * back_b, rows * back_b)
    # dispatch: busiest link = a NIC carrying 15 x 20 B; combine: 15 x 16 B over a NIC
    assert network_floor_s(t, SPEEDS) == pytest.approx(rows * out_b / NIC_BPS + rows * back_b / NIC_BPS)


def test_all_on_one_node_uses_only_nvlink() -> None:
    shape = GroupShape(trunk_ranks=1, expert_ranks=3)
    t = step_traffic(shape, (0, 0, 0, 0), (0.5, 0.25, 0.25), tokens_per_trunk=4, top_k=1, moe_layers=1, hidden=2)
    assert all(r.nic_in == r.nic_out == 0 for r in t)
    assert [r.nvlink_in for r in t[1:]] == [2 * 8, 1 * 8, 1 * 8]  # 4 rows split 2/1/1, 2 x 2 B + 4 B each
    assert network_floor_s(t, SPEEDS) == pytest.approx((4 * 8) / NVL_BPS + (4 * 4) / NVL_BPS)  # the trunk's port


def test_shares_split_redundant_copies() -> None:
    m = ExpertMap.explicit([0, 0, [0, 1], 1], num_moe_layers=1, expert_ranks=2)
    assert expert_shares(m) == pytest.approx((0.625, 0.375))  # 2 + 1/2 of 4 experts, 1 + 1/2
    assert expert_shares(ExpertMap.contiguous(num_experts=10, num_moe_layers=1, expert_ranks=3)) == pytest.approx(
        (0.4, 0.3, 0.3)
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nic_gbps": 0}, "nic_gbps must be > 0, got 0"), ({"nvlink_gbps": -1}, "nvlink_gbps must be > 0, got -1")],
    ids=["nic", "nvlink"],
)
def test_bad_speeds(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkSpeeds(**kwargs)


def test_traffic_refuses_a_wrong_layout() -> None:
    with pytest.raises(ValueError, match=r"names 3 ranks; the group has D \+ X = 4"):
        step_traffic(GroupShape(2, 2), (0, 0, 1), (0.5, 0.5), tokens_per_trunk=1, top_k=1, moe_layers=1, hidden=1)


# ------------------------------------------------------------------------------ placement
def _floor(shape: GroupShape, nodes: tuple[int, ...], shares: tuple[float, ...]) -> float:
    t = step_traffic(shape, nodes, shares, tokens_per_trunk=7, top_k=3, moe_layers=2, hidden=16)
    return network_floor_s(t, SPEEDS)


def _brute_force(shape: GroupShape, nodes: int, slots: int, shares: tuple[float, ...]) -> float:
    best = float("inf")
    for a in itertools.product(range(nodes), repeat=shape.world_size):
        if all(a.count(n) <= slots for n in range(nodes)):
            best = min(best, _floor(shape, a, shares))
    return best


@pytest.mark.parametrize(
    ("d", "x", "nodes", "slots"),
    [(4, 2, 2, 4), (3, 3, 2, 4), (2, 4, 2, 4), (5, 3, 3, 3), (6, 2, 3, 3), (1, 3, 2, 2), (4, 4, 2, 5), (2, 2, 4, 1)],
)
def test_matches_brute_force(d: int, x: int, nodes: int, slots: int) -> None:
    shape = GroupShape(trunk_ranks=d, expert_ranks=x)
    shares = (1.0 / x,) * x
    placed = place_by_traffic(shape, nodes=nodes, slots_per_node=slots, speeds=SPEEDS)
    assert all(placed.count(n) <= slots for n in range(nodes))
    assert _floor(shape, placed, shares) == pytest.approx(_brute_force(shape, nodes, slots, shares), rel=1e-12)


def test_uneven_shares_stay_near_brute_force() -> None:
    """10 experts over 3 ranks (4/3/3): the planner assumes equal shares; within the share spread of optimal."""
    shape = GroupShape(trunk_ranks=3, expert_ranks=3)
    shares = (0.4, 0.3, 0.3)
    placed = place_by_traffic(shape, nodes=2, slots_per_node=4, speeds=SPEEDS)
    assert _floor(shape, placed, shares) <= _brute_force(shape, 2, 4, shares) * (0.4 / (1 / 3)) + 1e-18


def test_worked_example_halves_the_busiest_link() -> None:
    shape = GroupShape(trunk_ranks=4, expert_ranks=2)
    packed = rank_order_nodes(shape, 4)
    assert packed == (0, 0, 0, 0, 1, 1)
    placed = place_by_traffic(shape, nodes=2, slots_per_node=4, speeds=SPEEDS)
    assert sorted((placed[:4].count(n), placed[4:].count(n)) for n in (0, 1)) == [(2, 1), (2, 1)]
    assert _floor(shape, placed, (0.5, 0.5)) == pytest.approx(_floor(shape, packed, (0.5, 0.5)) / 2)


def test_one_node_or_no_experts_keeps_rank_order() -> None:
    assert place_by_traffic(GroupShape(1, 0), nodes=2, slots_per_node=4) == (0,)
    assert place_by_traffic(GroupShape(3, 2), nodes=1, slots_per_node=8) == (0,) * 5


def test_group_larger_than_the_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs 9 slots \(D=5 \+ X=4\), 2 node\(s\) x 4 have 8"):
        place_by_traffic(GroupShape(5, 4), nodes=2, slots_per_node=4)


# ------------------------------------------------------------------------------ bundles per node
def test_node_bundles_hold_each_nodes_ranks() -> None:
    shape = GroupShape(trunk_ranks=4, expert_ranks=2)
    gpus = Topology(nodes=2, gpus_per_node=4, gpu_memory_gib=80.0)
    p = plan_placement(shape, gpus, replica_bundle={"CPU": 1.0}, rank_nodes=(0, 0, 1, 1, 0, 1))
    assert p.bundles == ({"GPU": 3.0, "CPU": 4.0}, {"GPU": 3.0, "CPU": 3.0})
    assert p.strategy == "STRICT_SPREAD"
    assert [p.bundle_of(r) for r in range(6)] == [0, 0, 1, 1, 0, 1]
    one = plan_placement(GroupShape(1, 1), Topology(nodes=1), rank_nodes=(0, 0), cpus_per_rank=0.5)
    assert one.bundles == ({"CPU": 1.0},) and one.strategy == "STRICT_PACK"


@pytest.mark.parametrize(
    ("rank_nodes", "match"),
    [
        ((0, 0, 1), "names 3 ranks; the group has 4"),
        ((0, 0, 2, 2), r"nodes 0..1 each at least once, got \[0, 2\]"),
        ((0, 1, 2, 0), "uses 3 nodes; the cluster has 2"),
        ((0, 0, 0, 1), "puts 3 ranks on node 0; a node has 2 GPUs"),
    ],
    ids=["length", "gap", "too-many-nodes", "too-many-ranks"],
)
def test_node_bundles_refuse_bad_layouts(rank_nodes: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_placement(GroupShape(2, 2), Topology(nodes=2, gpus_per_node=2, gpu_memory_gib=80.0), rank_nodes=rank_nodes)


# ------------------------------------------------------------------------------ the capacity plan
def test_397b_bf16_two_nodes_network_floor_by_hand(tmp_path) -> None:  # noqa: ANN001  # pytest's tmp_path
    """bf16, 2 x 8 x 140 GiB, 32k, X = 6 given (the smallest that fits; D = 10): 86, 86, 85 x 4 experts; by
    traffic each node holds 5 trunks + 3 experts. Busiest link: expert rank 0's NIC, receiving 5 remote trunks'
    95 tokens x top-10 x 60 layers x 86/512 rows of (4096 x 2 + 4) B in dispatch, sending them back (4096 x 2 B)
    in combine."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(config_397b()))
    cfg = from_hf_config(tmp_path)
    plan = plan_capacity(
        cfg,
        Topology(nodes=2, gpus_per_node=8, gpu_memory_gib=140.0),
        weight_format="bf16",
        expert_ranks=6,
        max_model_len=32768,
        hbm_tbps=4.8,
    )
    assert (plan.trunk_ranks, plan.expert_ranks, plan.sequences_per_trunk_gpu) == (10, 6, 95)
    nodes = plan.rank_nodes
    assert sorted((nodes[:10].count(n), nodes[10:].count(n)) for n in (0, 1)) == [(5, 3), (5, 3)]
    rows = 5 * 95 * 10 * 60 * 86 / 512
    expect_ms = (rows * (8192 + 4) / NIC_BPS + rows * 8192 / NIC_BPS) * 1e3
    assert plan.network_floor_ms == pytest.approx(expect_ms)
    # rank order: node 0 = trunks 0-7, node 1 = trunks 8-9 + experts: expert 0 hears 8 remote trunks
    assert plan.network_floor_rank_order_ms == pytest.approx(expect_ms * 8 / 5)
    assert plan.decode_floor_ms is not None
    assert plan.decode_floor_overlap_ms == pytest.approx(max(plan.decode_floor_ms, expect_ms))
    assert plan.decode_floor_lockstep_ms == pytest.approx(plan.decode_floor_ms + expect_ms)
    # a smaller decode batch scales the traffic, not the placement
    small = plan_capacity(
        cfg,
        Topology(nodes=2, gpus_per_node=8, gpu_memory_gib=140.0),
        weight_format="bf16",
        expert_ranks=6,
        max_model_len=32768,
        decode_tokens_per_trunk=19,
        nic_gbps=800.0,
    )
    assert small.rank_nodes == nodes and small.decode_floor_overlap_ms is None  # no HBM figure without --hbm-tbps
    assert small.network_floor_ms == pytest.approx(expect_ms * 19 / 95 / 2)
