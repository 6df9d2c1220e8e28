"""The driver of one expert-parallel group: D trunk-rank actors + X expert-rank actors.

Owns: creating the rank actors in a placement group (the caller's, e.g. a Serve replica's
own with bundle 0 = the replica, or one it creates), forming their process group at trunk
rank 0's node on a free port, and `step()`: one Ray call per rank per step (nothing per
layer), returning each trunk rank's sampled tokens. Any rank error or timeout fails the
step with `GroupFailure` (epoch, dead ranks, timed-out ranks); `rebuild()` replaces the
failed ranks, re-forms the process group and checks the data path with an idle step.
Tests: tests/replicas/test_group.py, tests/replicas/test_rebalance.py (load statistics, rebalancing).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.expert_balance import moved_slots, rebalance
from cluster.expert_load import LoadWindow, per_rank_load, rank_imbalance, write_load_file
from cluster.placement import ExpertMap, GroupPlacement, plan_placement
from cluster.process_groups import GroupSpec, choose_backend
from cluster.topology import GroupShape, Topology
from model_shards.config import ModelConfig, from_hf_config
from model_shards.tiny_checkpoint import resolve_model_dir
from replicas.engine.step_types import StepRequest, StepResult
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan, fixed_capacity
from replicas.ep.actors import CacheSizes, ExpertRankActor, RankSpec, TrunkRankActor

if TYPE_CHECKING:
    from ray.actor import ActorClass

ERROR_GRACE_S = 2.0


class GroupFailure(RuntimeError):
    """A step of the group failed: some ranks died, hung past the deadline, or raised.

    Attributes:
        epoch: the group's epoch when it failed (bumped by each rebuild).
        dead: global ranks whose actor died. timed_out: ranks that did not answer in time.
        errors: global rank -> error text, for ranks that raised (often collateral of the above).
    """

    def __init__(
        self,
        epoch: int,
        *,
        dead: tuple[int, ...],
        timed_out: tuple[int, ...],
        errors: dict[int, str],
        names: dict[int, str],
    ) -> None:
        self.epoch, self.dead, self.timed_out, self.errors = epoch, dead, timed_out, errors
        parts = []
        if dead:
            parts.append("dead: " + ", ".join(names[r] for r in dead))
        if timed_out:
            parts.append("timed out: " + ", ".join(names[r] for r in timed_out))
        culprits = [r for r in errors if r not in dead and r not in timed_out]
        if culprits and not dead and not timed_out:
            parts.append("raised: " + "; ".join(f"{names[r]}: {errors[r][:200]}" for r in culprits))
        super().__init__(f"expert-parallel group epoch {epoch} failed ({'; '.join(parts) or 'unknown'})")

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        """Ranks to replace: the dead and the hung; if none, those that raised on their own."""
        culprits = set(self.dead) | set(self.timed_out)
        return tuple(sorted(culprits or set(self.errors)))


@dataclass(frozen=True)
class GroupConfig:
    """How to build a group.

    Attributes:
        deadline_s: bound on every collective (seconds in CI, tens of seconds on GPUs).
        capacity_factor: decode exchange capacity C = factor x mean rows per (trunk, expert) pair.
        cpus_per_rank: CPU slots per rank bundle (and BLAS threads per rank).
    """

    model_dir: str | None  # None: the embedded tiny model, resolved by each process
    shape: GroupShape
    dtype: str = "auto"
    deadline_s: float = 30.0
    caches: CacheSizes = field(default_factory=lambda: CacheSizes(num_blocks=256, block_size=16, num_slots=16))
    expert_map: ExpertMap | None = None
    capacity_factor: float = 2.0
    cpus_per_rank: float = 1.0
    gpus: bool = False
    gpu_memory_utilization: float = 0.9  # with gpus: trunk ranks size their pools from free GPU memory
    strategy: str | None = None
    load_timeout_s: float = 600.0
    load_window_steps: int = 256  # expert-load moving average: the last this many steps


class ExpertParallelGroup:
    """D trunk ranks + X expert ranks in one process group.

    Args:
        config: see `GroupConfig`.
        placement: the caller's placement group (e.g. the Serve replica's), or None to create one.
        first_bundle: index of trunk rank 0's bundle in `placement` (1 inside a Serve replica).
    """

    def __init__(self, config: GroupConfig, *, placement: PlacementGroup | None = None, first_bundle: int = 0) -> None:
        self.config = config
        self.shape = config.shape
        self.cfg: ModelConfig = from_hf_config(resolve_model_dir(config.model_dir))
        self.expert_map = config.expert_map or (
            ExpertMap.contiguous(
                num_experts=self.cfg.num_experts,
                num_moe_layers=self.cfg.num_moe_layers,
                expert_ranks=self.shape.expert_ranks,
            )
            if self.shape.expert_ranks
            else None
        )
        self.map_version = 0  # bumped by each rebalance; every step's plan carries it
        self.load_window = LoadWindow(config.load_window_steps)
        self._rebalancing = False
        self._own_pg = placement is None
        self._layout: GroupPlacement = plan_placement(
            self.shape,
            Topology(
                nodes=1,
                gpus_per_node=self.shape.world_size if config.gpus else 0,
                gpu_memory_gib=1.0 if config.gpus else 0.0,
            ),
            cpus_per_rank=config.cpus_per_rank,
            strategy=config.strategy,
        )
        self._pg = placement
        self._caches = config.caches  # what every trunk rank holds; on GPUs known after start()
        self._first_bundle = first_bundle
        self.epoch = 0
        self.group_id = uuid.uuid4().hex[:8]  # names this group's actors (epserve-<id>-trunk0-...), for operators
        self._created = 0
        self.trunks: list = []
        self.experts: list = []
        self._broken: GroupFailure | None = None
        self.names = {self.shape.trunk_rank(i): f"trunk rank {i}" for i in range(self.shape.trunk_ranks)}
        self.names.update({self.shape.expert_rank(j): f"expert rank {j}" for j in range(self.shape.expert_ranks)})

    @property
    def caches(self) -> CacheSizes:
        """Each trunk rank's caches: the engine's block pools match them (on GPUs, after `start`: the
        smallest counts any trunk rank sized from its free memory)."""
        return self._caches

    @property
    def num_trunk_ranks(self) -> int:
        return self.shape.trunk_ranks

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Create the placement group if needed, the actors (loading weights), and the process group."""
        if self._pg is None:
            self._pg = placement_group(list(self._layout.bundles), strategy=self._layout.strategy)
            ray.get(self._pg.ready(), timeout=self.config.load_timeout_s)
        self.trunks = [self._new_actor(self.shape.trunk_rank(i)) for i in range(self.shape.trunk_ranks)]
        self.experts = [self._new_actor(self.shape.expert_rank(j)) for j in range(self.shape.expert_ranks)]
        ray.get([a.pid.remote() for a in self.trunks + self.experts], timeout=self.config.load_timeout_s)
        if self.config.gpus:
            infos = ray.get([t.cache_info.remote() for t in self.trunks], timeout=self.config.load_timeout_s)
            self._caches = dataclasses.replace(
                self.config.caches,
                num_blocks=min(int(i["num_blocks"]) for i in infos),
                num_slots=min(int(i["num_slots"]) for i in infos),
            )
        self._form_group()
        self.canary()

    def _new_actor(self, global_rank: int):  # noqa: ANN202  # a Ray actor handle
        is_trunk = global_rank < self.shape.trunk_ranks
        index = global_rank if is_trunk else global_rank - self.shape.trunk_ranks
        spec = RankSpec(
            model_dir=self.config.model_dir,
            dtype=self.config.dtype,
            shape=self.shape,
            expert_map=self.expert_map,
            map_version=self.map_version,
            index=index,
            caches=self.config.caches if is_trunk else None,
            threads=int(self.config.cpus_per_rank),
            gpu_memory_utilization=self.config.gpu_memory_utilization,
        )
        self._created += 1
        role = f"trunk{index}" if is_trunk else f"expert{index}"
        opts = dict(
            num_cpus=self.config.cpus_per_rank,
            num_gpus=1 if self.config.gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg,  # type: ignore[arg-type]  # placed by start() before any actor
                placement_group_bundle_index=self._first_bundle + global_rank,
            ),
            name=f"epserve-{self.group_id}-{role}-{self._created}",
        )
        # ray.remote in actors.py makes these names Ray actor classes; mypy keeps a decorated class's own type
        actor_class = cast("ActorClass[Any]", TrunkRankActor if is_trunk else ExpertRankActor)
        return actor_class.options(**opts).remote(spec)

    def _form_group(self) -> None:
        if self.shape.expert_ranks == 0:
            return
        addr, port = ray.get(self.trunks[0].rendezvous.remote(), timeout=60)
        spec = GroupSpec(
            master_addr=addr,
            master_port=port,
            world_size=self.shape.world_size,
            backend=choose_backend(every_rank_has_gpu=self.config.gpus),
            deadline_s=self.config.deadline_s,
            epoch=self.epoch,
        )
        ray.get([a.join.remote(spec) for a in self.trunks + self.experts], timeout=self.config.deadline_s + 60)

    def rebuild(self) -> None:
        """Replace failed ranks with fresh actors (weights reloaded), re-form the process group on a
        new port under a new epoch, and run one idle step through every rank."""
        failed = set(self._broken.failed_ranks) if self._broken else set()
        actors = self.trunks + self.experts
        survivors = [r for r in range(len(actors)) if r not in failed]
        try:
            ray.get([actors[r].leave.remote() for r in survivors], timeout=self.config.deadline_s + 10)
        except Exception:  # noqa: BLE001  # a survivor that cannot even leave is replaced too
            failed = set(range(len(actors)))
        for r in sorted(failed):
            ray.kill(actors[r], no_restart=True)
            actors[r] = self._new_actor(r)
        self.trunks = actors[: self.shape.trunk_ranks]
        self.experts = actors[self.shape.trunk_ranks :]
        ray.get([actors[r].pid.remote() for r in failed], timeout=self.config.load_timeout_s)
        self.epoch += 1
        self._broken = None
        self._form_group()
        self.canary()

    def canary(self) -> float:
        """Readiness: every trunk rank runs one token through trunk -> experts -> trunk on its reserved block and
        slot (every exchange of the decoder layers; not counted in the expert load), so a device, layout or
        weight mistake fails here rather than at the first request. Returns seconds."""
        t0 = time.monotonic()
        plan = self._canary_plan() if self.shape.expert_ranks else None
        refs = [t.step.remote(StepRequest(canary=True), plan) for t in self.trunks]
        refs += [e.serve.remote(plan) for e in self.experts] if plan is not None else []
        ray.get(refs, timeout=self.config.deadline_s * 4 + 10)
        return time.monotonic() - t0

    def shutdown(self) -> None:
        for a in self.trunks + self.experts:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  # already gone
                pass
        self.trunks, self.experts = [], []
        if self._own_pg and self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # ----------------------------------------------------------------- steps
    def _canary_plan(self) -> StepPlan:
        return StepPlan(tuple(range(self.cfg.num_layers)), VARIABLE, map_version=self.map_version, canary=True)

    def plan_for(self, requests: list[StepRequest]) -> StepPlan:
        """FIXED (no counts exchange) when every sequence decodes (one token, or a verified draft run),
        else VARIABLE. With speculation every rank also makes the MTP layer's MoE calls: one pass and
        k - 1 recursive draft steps. The canary's step: the decoder layers, VARIABLE, counted by no rank."""
        if any(r.canary for r in requests):
            return self._canary_plan()
        mtp = max((r.mtp_steps for r in requests), default=0)
        layers = tuple(range(self.cfg.num_layers)) + (self.cfg.num_layers,) * mtp
        tokens = [sum(len(s.token_ids) + len(s.drafts) for s in r.seqs) for r in requests]
        decode = all(len(s.token_ids) == 1 for r in requests for s in r.seqs)  # one token, drafts or not
        if decode and self.shape.expert_ranks:
            cap = fixed_capacity(
                max(tokens),
                top_k=self.cfg.num_experts_per_tok,
                expert_ranks=self.shape.expert_ranks,
                factor=self.config.capacity_factor,
            )
            return StepPlan(layers, FIXED, cap)
        return StepPlan(layers, VARIABLE)

    async def step(self, requests: list[StepRequest], plan: StepPlan | None = None) -> list[StepResult]:
        """Run one step: `requests[i]` for trunk rank i (may be empty). Returns each trunk rank's result.

        Raises:
            GroupFailure: any rank died, raised or did not answer in time; the group stays failed
                until `rebuild()`.
        """
        if self._broken is not None:
            raise self._broken
        if len(requests) != self.shape.trunk_ranks:
            raise ValueError(f"{len(requests)} requests for {self.shape.trunk_ranks} trunk ranks")
        if self.shape.expert_ranks == 0:
            plan = None
        else:
            # the map version is read once, here: a step runs wholly under the old map or wholly under the new
            plan = dataclasses.replace(plan or self.plan_for(requests), map_version=self.map_version)
        refs = [t.step.remote(r, plan) for t, r in zip(self.trunks, requests)]
        if plan is not None:
            refs += [e.serve.remote(plan) for e in self.experts]
        results = await self._gather(refs, plan)
        return results[: self.shape.trunk_ranks]

    async def _gather(self, refs: list, plan: StepPlan | None) -> list:
        """Await every rank; once one finished or failed, the rest get one deadline to follow."""
        deadline = self.config.deadline_s
        futs = {asyncio.wrap_future(ref.future()): i for i, ref in enumerate(refs)}
        pending = set(futs)
        n_collectives = 3 * len(plan.moe_layers) + 1 if plan is not None else 1
        overall = time.monotonic() + deadline * n_collectives + deadline
        first_done: float | None = None
        first_error: float | None = None
        while pending:
            limit = overall if first_done is None else min(overall, first_done + deadline + 5.0)
            if first_error is not None:
                # Peers of a failed rank error within moments; whoever is still silent is hung.
                limit = min(limit, first_error + ERROR_GRACE_S)
            timeout = max(0.0, limit - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            if first_done is None:
                first_done = time.monotonic()
            if first_error is None and any(f.exception() is not None for f in done):
                first_error = time.monotonic()
        dead, errors, out = [], {}, [None] * len(refs)
        for fut, i in futs.items():
            if fut in pending:
                fut.cancel()
                continue
            exc = fut.exception()
            if exc is None:
                out[i] = fut.result()
            elif isinstance(
                exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError)
            ):
                dead.append(i)
            else:
                errors[i] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        timed_out = sorted(futs[f] for f in pending)
        if dead or timed_out or errors:
            self._broken = GroupFailure(
                self.epoch, dead=tuple(sorted(dead)), timed_out=tuple(timed_out), errors=errors, names=self.names
            )
            raise self._broken
        return out

    # ----------------------------------------------------------------- statistics
    def expert_load(self) -> dict[str, torch.Tensor]:
        """Expert load since the last call, and its moving average.

        Keys: tokens_per_expert [layers, E] routed by the trunk ranks (summed); tokens_per_rank [layers, X] that
        routing split over the map's copies; received_per_expert [layers, E] and received_per_rank [layers, X]:
        rows the expert ranks actually received; padding_rows [layers]: empty capacity slots (counted apart);
        window_per_expert [layers, E]: per-step mean of received rows over the last `load_window_steps` steps;
        window_steps. Layers are the decoder MoE layers, then the MTP layers (the draft passes).
        """
        per_expert = sum(ray.get([t.take_load.remote() for t in self.trunks]))
        assert isinstance(per_expert, torch.Tensor)
        out = {"tokens_per_expert": per_expert}
        if self.expert_map is not None:
            out["tokens_per_rank"] = per_rank_load(per_expert, self.expert_map.owners, self.shape.expert_ranks)
            got = ray.get([e.take_received.remote() for e in self.experts], timeout=self.config.deadline_s + 60)
            out["received_per_expert"] = sum(g["tokens"] for g in got)
            out["received_per_rank"] = torch.stack([g["tokens"].sum(dim=1) for g in got], dim=1)
            out["padding_rows"] = sum(g["padding"] for g in got)
            steps = int(got[0]["steps"]) if got else 0
            self.load_window.add(steps, out["received_per_expert"], out["padding_rows"])
            mean = self.load_window.mean_tokens()
            if mean is not None:
                out["window_per_expert"] = mean
            out["window_steps"] = torch.tensor(self.load_window.steps)
        return out

    def save_load(self, path: str) -> dict[str, Any]:
        """Write the moving-average load (cluster/expert_load.py's file format); returns what was written."""
        self.expert_load()
        mean, pad = self.load_window.mean_tokens(), self.load_window.mean_padding()
        if mean is None:
            raise RuntimeError("no expert load measured yet: serve some steps first")
        write_load_file(path, mean, steps=self.load_window.steps, padding=pad)
        return {"path": path, "steps": self.load_window.steps, "layers": int(mean.shape[0])}

    # ----------------------------------------------------------------- rebalancing
    async def rebalance(self, redundant: int = 0, *, tolerance: float = 0.02) -> dict[str, Any]:
        """Re-place the experts by the measured load (moving average), moving weights while serving.

        Make before break: every expert rank loads its new experts beside the serving ones and acknowledges;
        only then does the group bump `map_version`, which the next step's plan carries, and every rank
        switches at that step (the old slots are freed there). A failure while loading drops what was staged
        and keeps the old map serving. Returns the report: before/after max/mean per layer (by the window's
        load), moved slots, version.

        Raises:
            RuntimeError: no load measured yet, another rebalance running, or the move failed (old map kept).
        """
        if self.expert_map is None:
            raise RuntimeError("no expert ranks: nothing to rebalance")
        if self._broken is not None:
            raise RuntimeError(f"the group is down: {self._broken}")
        if self._rebalancing:
            raise RuntimeError("a rebalance is already running")
        self._rebalancing = True
        try:
            await asyncio.to_thread(self.expert_load)
            load = self.load_window.mean_tokens()
            if load is None or float(load.sum()) == 0.0:
                raise RuntimeError("no expert load measured yet: serve some steps first")
            old = self.expert_map
            x = self.shape.expert_ranks
            layers = load[: old.num_moe_layers].tolist()
            # MoE layers no rank measured (MTP layers of a checkpoint without MTP weights): even load, kept in place
            layers += [[1.0] * len(layers[0])] * (old.num_moe_layers - len(layers))
            new = rebalance(layers, num_ranks=x, redundant=redundant, current=old, tolerance=tolerance)
            before = rank_imbalance(per_rank_load(layers, old.owners, x))
            after = rank_imbalance(per_rank_load(layers, new.owners, x))
            version = self.map_version + 1
            t0 = time.monotonic()
            refs = [e.stage_map.remote(new, version) for e in self.experts]
            refs += [t.stage_map.remote(new, version) for t in self.trunks]
            try:
                acks = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.config.load_timeout_s)
            except BaseException as e:
                for a in self.experts + self.trunks:
                    a.drop_staged.remote(version)
                raise RuntimeError(
                    f"expert weight move failed, the old map (v{self.map_version}) keeps serving: {e}"
                ) from e
            # every rank holds the new map: from the next step on the plan names it (steps already sent run the old)
            self.expert_map, self.map_version = new, version
            return {
                "version": version,
                "redundant": redundant,
                "moved_slots": moved_slots(old, new),
                "total_slots": sum(len(r) for layer in new.owners for r in layer),
                "experts_loaded": sum(int(a["experts_loaded"]) for a in acks[:x]),
                "load_s": round(time.monotonic() - t0, 3),
                "window_steps": self.load_window.steps,
                "imbalance_before": [round(v, 4) for v in before.tolist()],
                "imbalance_after": [round(v, 4) for v in after.tolist()],
                "max_imbalance_before": round(float(before.max()), 4),
                "max_imbalance_after": round(float(after.max()), 4),
            }
        finally:
            self._rebalancing = False
