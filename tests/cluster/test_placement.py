"""Placement and expert maps: pure functions, no Ray.

Proves: GPU groups get one GPU per rank in rank order (trunk ranks, then expert ranks) with the
Serve replica's bundle first when given; CPU groups get CPU slots spread over nodes; the
contiguous expert map splits evenly and unevenly (first E % X ranks one more); explicit maps
carry redundant copies and per-layer maps; `route_table` pads copies; every bad input raises
ValueError naming the value. Oracle: hand-written expected bundles and owner lists.
"""

from __future__ import annotations

import pytest
import torch

from cluster.placement import ExpertMap, GroupPlacement, plan_placement
from cluster.topology import GroupShape, Topology

GPU_NODE = Topology(nodes=2, gpus_per_node=4, gpu_memory_gib=80.0)
CPU_NODES = Topology(nodes=3, cpus_per_node=4)


# ------------------------------------------------------------------------------ bundles
def test_gpu_bundles_one_gpu_per_rank_in_rank_order() -> None:
    shape = GroupShape(trunk_ranks=2, expert_ranks=4)
    placement = plan_placement(shape, GPU_NODE)
    assert placement.bundles == tuple({"GPU": 1.0, "CPU": 1.0} for _ in range(6))
    assert placement.strategy == "PACK"
    assert placement.first_rank_bundle == 0
    assert [placement.bundle_of(r) for r in range(6)] == list(range(6))
    assert shape.expert_global_ranks == (2, 3, 4, 5)
    assert (shape.trunk_rank(1), shape.expert_rank(0)) == (1, 2)


def test_replica_bundle_comes_first() -> None:
    shape = GroupShape(trunk_ranks=1, expert_ranks=2)
    placement = plan_placement(shape, GPU_NODE, replica_bundle={"CPU": 2.0}, cpus_per_rank=3.0)
    assert placement.bundles[0] == {"CPU": 2.0}
    assert placement.bundles[1:] == tuple({"GPU": 1.0, "CPU": 3.0} for _ in range(3))
    assert placement.first_rank_bundle == 1
    assert placement.bundle_of(0) == 1 and placement.bundle_of(2) == 3


def test_cpu_bundles_are_cpu_slots_spread() -> None:
    placement = plan_placement(GroupShape(trunk_ranks=2, expert_ranks=3), CPU_NODES, cpus_per_rank=0.5)
    assert placement.bundles == tuple({"CPU": 0.5} for _ in range(5))
    assert all("GPU" not in b for b in placement.bundles)
    assert placement.strategy == "SPREAD"


def test_explicit_strategy_wins() -> None:
    assert plan_placement(GroupShape(1, 1), CPU_NODES, strategy="STRICT_SPREAD").strategy == "STRICT_SPREAD"


def test_group_bigger_than_the_cluster_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs 9 GPUs \(D=1 \+ X=8\).*has 8"):
        plan_placement(GroupShape(trunk_ranks=1, expert_ranks=8), GPU_NODE)


def test_exactly_the_cluster_fits() -> None:
    placement = plan_placement(GroupShape(trunk_ranks=2, expert_ranks=6), GPU_NODE)
    assert isinstance(placement, GroupPlacement) and len(placement.bundles) == 8


@pytest.mark.parametrize(
    ("d", "x", "match"),
    [
        (0, 2, "--trunk-ranks must be >= 1, got 0"),
        (1, -1, "--expert-ranks must be >= 0, got -1"),
        (2, 0, "supports one trunk rank"),
    ],
    ids=["no-trunk", "negative-experts", "x0-with-two-trunks"],
)
def test_group_shape_errors(d: int, x: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GroupShape(trunk_ranks=d, expert_ranks=x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, "nodes must be >= 1, got 0"),
        ({"nodes": 1, "gpus_per_node": -1}, "must be >= 0"),
        ({"nodes": 1, "gpus_per_node": 8}, "gpu_memory_gib > 0"),
    ],
    ids=["no-nodes", "negative-gpus", "gpus-without-memory"],
)
def test_topology_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Topology(**kwargs)


