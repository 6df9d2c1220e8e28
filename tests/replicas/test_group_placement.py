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


@pytest.mark.slow  # a Serve app start (~1 min on CI's cores); the AppArgs/bundle test in test_app_args.py is fast
def test_serve_replica_places_its_ranks_by_plan(serve_http: str, embedded_model_dir: Path) -> None:
    """`group_nodes` 2 with D = 1, X = 1: the trunk in the replica's bundle (node 0), the expert on another node;
    the app answers a chat request through both."""
    import openai
    from ray import serve
    from ray._private.state import actors as actor_table

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="placed",
        dtype="float32",
        trunk_ranks=1,
        expert_ranks=1,
        group_nodes=2,
        cpus_per_rank=0.5,
        num_kv_blocks=64,
        max_num_seqs=4,
        max_model_len=512,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    assert args.group_rank_nodes() == (0, 1)
    serve.run(build_app(args), name="placed", route_prefix="/placed")
    try:
        client = openai.OpenAI(base_url=serve_http + "/placed/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(
            model="placed", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert out.choices[0].message.content is not None
        alive = [a for a in actor_table().values() if a["State"] == "ALIVE"]

        def node_of(part: str) -> str:
            (hit,) = [a["Address"]["NodeID"] for a in alive if part in (a.get("Name") or "")]
            return hit

        replica, trunk, expert = node_of("placed#EpserveEngine"), node_of("-trunk0-"), node_of("-expert0-")
        assert trunk == replica  # node 0's bundle holds the replica and the trunk rank
        assert expert != trunk  # node 1: another Ray node
    finally:
        serve.delete("placed")
