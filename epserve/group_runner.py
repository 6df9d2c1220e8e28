"""`epserve generate` on an expert-parallel group: start or join Ray, build the group, run, tear down."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from model_shards.generation_config import GenerationDefaults
from model_shards.sampling import SamplingParams
from replicas.ep.offline import Generation


class _SyncGroupRunner:
    """Adapts the async group driver to the offline runner protocol."""

    def __init__(self, group, block_size: int) -> None:  # noqa: ANN001  # ExpertParallelGroup
        self.group = group
        self.block_size = block_size
        self.num_trunk_ranks = group.shape.trunk_ranks

    def step(self, requests):  # noqa: ANN001, ANN202  # list[StepRequest] -> list[StepResult]
        return asyncio.run(self.group.step(requests))


def run_on_group(
    args: argparse.Namespace, folder: Path, prompt: list[int], params: SamplingParams, defaults: GenerationDefaults
) -> Generation:
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
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig
    from replicas.ep.offline import generate_one, runner_blocks

    if local is None:
        ray.init(address=args.address, log_to_driver=False, logging_level=logging.WARNING)
    k = args.speculative_tokens
    blocks = runner_blocks(len(prompt), args.max_tokens + 2 * k, args.block_size)
    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(folder),
            shape=GroupShape(args.trunk_ranks, args.expert_ranks),
            dtype=args.dtype,
            caches=CacheSizes(num_blocks=blocks, block_size=args.block_size, num_slots=1, spec_tokens=k),
            cpus_per_rank=cpus_per_rank,
        )
    )
    try:
        group.start()
        return generate_one(
            _SyncGroupRunner(group, args.block_size),
            prompt,
            params=params,
            max_tokens=args.max_tokens,
            eos_token_ids=defaults.eos_token_ids,
            spec_tokens=k,
        )
    finally:
        group.shutdown()
        if local is not None:
            local.shutdown()
        else:
            ray.shutdown()
