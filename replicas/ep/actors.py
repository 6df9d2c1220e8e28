"""The Ray actors of an expert-parallel group: thin shells over TrunkRank and ExpertRank.

Owns: loading each rank's own part of the checkpoint (a trunk rank reads no routed expert, an
expert rank only its experts), joining / leaving the group's process group, and exposing one
method per step. Both classes are declared Ray actors here (one call at a time; never restarted by
Ray, since the group replaces a failed rank itself); what depends on the placement (CPUs, GPU,
bundle, name) is given per actor in replicas/ep/group.py through `.options()`. A rank whose
collective failed leaves its group and re-raises: it never lingers in a broken communicator.
Tests: tests/replicas/test_group.py.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
import torch

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle, GroupSpec, free_port, join_group, leave_group
from cluster.topology import GroupShape
from model_shards.cache import CachePools
from model_shards.checkpoint_files import CheckpointReader
from model_shards.config import from_hf_config
from model_shards.model import resolve_dtype
from model_shards.tiny_checkpoint import resolve_model_dir
from model_shards.trunk import Trunk
from model_shards.vision import VisionTower, load_vision
from model_shards.weights import CheckpointLayout, load_experts, load_trunk
from replicas.engine.step_types import StepRequest, StepResult
from replicas.ep.a2a_protocol import StepPlan
from replicas.ep.dispatch import AllToAllDispatcher, LocalDispatcher
from replicas.ep.expert_rank import ExpertRank, ExpertStepStats
from replicas.ep.trunk_rank import TrunkRank


@dataclass(frozen=True)
class CacheSizes:
    num_blocks: int
    block_size: int
    num_slots: int
    spec_tokens: int = 0  # k > 0: per-token DeltaNet states for verifying k drafts


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank actor needs to load its part (sent once, at creation)."""

    model_dir: str | None  # None: the embedded tiny model (written on this node if missing)
    dtype: str
    shape: GroupShape
    expert_map: ExpertMap | None  # None when X = 0 (all experts in the trunk)
    index: int  # trunk index i or expert index j
    caches: CacheSizes | None = None  # trunk ranks only
    threads: int = 1


def _set_threads(n: int) -> None:
    # Several rank actors share a node: one BLAS pool each, sized to the rank's CPU bundle.
    torch.set_num_threads(max(1, n))


