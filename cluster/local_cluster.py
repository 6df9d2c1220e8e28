"""A multi-node Ray cluster on loopback for development and tests (`ray.cluster_utils.Cluster`).

Every node is its own raylet with its own resources; with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
they register as 127.0.0.1 (design.md). Token authentication is on: every cluster gets its own
token (cluster/ray_auth.py), which `ray.cluster_utils.Cluster` would not do by itself.
Shut it down through `shutdown()` only: never `ray stop`, which ends every Ray process on the machine.
A start interrupted half way (Ctrl-C, a node that fails to come up) shuts down what it started.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from cluster.ray_auth import ClusterToken, enable_token_auth

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class LocalCluster:
    """Handle of a started local cluster."""

    address: str
    nodes: int
    _cluster: object = field(repr=False)
    _token: ClusterToken | None = field(default=None, repr=False)

    def shutdown(self, *, grace_s: float = 5.0) -> None:
        """Stop every node; workers and agents that outlive their raylet by `grace_s` are killed by pid."""
        import ray

        procs = _cluster_processes(self._cluster)
        try:
            if ray.is_initialized():
                ray.shutdown()
            self._cluster.shutdown()  # type: ignore[attr-defined]  # ray.cluster_utils.Cluster
        finally:
            _reap(procs, grace_s)
            if self._token is not None:
                self._token.remove()


def _cluster_processes(cluster: object) -> list:  # -> list[psutil.Process]
    """The processes the cluster's nodes started (GCS, raylets) and everything below them (workers, agents)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for node in cluster.list_all_nodes():  # type: ignore[attr-defined]  # a ray.cluster_utils.Cluster
        for infos in node.all_processes.values():
            for info in infos:
                try:
                    root = psutil.Process(info.process.pid)
                    for p in (root, *root.children(recursive=True)):
                        procs[p.pid] = p
                except psutil.Error:
                    pass
    return list(procs.values())


def _reap(procs: list, grace_s: float) -> None:
    """Wait for these (our own) processes to exit; kill what is left (a worker that missed its raylet's end)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def start_local_cluster(
    nodes: int,
    *,
    cpus_per_node: int = 2,
    connect: bool = True,
    head_resources: dict[str, float] | None = None,
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

    token = enable_token_auth(generate=True)
    store = object_store_mb * 2**20
    cluster = Cluster()
    try:
        cluster.add_node(
            num_cpus=cpus_per_node,
            resources=dict(head_resources or {}),
            object_store_memory=store,
            include_dashboard=False,
        )
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, object_store_memory=store)
        cluster.wait_for_nodes()
        if connect:
            # logging_level WARNING: the INFO line "Connecting to existing Ray cluster" would describe the
            # cluster we just created as someone else's.
            ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    except BaseException:
        # Ctrl-C or a failed node mid-start: leave no raylet, GCS or token behind.
        procs = _cluster_processes(cluster)
        try:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
        finally:
            _reap(procs, 5.0)
            token.remove()
        raise
    return LocalCluster(address=cluster.address, nodes=nodes, _cluster=cluster, _token=token)


def cluster_cpus(demand: float, nodes: int = 1) -> int:
    """Logical CPUs each local node advertises so that a layout needing `demand` CPU slots places.

    Ray's CPUs are scheduling slots, not cores: a node advertises at least the machine's cores, and
    more where the layout asks for more slots than the machine has cores (the ranks then share
    cores, with BLAS threads sized to their fraction: replicas/ep/actors.py)."""
    import math

    cores = os.cpu_count() or 1
    return max(cores, 2, math.ceil(demand - 1e-9))


def local_gpus() -> int:
    """GPUs this machine gives a local cluster (CUDA_VISIBLE_DEVICES respected); 0 on a CPU build of torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
