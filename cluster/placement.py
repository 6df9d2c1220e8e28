"""Placement: a pure function from model + cluster shape to Ray bundles and an expert-to-rank map.

Worked example: D = 2, X = 4, 16 experts, GPUs -> bundles [{GPU 1, CPU 1}] x 6 in rank order
(trunk 0, trunk 1, expert 0..3), strategy PACK (fill a node's GPUs before the next), and the
contiguous map expert e -> expert rank e // 4 in every MoE layer. Inside a Serve replica the
replica's own bundle comes first (bundle 0) and the rank bundles follow (design.md).
With `rank_nodes` (a node per rank, e.g. from cluster/traffic.py's `place_by_traffic`) the group
gets one bundle per node holding that node's ranks (the replica's resources join node 0's bundle),
under STRICT_SPREAD: each bundle on its own Ray node, each rank in its node's bundle.
An explicit map may list several ranks for an expert (redundant copies): tokens are spread
over the copies by token index. Tests: tests/cluster/test_placement.py, tests/cluster/test_traffic.py
(node bundles), tests/replicas/test_group_placement.py (on a Ray cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.topology import GroupShape, Topology


@dataclass(frozen=True)
class ExpertMap:
    """owners[layer][expert] = expert ranks (0..X-1) holding that expert in that MoE layer."""

    owners: tuple[tuple[tuple[int, ...], ...], ...]
    num_expert_ranks: int

    def __post_init__(self) -> None:
        for layer, per_expert in enumerate(self.owners):
            for e, ranks in enumerate(per_expert):
                if not ranks:
                    raise ValueError(f"expert {e} of MoE layer {layer} has no expert rank")
                bad = [r for r in ranks if not 0 <= r < self.num_expert_ranks]
                if bad:
                    raise ValueError(
                        f"expert {e} of MoE layer {layer} maps to ranks {bad}, outside [0, {self.num_expert_ranks})"
                    )
                if len(set(ranks)) != len(ranks):
                    raise ValueError(f"expert {e} of MoE layer {layer} lists a rank twice: {list(ranks)}")

    @staticmethod
    def contiguous(*, num_experts: int, num_moe_layers: int, expert_ranks: int) -> ExpertMap:
        """Rank j holds a contiguous range; when X does not divide E the first E % X ranks hold one more."""
        if expert_ranks < 1:
            raise ValueError("an expert map needs at least one expert rank")
        if expert_ranks > num_experts:
            raise ValueError(f"{expert_ranks} expert ranks for {num_experts} experts: some ranks would hold nothing")
        base, extra = divmod(num_experts, expert_ranks)
        owner: list[tuple[int, ...]] = []
        for j in range(expert_ranks):
            owner += [(j,)] * (base + (1 if j < extra else 0))
        return ExpertMap(owners=(tuple(owner),) * num_moe_layers, num_expert_ranks=expert_ranks)

    @staticmethod
    def explicit(owners: Sequence[int | Sequence[int]], *, num_moe_layers: int, expert_ranks: int) -> ExpertMap:
        """The same map for every MoE layer: entry e is a rank or a list of ranks (redundant copies)."""
        return ExpertMap.explicit_per_layer([owners] * num_moe_layers, expert_ranks=expert_ranks)

    @staticmethod
    def explicit_per_layer(layers: Sequence[Sequence[int | Sequence[int]]], *, expert_ranks: int) -> ExpertMap:
        """One map per MoE layer (e.g. from an EPLB rebalancing)."""
        sizes = {len(layer) for layer in layers}
        if len(sizes) != 1:
            raise ValueError(f"every MoE layer's map must list every expert; got lengths {sorted(sizes)}")
        return ExpertMap(
            owners=tuple(
                tuple((int(x),) if isinstance(x, int) else tuple(int(r) for r in x) for x in layer) for layer in layers
            ),
            num_expert_ranks=expert_ranks,
        )

    @property
    def num_moe_layers(self) -> int:
        return len(self.owners)

    def experts_of(self, rank: int) -> list[list[int]]:
        """Expert ids rank `rank` holds, per MoE layer."""
        return [[e for e, ranks in enumerate(layer) if rank in ranks] for layer in self.owners]

    def route_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(table [E, max copies] of expert ranks, copies [E]) for picking a copy by token index."""
        per_expert = self.owners[layer]
        width = max(len(r) for r in per_expert)
        table = torch.tensor([list(r) + [r[0]] * (width - len(r)) for r in per_expert], dtype=torch.long)
        return table, torch.tensor([len(r) for r in per_expert], dtype=torch.long)


