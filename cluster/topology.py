"""The shape of the cluster and of one expert-parallel group.

Owns: `Topology` (nodes, GPUs per node, memory per GPU; CPU-only clusters have 0 GPUs) and
`GroupShape` (D trunk ranks, X expert ranks and their global rank numbers). Rank layout,
stated once: global ranks 0..D-1 are trunk ranks, D..D+X-1 expert ranks, in one process group.
Tests: tests/cluster/test_placement.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Physical resources available to the group (one Ray node per machine)."""

    nodes: int
    gpus_per_node: int = 0
    gpu_memory_gib: float = 0.0
    cpus_per_node: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0 or self.gpu_memory_gib < 0:
            raise ValueError("gpus_per_node and gpu_memory_gib must be >= 0")
        if self.gpus_per_node and self.gpu_memory_gib <= 0:
            raise ValueError("a GPU topology needs gpu_memory_gib > 0")

    @property
    def has_gpus(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class GroupShape:
    """D trunk ranks and X expert ranks of one expert-parallel group.

    X = 0 is the single-process layout: experts live inside each trunk rank (no collectives).
    """

    trunk_ranks: int
    expert_ranks: int

    def __post_init__(self) -> None:
        if self.trunk_ranks < 1:
            raise ValueError(f"--trunk-ranks must be >= 1, got {self.trunk_ranks}")
        if self.expert_ranks < 0:
            raise ValueError(f"--expert-ranks must be >= 0, got {self.expert_ranks}")
        if self.expert_ranks == 0 and self.trunk_ranks > 1:
            raise ValueError(
                "--expert-ranks 0 (experts inside the trunk) supports one trunk rank; use X >= 1 for D > 1"
            )

    @property
    def world_size(self) -> int:
        return self.trunk_ranks + self.expert_ranks

    def trunk_rank(self, i: int) -> int:
        """Global rank of trunk rank i."""
        return i

    def expert_rank(self, j: int) -> int:
        """Global rank of expert rank j."""
        return self.trunk_ranks + j

    @property
    def expert_global_ranks(self) -> tuple[int, ...]:
        return tuple(self.trunk_ranks + j for j in range(self.expert_ranks))