# ------------------------------------------------------------------------------ expert maps
def test_contiguous_even_split() -> None:
    m = ExpertMap.contiguous(num_experts=16, num_moe_layers=3, expert_ranks=4)
    assert m.num_moe_layers == 3
    assert m.experts_of(0) == [[0, 1, 2, 3]] * 3
    assert m.experts_of(3) == [[12, 13, 14, 15]] * 3
    assert all(ranks == (e // 4,) for layer in m.owners for e, ranks in enumerate(layer))


def test_contiguous_uneven_split_gives_first_ranks_one_more() -> None:
    m = ExpertMap.contiguous(num_experts=10, num_moe_layers=2, expert_ranks=4)
    per_rank = [m.experts_of(j)[0] for j in range(4)]
    assert per_rank == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert sorted(e for ids in per_rank for e in ids) == list(range(10))  # each expert exactly once


def test_contiguous_512_over_6_ranks() -> None:
    m = ExpertMap.contiguous(num_experts=512, num_moe_layers=1, expert_ranks=6)
    assert [len(m.experts_of(j)[0]) for j in range(6)] == [86, 86, 85, 85, 85, 85]


@pytest.mark.parametrize(
    ("x", "match"),
    [(0, "at least one expert rank"), (17, "17 expert ranks for 16 experts")],
    ids=["zero-ranks", "more-ranks-than-experts"],
)
def test_contiguous_errors(x: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExpertMap.contiguous(num_experts=16, num_moe_layers=1, expert_ranks=x)


def test_explicit_map_with_redundant_copies() -> None:
    m = ExpertMap.explicit([0, [0, 1], 1, [1, 0]], num_moe_layers=2, expert_ranks=2)
    assert m.owners[0] == ((0,), (0, 1), (1,), (1, 0))
    assert m.owners[1] == m.owners[0]
    assert m.experts_of(0) == [[0, 1, 3]] * 2
    assert m.experts_of(1) == [[1, 2, 3]] * 2


def test_explicit_per_layer_maps_differ_by_layer() -> None:
    m = ExpertMap.explicit_per_layer([[0, 0, 1, 1], [1, 1, 0, 0]], expert_ranks=2)
    assert m.experts_of(0) == [[0, 1], [2, 3]]
    assert m.experts_of(1) == [[2, 3], [0, 1]]


def test_route_table_pads_copies_with_the_first_rank() -> None:
    m = ExpertMap.explicit([0, [0, 1], [2, 1, 0], 2], num_moe_layers=1, expert_ranks=3)
    table, copies = m.route_table(0)
    assert torch.equal(table, torch.tensor([[0, 0, 0], [0, 1, 0], [2, 1, 0], [2, 2, 2]]))
    assert torch.equal(copies, torch.tensor([1, 2, 3, 1]))
    assert table.dtype == torch.long and copies.dtype == torch.long


def test_route_table_of_a_contiguous_map_has_one_column() -> None:
    table, copies = ExpertMap.contiguous(num_experts=8, num_moe_layers=2, expert_ranks=2).route_table(1)
    assert table.squeeze(1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert copies.tolist() == [1] * 8


def test_expert_without_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="expert 1 of MoE layer 0 has no expert rank"):
        ExpertMap.explicit([0, [], 1], num_moe_layers=1, expert_ranks=2)


def test_rank_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expert 2 of MoE layer 1 maps to ranks \[5\], outside \[0, 2\)"):
        ExpertMap.explicit_per_layer([[0, 1, 1], [0, 1, 5]], expert_ranks=2)


def test_negative_rank_is_refused() -> None:
    with pytest.raises(ValueError, match=r"maps to ranks \[-1\]"):
        ExpertMap.explicit([0, -1], num_moe_layers=1, expert_ranks=2)


def test_rank_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lists a rank twice: \[1, 1\]"):
        ExpertMap.explicit([0, [1, 1]], num_moe_layers=1, expert_ranks=2)


def test_per_layer_maps_must_cover_every_expert() -> None:
    with pytest.raises(ValueError, match=r"lengths \[3, 4\]"):
        ExpertMap.explicit_per_layer([[0, 1, 1], [0, 1, 1, 0]], expert_ranks=2)
