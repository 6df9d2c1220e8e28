"""`epserve generate` on an expert-parallel group: start or join Ray, build the group, run the Engine on it,
tear down. The group is the engine's runner, as in serving (replicas/ep/offline_generate.py).
Tests: tests/replicas/test_startup.py.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from replicas.engine.engine_types import GenerateRequest
from replicas.engine.prefix_config import PrefixCacheConfig
from replicas.ep.actors import CacheSizes
from replicas.ep.offline_generate import Completion


def run_on_group(
    args: argparse.Namespace,
    folder: Path,
    req: GenerateRequest,
    caches: CacheSizes,
    *,
    vocab_size: int,
    prefix_cache: PrefixCacheConfig | None = None,
) -> Completion:
    from cluster.local_cluster import start_local_cluster

    world = args.trunk_ranks + args.expert_ranks
    cores = os.cpu_count() or 1
    # More ranks than cores: each rank a fraction of a CPU (one BLAS thread), so the group places.
    cpus_per_rank = 1.0 if world <= cores else max(0.1, round(cores / world, 3))
    local = None
    if args.address is None:
        from cluster.local_cluster import cluster_cpus

        nodes = args.nodes or 1
        local = start_local_cluster(nodes, cpus_per_node=cluster_cpus(world * cpus_per_rank / nodes))
    else:
        from cluster.ray_auth import enable_token_auth

        enable_token_auth(generate=False)
    import ray

    from cluster.topology import GroupShape
    from replicas.ep.group import ExpertParallelGroup, GroupConfig
    from replicas.ep.offline_generate import offline_generate

    if local is None:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(folder),
            shape=GroupShape(args.trunk_ranks, args.expert_ranks),
            dtype=args.dtype,
            caches=caches,
            cpus_per_rank=cpus_per_rank,
        )
    )
    try:
        group.start()
        return offline_generate(
            group, req, spec_tokens=caches.spec_tokens, vocab_size=vocab_size, prefix_cache=prefix_cache
        )
    finally:
        group.shutdown()
        if local is not None:
            local.shutdown()
        else:
            ray.shutdown()
