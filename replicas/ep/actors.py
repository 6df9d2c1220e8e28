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
from dataclasses import dataclass, replace

import ray
import torch

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle, GroupSpec, free_port, join_group, leave_group
from cluster.topology import GroupShape
from model_shards.cache import CachePools
from model_shards.cache_sizing import pool_counts_on_device
from model_shards.checkpoint_files import CheckpointReader
from model_shards.config import from_hf_config
from model_shards.experts import ExpertShard
from model_shards.model import resolve_dtype
from model_shards.tiny_checkpoint import resolve_model_dir
from model_shards.trunk import Trunk
from model_shards.vision import VisionTower, load_vision
from model_shards.weights import CheckpointLayout, load_experts, load_trunk
from replicas.engine.step_types import StepRequest, StepResult
from replicas.ep.a2a_protocol import StepPlan
from replicas.ep.dispatch import AllToAllDispatcher, LocalDispatcher
from replicas.ep.expert_rank import ExpertRank, ExpertStepStats
from replicas.ep.trunk_rank import CANARY_RESERVE, TrunkRank


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
    map_version: int = 0  # the version of `expert_map` (a rank replaced after a rebalance loads the current map)
    gpu_memory_utilization: float = 0.9  # a trunk rank on cuda sizes its pools from free memory (caches: the cap)


