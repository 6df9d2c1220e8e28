"""A multi-node Ray cluster on loopback for development and tests (`ray.cluster_utils.Cluster`).

Every node is its own raylet with its own resources; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
they register as 127.0.0.1 (design.md). Token authentication stays at Ray's default (on).
Shut it down through `shutdown()` only: never `ray stop`, which ends every Ray process on the machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class LocalCluster:
    """Handle of a started local cluster."""

    address: str
    nodes: int
    _cluster: object = field(repr=False)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self._cluster.shutdown()  # type: ignore[attr-defined]  # ray.cluster_utils.Cluster


def start_local_cluster(
    nodes: int, *, cpus_per_node: int = 2, connect: bool = True, head_resources: dict[str, float] | None = None,
    object_store_mb: int = 256,
) -> LocalCluster:
    """Start `nodes` Ray nodes on 127.0.0.1 (the first is the head) and optionally connect this process.

    Args:
        cpus_per_node: logical CPUs each node advertises (scheduling slots, not real cores).
        head_resources: extra custom resources of the head node.
    """
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    for k, v in LOOPBACK_ENV.items():
        os.environ[k] = v  # inherited by every raylet and worker started below
    already_imported = "ray" in sys.modules
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if already_imported:
        # Ray reads the variable once, at import: make this driver process agree with its nodes.
        ray_constants.ENABLE_RAY_CLUSTER = False

    store = object_store_mb * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus_per_node, "resources": dict(head_resources or {}),
                        "object_store_memory": store, "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node, object_store_memory=store)
    cluster.wait_for_nodes()
    if connect:
        ray.init(address=cluster.address, log_to_driver=False)
    return LocalCluster(address=cluster.address, nodes=nodes, _cluster=cluster)