@dataclass(frozen=True)
class GroupPlacement:
    """Bundles for one group, in rank order (after any replica bundle), and the strategy."""

    bundles: tuple[dict[str, float], ...]
    strategy: str
    first_rank_bundle: int  # index of trunk rank 0's bundle (1 inside a Serve replica, else 0)
    rank_bundles: tuple[int, ...] | None = None  # node bundles: the bundle (= plan node) of each global rank

    def bundle_of(self, global_rank: int) -> int:
        if self.rank_bundles is not None:
            return self.rank_bundles[global_rank]
        return self.first_rank_bundle + global_rank


def plan_placement(
    shape: GroupShape,
    topology: Topology,
    *,
    replica_bundle: dict[str, float] | None = None,
    cpus_per_rank: float = 1.0,
    strategy: str | None = None,
    rank_nodes: tuple[int, ...] | None = None,
) -> GroupPlacement:
    """Ray placement-group bundles for a group: one GPU per rank on GPU clusters (NCCL refuses two
    ranks of one communicator on a device), one CPU slot per rank otherwise.

    Args:
        replica_bundle: resources of the Serve replica that owns the group; it becomes bundle 0.
        strategy: Ray strategy; default PACK on GPUs (keep a group on few nodes), SPREAD on CPUs
            (ranks are CPU-bound, so spread them over the nodes); STRICT_SPREAD with `rank_nodes`.
        rank_nodes: the plan node of every global rank (0-based, every node in 0..max used): one bundle
            per node with its ranks' resources, so each rank lands on the node the plan names.
    Raises:
        ValueError: the group needs more GPUs than the cluster has, or `rank_nodes` does not fit it.
    """
    n = shape.world_size
    if topology.has_gpus:
        if n > topology.total_gpus:
            raise ValueError(
                f"the group needs {n} GPUs (D={shape.trunk_ranks} + X={shape.expert_ranks}), "
                f"the cluster has {topology.total_gpus}"
            )
        rank_bundle = {"GPU": 1.0, "CPU": cpus_per_rank}
    else:
        rank_bundle = {"CPU": cpus_per_rank}
    if rank_nodes is not None:
        return _node_bundles(rank_nodes, n, topology, rank_bundle, replica_bundle)
    bundles = ([dict(replica_bundle)] if replica_bundle else []) + [dict(rank_bundle) for _ in range(n)]
    return GroupPlacement(
        bundles=tuple(bundles),
        strategy=strategy or ("PACK" if topology.has_gpus else "SPREAD"),
        first_rank_bundle=1 if replica_bundle else 0,
    )


def _node_bundles(
    rank_nodes: tuple[int, ...],
    n: int,
    topology: Topology,
    rank_bundle: dict[str, float],
    replica_bundle: dict[str, float] | None,
) -> GroupPlacement:
    """One bundle per plan node (its ranks' resources summed; the replica's in node 0's), STRICT_SPREAD."""
    if len(rank_nodes) != n:
        raise ValueError(f"rank_nodes names {len(rank_nodes)} ranks; the group has {n}")
    used = sorted(set(rank_nodes))
    if used != list(range(len(used))):
        raise ValueError(f"rank_nodes must use nodes 0..{len(used) - 1} each at least once, got {sorted(used)}")
    if len(used) > topology.nodes:
        raise ValueError(f"rank_nodes uses {len(used)} nodes; the cluster has {topology.nodes}")
    per_node = [rank_nodes.count(k) for k in used]
    if topology.has_gpus and max(per_node) > topology.gpus_per_node:
        raise ValueError(
            f"rank_nodes puts {max(per_node)} ranks on node {per_node.index(max(per_node))}; "
            f"a node has {topology.gpus_per_node} GPUs"
        )
    bundles: list[dict[str, float]] = []
    for k, count in enumerate(per_node):
        b = {res: v * count for res, v in rank_bundle.items()}
        if k == 0:
            for res, v in (replica_bundle or {}).items():
                b[res] = b.get(res, 0.0) + v
        bundles.append(b)
    return GroupPlacement(
        bundles=tuple(bundles),
        strategy="STRICT_SPREAD" if len(used) > 1 else "STRICT_PACK",
        first_rank_bundle=0,
        rank_bundles=tuple(rank_nodes),
    )
