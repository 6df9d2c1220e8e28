"""A lost node: the node holding a group's expert ranks leaves the Ray cluster, and the group rebuilds on a replacement.

One D = 1 x X = 2 group on the shared local Ray cluster, in a placement group of one bundle per rank whose expert
bundles need a custom resource that only one added node has (so both expert ranks land there, the trunk rank on
another node). That node is removed without warning (`Cluster.remove_node(allow_graceful=False)`: its raylet and
rank processes die at once, as a machine that loses power), a replacement node with the same resource joins, and
Ray reschedules the lost node's bundles of the placement group onto it. The next step fails with both expert ranks
dead; `rebuild` replaces exactly them (fresh actors in their own bundles, now on the replacement node) and keeps the
trunk rank's process and its one weight load. Oracle: the single-process model on the same inputs, through the
rebuilt group (tests/replicas/test_group.py's `_Reference` / `_Scenario`: logprobs within 1e-4, same greedy tokens).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.topology import GroupShape
from tests.replicas.test_failures import _loads, _pids, _serves_like_reference
from tests.replicas.test_group import BLOCK, _Reference

# 1.5-4 min on a shared 2-core machine (Ray nodes start, three rank processes load, two more after the loss)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LOST = "epserve_test_lost_node"  # the custom resource of the node that will be lost, and of its replacement
CPUS = 0.5


def _node_of(actor) -> str:  # noqa: ANN001  # a Ray actor handle
    from ray._private.state import actors as actor_table  # GCS actor table: no dashboard in the local cluster

    return actor_table(actor._actor_id.hex())["Address"]["NodeID"]


def test_group_rebuilds_on_a_replacement_node(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig, GroupFailure

    cluster = ray_cluster._cluster  # ray.cluster_utils.Cluster of the session's local cluster
    shape = GroupShape(trunk_ranks=1, expert_ranks=2)
    doomed = cluster.add_node(num_cpus=2 * CPUS, resources={LOST: 1.0})
    replacement = None
    # the trunk's bundle cannot go to the doomed node: the two expert bundles take all of its CPUs
    bundles = [{"CPU": CPUS}] + [{"CPU": CPUS, LOST: 0.5}] * shape.expert_ranks
    pg = placement_group(bundles, strategy="PACK")
    group = None
    try:
        ray.get(pg.ready(), timeout=60)
        config = GroupConfig(
            model_dir=str(hf_checkpoint),
            shape=shape,
            dtype="float32",
            deadline_s=60.0,  # NCCL-like: peers of a dead rank would wait this long; the loss must be seen sooner
            caches=CacheSizes(128, BLOCK, 8),
            cpus_per_rank=CPUS,
        )
        group = ExpertParallelGroup(config, placement=pg)
        group.start()
        reference = _Reference(hf_checkpoint)
        trunk, experts = shape.trunk_rank(0), (shape.expert_rank(0), shape.expert_rank(1))
        assert {_node_of(e) for e in group.experts} == {doomed.node_id}
        assert _node_of(group.trunks[0]) != doomed.node_id
        _serves_like_reference(group, reference, seed=51)
        pids = _pids(group)

        cluster.remove_node(doomed, allow_graceful=False)
        with pytest.raises(GroupFailure) as info:
            _serves_like_reference(group, reference, seed=52)
        # both expert ranks are blamed (dead, or not answering), not left as collateral to be waited on
        assert info.value.failed_ranks == experts, str(info.value)

        t_lost = time.monotonic()
        replacement = cluster.add_node(num_cpus=2 * CPUS, resources={LOST: 1.0})
        group.rebuild()  # the fresh expert actors wait for their bundles, which Ray reschedules on the new node
        assert group.last_recovery["replaced"] == list(experts) and group.last_recovery["kept"] == [trunk]
        assert {_node_of(e) for e in group.experts} == {replacement.node_id}
        assert placement_group_table(pg)["state"] == "CREATED"
        assert _pids(group)[trunk] == pids[trunk] and _loads(group)[trunk] == 1  # the trunk kept its weights
        _serves_like_reference(group, reference, seed=53)
        print(f"lost node: seen in {info.value.detect_s:.1f} s, serving again {time.monotonic() - t_lost:.1f} s later")
    finally:
        if group is not None:
            group.shutdown()
        remove_placement_group(pg)
        for node in (doomed, replacement):
            if node is not None and node in cluster.list_all_nodes():
                cluster.remove_node(node)