class _RankBase:
    def __init__(self) -> None:
        self.group: GroupHandle | None = None

    def pid(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port for the group's store (asked of global rank 0)."""
        ip = ray.util.get_node_ip_address() or socket.gethostbyname(socket.gethostname())
        return ip, free_port(ip)

    def leave(self) -> None:
        leave_group()
        self.group = None

    def _failed(self) -> None:
        leave_group()
        self.group = None


@ray.remote(max_restarts=0, max_concurrency=1)  # type: ignore[call-overload]  # Ray's overloads lack max_concurrency
class TrunkRankActor(_RankBase):
    """Holds the trunk and the caches of its sequences; with X = 0 also every expert."""

    def __init__(self, spec: RankSpec) -> None:
        super().__init__()
        _set_threads(spec.threads)
        self.spec = spec
        folder = resolve_model_dir(spec.model_dir)
        cfg = from_hf_config(folder)
        self.cfg = cfg
        self.dtype = resolve_dtype(cfg, spec.dtype)
        reader = CheckpointReader(folder)
        self.layout = CheckpointLayout.detect(reader, cfg)
        weights = load_trunk(reader, cfg, dtype=self.dtype, layout=self.layout)
        self.trunk = Trunk(weights, cfg, dtype=self.dtype)
        assert spec.caches is not None
        self.pools = CachePools.allocate(
            cfg,
            num_blocks=spec.caches.num_blocks,
            block_size=spec.caches.block_size,
            num_slots=spec.caches.num_slots,
            dtype=self.dtype,
            with_mtp=weights.mtp is not None,
            spec_tokens=spec.caches.spec_tokens,
        )
        self.vision = None
        if cfg.vision is not None and self.layout.has_vision:
            self.vision = VisionTower(load_vision(reader, cfg, dtype=self.dtype), cfg.vision, dtype=self.dtype)
        self.rank: TrunkRank | None = None
        if spec.shape.expert_ranks == 0:
            shard = load_experts(reader, cfg, expert_ids=range(cfg.num_experts), dtype=self.dtype, layout=self.layout)
            self.rank = TrunkRank(
                self.trunk, self.pools, LocalDispatcher(shard, num_moe_layers=cfg.num_moe_layers), self.vision
            )
        self.read_bytes = reader.stats.bytes
        reader.close()

    def join(self, spec: GroupSpec) -> None:
        assert self.spec.expert_map is not None
        self.group = join_group(spec, self.spec.shape.trunk_rank(self.spec.index))
        dispatcher = AllToAllDispatcher(
            self.group,
            self.spec.shape,
            self.spec.expert_map,
            hidden=self.cfg.hidden_size,
            dtype=self.dtype,
            num_experts=self.cfg.num_experts,
        )
        self.rank = TrunkRank(self.trunk, self.pools, dispatcher, self.vision)

    def leave(self) -> None:
        """Leave the process group for a rebuild; the engine failed every sequence, so their state goes too."""
        super().leave()
        if self.rank is not None:
            self.rank.reset()

    def step(self, req: StepRequest, plan: StepPlan | None) -> StepResult:
        assert self.rank is not None, "trunk rank has not joined its group"
        try:
            return self.rank.step(req, plan)
        except Exception:
            if self.group is not None:
                self._failed()
            raise

    def take_load(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer since the last call."""
        assert self.rank is not None
        return self.rank.routed.load.take()

    def take_timings(self) -> dict[str, float]:
        """Seconds in dispatch + combine and MoE layer calls since the last call (empty with X = 0)."""
        assert self.rank is not None
        routed = self.rank.routed
        return routed.take_timings() if isinstance(routed, AllToAllDispatcher) else {}

    def cache_info(self) -> dict[str, int]:
        return {
            "num_blocks": self.pools.num_blocks,
            "num_slots": self.pools.num_slots,
            "block_size": self.pools.block_size,
            "read_bytes": self.read_bytes,
        }


@ray.remote(max_restarts=0, max_concurrency=1)  # type: ignore[call-overload]  # Ray's overloads lack max_concurrency
class ExpertRankActor(_RankBase):
    """Holds the routed experts the map gives this rank, for every MoE layer."""

    def __init__(self, spec: RankSpec) -> None:
        super().__init__()
        _set_threads(spec.threads)
        assert spec.expert_map is not None
        self.spec = spec
        folder = resolve_model_dir(spec.model_dir)
        cfg = from_hf_config(folder)
        self.cfg = cfg
        self.dtype = resolve_dtype(cfg, spec.dtype)
        reader = CheckpointReader(folder)
        layout = CheckpointLayout.detect(reader, cfg)
        ids = spec.expert_map.experts_of(spec.index)
        has_mtp = layout.mtp_layout is not None
        self.shard = load_experts(
            reader,
            cfg,
            expert_ids=ids[: cfg.num_layers + (cfg.mtp_num_hidden_layers if has_mtp else 0)],
            dtype=self.dtype,
            with_mtp=has_mtp,
            layout=layout,
        )
        self.read_names = list(reader.stats.names)
        self.read_bytes = reader.stats.bytes
        reader.close()
        self.rank: ExpertRank | None = None

    def join(self, spec: GroupSpec) -> None:
        self.group = join_group(spec, self.spec.shape.expert_rank(self.spec.index))
        self.rank = ExpertRank(self.shard, self.group, self.spec.shape, hidden=self.cfg.hidden_size, dtype=self.dtype)

    def serve(self, plan: StepPlan) -> ExpertStepStats:
        assert self.rank is not None, "expert rank has not joined its group"
        try:
            return self.rank.serve(plan)
        except Exception:
            self._failed()
            raise

    def param_bytes(self) -> int:
        return self.shard.nbytes

    def held_experts(self) -> list[list[int]]:
        return [list(layer.expert_ids) for layer in self.shard.layers]

    def rows_per_layer(self) -> list[int]:
        assert self.rank is not None
        return self.rank.rows_per_layer.tolist()
