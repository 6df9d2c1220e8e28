"""Ranks land on the nodes the plan names (local multi-node Ray cluster, token auth on).

Proves: a placement group from `plan_placement(rank_nodes=...)` (one bundle per plan node,
STRICT_SPREAD) puts every rank actor on the Ray node of its plan node, plan nodes on distinct Ray
nodes; and (slow) `ExpertParallelGroup` with `GroupConfig.rank_nodes` creates its rank actors
there and serves its canary step across the nodes. Oracle: the node each actor reports (GCS actor table /
`get_node_id` inside the actor) against the plan, which comes from `place_by_traffic`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.placement import plan_placement
from cluster.topology import GroupShape, Topology
from cluster.traffic import place_by_traffic

pytestmark = pytest.mark.timeout(300)


def _same_partition(plan: tuple[int, ...], actual: list[str]) -> None:
    """Ranks share a Ray node exactly when they share a plan node."""
    to_ray = {}
    for r, n in enumerate(plan):
        assert to_ray.setdefault(n, actual[r]) == actual[r], f"rank {r} of plan node {n} on another Ray node"
    assert len(set(to_ray.values())) == len(to_ray), f"two plan nodes on one Ray node: {to_ray}"


def test_bundles_put_ranks_on_the_planned_nodes(ray_cluster) -> None:  # noqa: ANN001  # session fixture
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    shape = GroupShape(trunk_ranks=3, expert_ranks=3)
    plan = place_by_traffic(shape, nodes=3, slots_per_node=2)
    assert sorted((plan[:3].count(n), plan[3:].count(n)) for n in range(3)) == [(1, 1)] * 3  # a trunk + an expert
    layout = plan_placement(shape, Topology(nodes=3), cpus_per_rank=0.25, rank_nodes=plan)
    pg = placement_group(list(layout.bundles), strategy=layout.strategy)
    ray.get(pg.ready(), timeout=60)

    @ray.remote(num_cpus=0.25)
    class Rank:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actors = []
    try:
        for r in range(shape.world_size):
            where = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=layout.bundle_of(r))
            actors.append(Rank.options(scheduling_strategy=where).remote())
        _same_partition(plan, ray.get([a.node.remote() for a in actors], timeout=60))
    finally:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)


@pytest.mark.slow  # ~30 s of weight loading and a canary step on CI's cores; the bundle test above is the fast variant
def test_group_ranks_land_on_the_planned_nodes(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    from ray._private.state import actors as actor_table  # GCS actor table: no dashboard in the local cluster

    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    shape = GroupShape(trunk_ranks=1, expert_ranks=2)
    plan = place_by_traffic(shape, nodes=2, slots_per_node=2)
    assert plan == (0, 0, 1)  # the trunk beside one expert; the other expert alone
    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(hf_checkpoint),
            shape=shape,
            dtype="float32",
            deadline_s=20.0,
            caches=CacheSizes(16, 16, 2),
            cpus_per_rank=0.5,
            rank_nodes=plan,
        )
    )
    try:
        group.start()  # loads the ranks and runs the canary step through every exchange
        nodes = [actor_table(a._actor_id.hex())["Address"]["NodeID"] for a in group.trunks + group.experts]
        _same_partition(plan, nodes)
    finally:
        group.shutdown()