def rank_device() -> torch.device:
    """This actor's device: cuda where Ray gave it a GPU (Ray narrows CUDA_VISIBLE_DEVICES to it, so cuda:0),
    else cpu. Everything the rank builds is made there."""
    return torch.device("cuda", 0) if ray.get_gpu_ids() else torch.device("cpu")


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
        self.device = rank_device()
        reader = CheckpointReader(folder)
        self.layout = CheckpointLayout.detect(reader, cfg)
        weights = load_trunk(reader, cfg, dtype=self.dtype, layout=self.layout, device=self.device)
        self.trunk = Trunk(weights, cfg, dtype=self.dtype)
        assert spec.caches is not None
        caches = spec.caches
        if self.device.type == "cuda":  # after the weights (vision's below is small): what they leave is the pools'
            counts = pool_counts_on_device(
                cfg,
                device=self.device,
                dtype=self.dtype,
                block_size=caches.block_size,
                max_slots=caches.num_slots,
                utilization=spec.gpu_memory_utilization,
                spec_tokens=caches.spec_tokens,
                with_mtp=weights.mtp is not None,
                reserved=CANARY_RESERVE,
            )
            caches = replace(caches, num_blocks=counts.num_blocks, num_slots=counts.num_slots)
        self.pools = CachePools.allocate(  # the canary's block and slot beyond the engine's (trunk_rank.py)
            cfg,
            num_blocks=caches.num_blocks + CANARY_RESERVE,
            block_size=caches.block_size,
            num_slots=caches.num_slots + CANARY_RESERVE,
            dtype=self.dtype,
            device=self.device,
            with_mtp=weights.mtp is not None,
            spec_tokens=caches.spec_tokens,
        )
        self.vision = None
        if cfg.vision is not None and self.layout.has_vision:
            self.vision = VisionTower(
                load_vision(reader, cfg, dtype=self.dtype, device=self.device), cfg.vision, dtype=self.dtype
            )
        self.rank: TrunkRank | None = None
        self._dispatcher: AllToAllDispatcher | None = None
        self._map_version = spec.map_version
        self._staged: tuple[int, ExpertMap] | None = None
        if spec.shape.expert_ranks == 0:
            shard = load_experts(
                reader,
                cfg,
                expert_ids=range(cfg.num_experts),
                dtype=self.dtype,
                layout=self.layout,
                device=self.device,
            )
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
        self._dispatcher = dispatcher

    def stage_map(self, expert_map: ExpertMap, version: int) -> int:
        """Hold `expert_map` until a step's plan names `version`; nothing changes before that."""
        self._staged = (version, expert_map)
        return version

    def drop_staged(self, version: int) -> None:
        if self._staged is not None and self._staged[0] == version:
            self._staged = None

    def _switch_map(self, plan: StepPlan | None) -> None:
        if plan is None or plan.map_version == self._map_version or self._dispatcher is None:
            return
        if self._staged is None or self._staged[0] != plan.map_version:
            raise RuntimeError(f"step runs expert map v{plan.map_version}; this trunk rank has v{self._map_version}")
        self._dispatcher.set_map(self._staged[1])
        self._map_version, self._staged = plan.map_version, None

    def leave(self) -> None:
        """Leave the process group for a rebuild; the engine failed every sequence, so their state goes too."""
        super().leave()
        if self.rank is not None:
            self.rank.reset()

    def step(self, req: StepRequest, plan: StepPlan | None) -> StepResult:
        assert self.rank is not None, "trunk rank has not joined its group"
        try:
            self._switch_map(plan)
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
        return {  # what the engine may hand out (the canary's reserve apart)
            "num_blocks": self.pools.num_blocks - CANARY_RESERVE,
            "num_slots": self.pools.num_slots - CANARY_RESERVE,
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
        self.device = rank_device()
        self._folder = folder
        reader = CheckpointReader(folder)
        layout = CheckpointLayout.detect(reader, cfg)
        self._layout = layout
        self._has_mtp = layout.mtp_layout is not None
        self._num_moe = cfg.num_layers + (cfg.mtp_num_hidden_layers if self._has_mtp else 0)
        ids = spec.expert_map.experts_of(spec.index)
        self.shard = load_experts(
            reader,
            cfg,
            expert_ids=ids[: self._num_moe],
            dtype=self.dtype,
            with_mtp=self._has_mtp,
            layout=layout,
            device=self.device,
        )
        self.read_names = list(reader.stats.names)
        self.read_bytes = reader.stats.bytes
        reader.close()
        self.rank: ExpertRank | None = None
        self._map_version = spec.map_version
        self._staged: tuple[int, ExpertShard] | None = None

    def stage_map(self, expert_map: ExpertMap, version: int) -> dict[str, int]:
        """Load the experts `expert_map` gives this rank into a new shard beside the serving one (make before
        break): layers whose experts do not change share the serving tensors; the others are read from the
        checkpoint. The serving shard is untouched, so no step sees a half-written slot; the new one serves from
        the first step whose plan names `version`. Returns the experts loaded and their bytes (the acknowledgement).
        """
        want = [sorted(ids) for ids in expert_map.experts_of(self.spec.index)[: self._num_moe]]
        held = [sorted(lay.expert_ids) for lay in self.shard.layers]
        changed = [w != h for w, h in zip(want, held)]
        reader = CheckpointReader(self._folder)
        try:
            fresh = load_experts(
                reader,
                self.cfg,
                expert_ids=[w if c else [] for w, c in zip(want, changed)],
                dtype=self.dtype,
                with_mtp=self._has_mtp,
                layout=self._layout,
                device=self.device,
            )
            loaded_bytes = reader.stats.bytes
        finally:
            reader.close()
        layers = [new if c else old for new, old, c in zip(fresh.layers, self.shard.layers, changed)]
        self._staged = (version, ExpertShard(layers, num_experts=self.cfg.num_experts))
        loaded = sum(len(set(w) - set(h)) for w, h in zip(want, held))
        return {"version": version, "experts_loaded": loaded, "bytes": loaded_bytes}

    def drop_staged(self, version: int) -> None:
        """Forget a staged map (the move failed on some rank): the serving shard stays."""
        if self._staged is not None and self._staged[0] == version:
            self._staged = None

    def _switch_map(self, plan: StepPlan) -> None:
        if plan.map_version == self._map_version:
            return
        if self._staged is None or self._staged[0] != plan.map_version or self.rank is None:
            raise RuntimeError(f"step runs expert map v{plan.map_version}; this expert rank has v{self._map_version}")
        # the old shard goes with this assignment: slots only the old map used are freed here
        self.shard = self._staged[1]
        self.rank.set_shard(self.shard)
        self._map_version, self._staged = plan.map_version, None

    def take_received(self) -> dict[str, torch.Tensor | int]:
        """Rows this rank received per expert per MoE layer, padding slots, steps, since the last call."""
        assert self.rank is not None
        return self.rank.take_received()

    def join(self, spec: GroupSpec) -> None:
        self.group = join_group(spec, self.spec.shape.expert_rank(self.spec.index))
        self.rank = ExpertRank(self.shard, self.group, self.spec.shape, hidden=self.cfg.hidden_size, dtype=self.dtype)

    def serve(self, plan: StepPlan) -> ExpertStepStats:
        assert self.rank is not None, "expert rank has not joined its group"
        try:
            self._switch_map(plan)
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
