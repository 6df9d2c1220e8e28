"""The driver of one expert-parallel group: D trunk-rank actors + X expert-rank actors.

Owns: creating the rank actors in a placement group (the caller's, e.g. a Serve replica's own with bundle 0 = the
replica, or one it creates), forming their process group at trunk rank 0's node on a free port, and `step()`: no Ray
call per step (nothing per layer), returning each trunk rank's sampled tokens. Every rank runs a loop (`run_loop`,
one Ray call per epoch): a trunk rank on its step stream from this driver (the StepRequest out, the StepResult back;
replicas/ep/step_channel.py `StepClient`), an expert rank on the step header trunk rank 0 sends as the step's first
message; the driver holds each loop's call as that rank's health, and Ray keeps placement, lifecycle, statistics,
weight moves and rebuilds (`GroupConfig.expert_loop` / `trunk_loop` False: the earlier Ray call per rank per step).
A failed step raises `GroupFailure`, which names the failed ranks (the one whose call raised on its own, whose
process died, or that hung: alive, busy outside any collective while its peers wait, read from per-rank progress
polled on the actors' control thread, so within seconds rather than at the collective deadline) apart from the
collateral ones (waiting in a collective, silent under NCCL, erroring under gloo); `rebuild()` replaces only the
failed ranks, while the collateral ones keep their weights, abort their communicator and join the new process group
(a new epoch); an idle step checks the data path.
Tests: tests/replicas/test_group.py, tests/replicas/test_failures.py (failure classification, recovery),
tests/replicas/test_step_channel.py (the streams), tests/replicas/test_rebalance.py (load statistics, rebalancing),
tests/replicas/test_lost_node.py (a lost node, slow).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
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
from cluster.rank_progress import CollectiveError
from cluster.topology import GroupShape, Topology
from model_shards.config import ModelConfig, from_hf_config
from model_shards.tiny_checkpoint import resolve_model_dir
from replicas.engine.step_types import StepRequest, StepResult
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan, fixed_capacity
from replicas.ep.actors import CacheSizes, ExpertRankActor, RankSpec, TrunkRankActor
from replicas.ep.micro_batches import max_micro_batch_tokens
from replicas.ep.step_channel import StepClient

if TYPE_CHECKING:
    from ray.actor import ActorClass

log = logging.getLogger("ray.serve.epserve.group")

POLL_S = 0.5  # a step running longer than this gets its ranks' progress polled, every this many seconds
FINAL_POLL_S = 2.0  # after a rank failed, a running rank that cannot report its progress this fast is frozen
ABORT_WAIT_S = 10.0
MAX_RECREATE = 3  # per replaced rank: fresh actors that may die unstarted (their node lost) before a rebuild gives up
DEAD_ERRORS = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError)


class GroupFailure(RuntimeError):
    """A step of the group failed. Failed ranks (replaced by `rebuild`) are apart from collateral ones (kept).

    Attributes:
        epoch: the group's epoch when it failed (bumped by each rebuild).
        dead: global ranks whose process died. hung: ranks alive but not progressing (busy outside any
            collective while peers waited, or not answering the progress poll) for `hang_s`.
        raised: global rank -> error text, for ranks whose call raised on their own (not in a collective).
        collateral: ranks that were waiting in a collective (silent, or erroring because of the failed ones).
        detect_s: seconds from the step's start until the failure was classified.
    """

    def __init__(
        self,
        epoch: int,
        *,
        dead: tuple[int, ...] = (),
        hung: tuple[int, ...] = (),
        raised: dict[int, str] | None = None,
        collateral: tuple[int, ...] = (),
        names: dict[int, str],
        detect_s: float = 0.0,
    ) -> None:
        self.epoch, self.dead, self.hung, self.raised = epoch, dead, hung, dict(raised or {})
        self.collateral, self.detect_s = collateral, detect_s
        parts = []
        if dead:
            parts.append("dead: " + ", ".join(names[r] for r in dead))
        if hung:
            parts.append("hung: " + ", ".join(names[r] for r in hung))
        if self.raised:
            parts.append("raised: " + "; ".join(f"{names[r]}: {t[:200]}" for r, t in sorted(self.raised.items())))
        if collateral:
            parts.append("collateral: " + ", ".join(names[r] for r in collateral))
        super().__init__(f"expert-parallel group epoch {epoch} failed ({'; '.join(parts) or 'unknown'})")

    @property
    def timed_out(self) -> tuple[int, ...]:
        return self.hung

    @property
    def failed_ranks(self) -> tuple[int, ...]:
        """Ranks to replace: the dead, the hung and those that raised on their own; if no rank can be blamed
        (every one erred in a collective), all of them."""
        culprits = set(self.dead) | set(self.hung) | set(self.raised)
        return tuple(sorted(culprits or set(self.collateral)))


class _HangWatch:
    """The driver's view of each rank's progress during one step (RankProgress snapshots, polled)."""

    def __init__(self, n: int, hang_s: float) -> None:
        now = time.monotonic()
        self.hang_s = hang_s
        # a rank's control thread answers in milliseconds even mid-step: silence means a frozen process
        self.silent_s = hang_s / 2
        self.snap: list[tuple[int, int, bool, bool] | None] = [None] * n
        self.changed = [now] * n  # when the snapshot last changed (or the step began)
        self.answered = [now] * n  # when the rank last answered a poll
        self.polls: dict[int, Any] = {}  # rank -> outstanding poll future

    def record(self, i: int, snap: tuple[int, int, bool, bool], now: float) -> None:
        if snap != self.snap[i]:
            self.snap[i], self.changed[i] = snap, now
        self.answered[i] = now

    def hung(self, pending: set[int], now: float) -> list[int]:
        """Pending ranks that stopped: not answering for hang_s / 2, or busy outside a collective and unchanged
        for hang_s while some peer waits (finished, inside a collective, or past this rank's collectives)."""
        out = []
        for i in sorted(pending):
            if now - self.answered[i] > self.silent_s:
                out.append(i)
                continue
            s = self.snap[i]
            if s is None or not s[3] or s[2] or now - self.changed[i] <= self.hang_s:
                continue
            if any(j != i and (j not in pending or self._waits_for(j, s)) for j in range(len(self.snap))):
                out.append(i)
        return out

    def _waits_for(self, j: int, behind: tuple[int, int, bool, bool]) -> bool:
        """Rank j waits: inside a collective, or past the collectives the rank `behind` has entered this step."""
        s = self.snap[j]
        return s is not None and (s[2] or (s[3] and s[1] > behind[1]))

    def in_collective(self, j: int) -> bool:
        s = self.snap[j]
        return s is not None and s[2]

    def idle(self, j: int) -> bool:
        """Rank j is between steps (an expert loop waiting for the next step header)."""
        s = self.snap[j]
        return s is not None and not s[3]


@dataclass(frozen=True)
class GroupConfig:
    """How to build a group.

    Attributes:
        deadline_s: bound on every collective (seconds in CI, tens of seconds on GPUs): the last resort; failed
            and hung ranks are named from the ranks' own reports first (`hang_s`).
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
    # the plan node of each global rank (cluster/traffic.py place_by_traffic): one bundle per node, each rank in
    # its node's bundle; None: one bundle per rank (the caller's placement group must then be built the same way)
    rank_nodes: tuple[int, ...] | None = None
    hang_s: float = 5.0  # a rank busy outside any collective this long while its peers wait is hung
    move_experts_per_step: int = 8  # a rebalance's weight moves: expert copies per expert rank between two steps
    # expert ranks loop on trunk rank 0's step header (no Ray call per step); False: one `serve` call per expert
    # rank per step (the earlier path, kept for the control-cost benchmark's comparison)
    expert_loop: bool = True
    # trunk ranks loop on the driver's step stream (replicas/ep/step_channel.py: the StepRequest out, the StepResult
    # back, no Ray call per step); False: one `step` call per trunk rank per step (kept for the benchmark's
    # comparison)
    trunk_loop: bool = True
    step_sleep_s: float = 0.0  # benchmark only: every rank sleeps this long per step (emulated device compute)
    # ping-pong micro-batches per trunk rank in the decoder layers' exchanges (replicas/ep/micro_batches.py); 1: off
    micro_batches: int = 1


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
        self._steps_in_flight = 0
        self._steps_done = 0
        self._own_pg = placement is None
        self._layout: GroupPlacement = plan_placement(
            self.shape,
            Topology(
                nodes=max(config.rank_nodes or (0,)) + 1,
                gpus_per_node=self.shape.world_size if config.gpus else 0,
                gpu_memory_gib=1.0 if config.gpus else 0.0,
            ),
            cpus_per_rank=config.cpus_per_rank,
            strategy=config.strategy,
            rank_nodes=config.rank_nodes,
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
        self._stuck: dict[int, Any] = {}  # global rank -> its call of the failed step, still running
        self._loops: dict[int, Any] = {}  # global rank -> its `run_loop` call (expert_loop, trunk_loop)
        self._streams: list[StepClient] = []  # trunk rank i's step stream (trunk_loop), per epoch
        self._loop_cfs: dict[int, Any] = {}  # ... and that call's concurrent future, made once per loop
        self._loop_async: tuple[asyncio.AbstractEventLoop, dict[asyncio.Future, int]] | None = None
        self.actors_created = [0] * self.shape.world_size  # per global rank: weight loads (a replacement adds one)
        self.last_recovery: dict[str, Any] = {}  # what the last rebuild replaced and kept, and its seconds
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
                state_checkpoints=min(int(i.get("num_checkpoints", 0)) for i in infos),
            )
        self._form_group()
        self._open_streams()
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
            expert_loop=self.config.expert_loop,
            step_sleep_s=self.config.step_sleep_s,
        )
        self._created += 1
        self.actors_created[global_rank] += 1
        role = f"trunk{index}" if is_trunk else f"expert{index}"
        opts = dict(
            num_cpus=self.config.cpus_per_rank,
            num_gpus=1 if self.config.gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self._pg,  # type: ignore[arg-type]  # placed by start() before any actor
                placement_group_bundle_index=(
                    self._layout.bundle_of(global_rank)
                    if self.config.rank_nodes is not None
                    else self._first_bundle + global_rank
                ),
            ),
            name=f"epserve-{self.group_id}-{role}-{self._created}",
        )
        # ray.remote in actors.py makes these names Ray actor classes; mypy keeps a decorated class's own type
        actor_class = cast("ActorClass[Any]", TrunkRankActor if is_trunk else ExpertRankActor)
        return actor_class.options(**opts).remote(spec)

    def _form_group(self) -> None:
        self._loops, self._loop_cfs, self._loop_async = {}, {}, None
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
        timeout = self.config.deadline_s + 60
        if not self.config.expert_loop:
            ray.get([a.join.remote(spec) for a in self.trunks + self.experts], timeout=timeout)
            return
        header = ray.get(self.trunks[0].open_header_channel.remote(), timeout=60)
        ray.get(
            [t.join.remote(spec) for t in self.trunks] + [e.join.remote(spec, header) for e in self.experts],
            timeout=timeout,
        )
        self._loops = {self.shape.expert_rank(j): e.run_loop.remote() for j, e in enumerate(self.experts)}
        self._loop_cfs = {r: ref.future() for r, ref in self._loops.items()}

    def _open_streams(self) -> None:
        """trunk_loop: each trunk rank listens for this epoch's step stream and starts its loop; the driver connects
        (proving it holds the token the rank gave it through Ray)."""
        if not self.config.trunk_loop:
            return
        timeout = self.config.deadline_s + 60
        addrs = ray.get([t.open_step_stream.remote() for t in self.trunks], timeout=60)
        loops = {self.shape.trunk_rank(i): t.run_loop.remote(timeout) for i, t in enumerate(self.trunks)}
        self._loops.update(loops)
        self._loop_cfs.update({r: ref.future() for r, ref in loops.items()})
        self._loop_async = None
        self._streams = [StepClient((host, port), token=token, timeout_s=timeout) for host, port, token in addrs]

    def _close_streams(self) -> None:
        for c in self._streams:
            c.close()  # a trunk loop still waiting for a step ends (its stream closed)
        self._streams = []

    def _loop_watch(self) -> dict[asyncio.Future, int]:
        """The rank loops' calls as futures of the running event loop (made once per event loop and epoch: a
        new future per step would leave a callback on every loop call per step)."""
        loop = asyncio.get_running_loop()
        if self._loop_async is None or self._loop_async[0] is not loop:
            self._loop_async = (loop, {asyncio.wrap_future(cf): r for r, cf in self._loop_cfs.items()})
        return self._loop_async[1]

    def _get_steps(self, calls: list, timeout: float) -> list:
        """The results of the steps' calls (Ray calls or step-stream futures), failing as soon as a rank's loop
        ended (its error raised)."""
        futs = [_future(c) for c in calls]
        loops = set(self._loop_cfs.values())
        left, t_end = set(futs), time.monotonic() + timeout
        while left:
            done, _ = concurrent.futures.wait(
                left | loops, timeout=max(0.0, t_end - time.monotonic()), return_when=concurrent.futures.FIRST_COMPLETED
            )
            if not done:
                raise ray.exceptions.GetTimeoutError(f"the group's step did not finish in {timeout:.0f} s")
            for f in done:
                if f in loops:
                    f.result()
                    raise RuntimeError("a rank's step loop ended during the step")
                left.discard(f)
        return [f.result() for f in futs]

    def rebuild(self) -> None:
        """Replace the failed ranks with fresh actors (their weights loaded); the collateral ones keep theirs:
        their communicator is aborted, their call of the failed step returns, and they leave the old process
        group. Then the group re-forms on a new port under a new epoch and one idle step runs through every
        rank. A collateral rank that cannot leave in time (its process or node gone) is replaced too."""
        t0 = time.monotonic()
        broken = self._broken
        actors = self.trunks + self.experts
        failed = set(broken.failed_ranks) if broken else set()
        stuck, self._stuck = self._stuck, {}
        for r in sorted(failed):  # first: a gloo peer waiting on a killed rank returns at once
            ray.kill(actors[r], no_restart=True)
        # the replacements load their weights while the survivors get out of the failed step
        fresh = {r: self._new_actor(r) for r in sorted(failed)}
        survivors = [r for r in range(len(actors)) if r not in failed]
        # NCCL peers keep waiting on a dead rank until their communicator is aborted (on their control thread);
        # a surviving expert rank's loop ends (it may wait for a header that trunk rank 0 will never send), and so
        # does a trunk rank's (its step stream closes)
        self._close_streams()
        control = [actors[r].abort_group.remote() for r in survivors]
        control += [actors[r].stop_loop.remote() for r in survivors if r in self._loops]
        ray.wait(control, num_returns=len(control), timeout=ABORT_WAIT_S)
        bound = self.config.deadline_s + 10
        waiting = [stuck[r] for r in survivors if r in stuck]
        waiting += [self._loops[r] for r in survivors if r in self._loops and self._loops[r] not in waiting]
        self._loops, self._loop_cfs, self._loop_async = {}, {}, None
        if waiting:  # the failed step's calls on the survivors end (in error) before they can leave
            ray.wait(waiting, num_returns=len(waiting), timeout=bound)
        leaves = {r: actors[r].leave.remote() for r in survivors}
        ready, _ = ray.wait(list(leaves.values()), num_returns=len(leaves), timeout=bound)
        for r, ref in leaves.items():
            try:
                if ref not in ready:
                    raise TimeoutError("did not leave in time")
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001  # a survivor that cannot even leave is replaced too
                log.warning("rebuild: %s could not leave its group (%s); replacing it", self.names[r], exc)
                ray.kill(actors[r], no_restart=True)
                failed.add(r)
                fresh[r] = self._new_actor(r)
        t_left = time.monotonic()
        for r, actor in fresh.items():
            actors[r] = actor
        self._wait_loaded(actors, failed)  # may replace a fresh actor in `actors` (its node was lost)
        self.trunks = actors[: self.shape.trunk_ranks]
        self.experts = actors[self.shape.trunk_ranks :]
        t_loaded = time.monotonic()
        self.epoch += 1
        self._broken = None
        self._form_group()
        self._open_streams()
        self.canary()
        self.last_recovery = {
            "replaced": sorted(failed),
            "kept": [r for r in range(len(actors)) if r not in failed],
            "detect_s": broken.detect_s if broken else 0.0,
            "survivors_left_s": round(t_left - t0, 3),
            "loaded_s": round(t_loaded - t0, 3),
            "rebuild_s": round(time.monotonic() - t0, 3),
        }
        log.info(
            "group rebuilt (epoch %d): replaced %s, kept %s, %.1f s",
            self.epoch,
            [self.names[r] for r in sorted(failed)] or "none",
            [self.names[r] for r in self.last_recovery["kept"]] or "none",
            self.last_recovery["rebuild_s"],
        )

    def _wait_loaded(self, actors: list, ranks: set[int]) -> None:
        """Wait until the fresh actors of `ranks` have loaded their weights. One that dies before it ran, not by its
        own error (a lost node: Ray placed it in its bundle on that node before the node's death was known), is
        created once more per lost node it meets: by then Ray reschedules that placement-group bundle on a node that
        has room (a replacement, or a remaining node), and the new actor waits for it."""
        t_end = time.monotonic() + self.config.load_timeout_s
        waiting = {actors[r].pid.remote(): r for r in ranks}
        recreated = 0
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, t_end - time.monotonic()))
            if not ready:
                names = ", ".join(self.names[r] for r in sorted(waiting.values()))
                raise ray.exceptions.GetTimeoutError(
                    f"rebuild: {names} did not load in {self.config.load_timeout_s:.0f} s"
                )
            r = waiting.pop(ready[0])
            try:
                ray.get(ready[0])
            except ray.exceptions.ActorDiedError as exc:
                if exc.actor_init_failed or recreated >= MAX_RECREATE * len(ranks):
                    raise
                recreated += 1
                log.warning("rebuild: the new %s died before it ran (%s); creating it again", self.names[r], exc)
                actors[r] = self._new_actor(r)
                waiting[actors[r].pid.remote()] = r

    def canary(self) -> float:
        """Readiness: every trunk rank runs one token through trunk -> experts -> trunk on its reserved block and
        slot (every exchange of the decoder layers; not counted in the expert load), so a device, layout or
        weight mistake fails here rather than at the first request. Returns seconds."""
        t0 = time.monotonic()
        plan = self._canary_plan() if self.shape.expert_ranks else None
        refs = self._send([StepRequest(canary=True)] * len(self.trunks), plan)
        if plan is not None and not self.config.expert_loop:
            refs += [e.serve.remote(plan) for e in self.experts]
        self._get_steps(refs, self.config.deadline_s * 4 + 10)
        return time.monotonic() - t0

    def shutdown(self) -> None:
        self._close_streams()
        for a in self.trunks + self.experts:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  # already gone
                pass
        self.trunks, self.experts = [], []
        self._loops, self._loop_cfs, self._loop_async = {}, {}, None
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
        # ping-pong over the decoder layers (the MTP passes run as one); C is sized for the largest micro-batch
        m = self.config.micro_batches
        split = self.cfg.num_layers if m > 1 else 0
        tokens = [
            max_micro_batch_tokens([1] * len(r.decodes) + [len(s.token_ids) + len(s.drafts) for s in r.seqs], m)
            for r in requests
        ]
        decode = all(len(s.token_ids) == 1 for r in requests for s in r.seqs)  # one token, drafts or not
        if decode and self.shape.expert_ranks:
            cap = fixed_capacity(
                max(tokens),
                top_k=self.cfg.num_experts_per_tok,
                expert_ranks=self.shape.expert_ranks,
                factor=self.config.capacity_factor,
            )
            return StepPlan(layers, FIXED, cap, micro_batches=m, split_layers=split)
        return StepPlan(layers, VARIABLE, micro_batches=m, split_layers=split)

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
        refs = self._send(requests, plan)
        if plan is not None and not self.config.expert_loop:
            refs += [e.serve.remote(plan) for e in self.experts]
        self._steps_in_flight += 1
        try:
            results = await self._gather(refs, plan)
        finally:  # a rebalance moves its next piece of weights between steps (_step_boundary)
            self._steps_in_flight -= 1
            self._steps_done += 1
        return results[: self.shape.trunk_ranks]

    def _send(self, requests: list[StepRequest], plan: StepPlan | None) -> list:
        """Each trunk rank's step: on its step stream (a future of its result), or a Ray call (trunk_loop off)."""
        if self._streams:
            return [c.send(r, plan) for c, r in zip(self._streams, requests)]
        return [t.step.remote(r, plan) for t, r in zip(self.trunks, requests)]

    async def _gather(self, refs: list, plan: StepPlan | None) -> list:
        """Await every rank's call of the step. A step running past POLL_S gets its ranks' progress polled;
        the step fails as soon as one rank raised on its own, died or hung, and the ranks still waiting are
        collateral (NCCL leaves them silent in the collective; they are not waited for). The collective
        deadline (x the step's collectives) bounds the rest. `refs[i]` is trunk rank i's step (a Ray call, or its
        step stream's future) or, without the expert loop, expert rank i - D's call; the ranks' `run_loop` calls
        are watched beside them (one ending fails the step: a trunk rank's result is then no longer awaited) but
        not waited for."""
        t_start = time.monotonic()
        actors = self.trunks + self.experts
        ref_of = dict(enumerate(refs))  # the Ray call each rank's state hangs on (its loop's, where it has one)
        futs = {asyncio.wrap_future(_future(ref)): i for i, ref in enumerate(refs)}
        loops = self._loop_watch() if self._loops else {}
        ref_of.update(self._loops)
        futs.update(loops)
        pending = set(futs)
        required = set(futs) - set(loops)
        n_collectives = 3 * len(plan.moe_layers) + 1 if plan is not None else 1
        overall = t_start + self.config.deadline_s * (n_collectives + 1)
        watch: _HangWatch | None = None
        out: list = [None] * len(actors)
        dead: list[int] = []
        raised: dict[int, str] = {}
        collateral: list[int] = []
        hung: list[int] = []
        next_poll = t_start + POLL_S
        while required & pending:
            timeout = max(0.0, min(next_poll, overall) - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = futs[fut]
                exc = fut.exception()
                if fut in loops:  # a trunk loop that ended never sends this step's result: stop waiting for it
                    pending -= {f for f in pending if futs[f] == i}
                if exc is None and fut in loops:
                    raised[i] = "its step loop ended outside a rebuild"
                elif exc is None:
                    out[i] = fut.result()
                elif isinstance(exc, CollectiveError):
                    collateral.append(i)  # it was waiting on a peer
                elif isinstance(exc, DEAD_ERRORS):
                    dead.append(i)
                else:
                    raised[i] = _error_text(exc)
            if dead or raised or not required & pending:
                break
            now = time.monotonic()
            if now >= overall:
                break
            if now >= next_poll:
                watch = watch or _HangWatch(len(actors), self.config.hang_s)
                running = {futs[f] for f in pending}
                await self._poll(actors, running, watch)
                hung = watch.hung(running, time.monotonic())
                if hung:
                    break
                next_poll = time.monotonic() + POLL_S
        if not (dead or raised or hung or collateral or required & pending):
            return out[: len(refs)]
        left = sorted({futs[f] for f in pending})
        # the ranks still running: waiting on the failed one, or failed too? (also when only collateral errors came
        # back: a peer's error can overtake the news of the death that caused it)
        asked = bool((dead or raised or collateral) and left)
        if asked:
            more_dead, frozen = await self._ask_pending(actors, left, loops)
            dead += more_dead
            hung += frozen
            left = [i for i in left if i not in more_dead]
        if not (dead or raised or hung) and left:  # only collateral errors, or the deadline: who never finished?
            # first, who died (its death not yet reported through its call: the ranks of a lost node, or processes
            # that exited while their peers' collectives erred first); asked once: the collateral case above asked
            more_dead, frozen = ([], []) if asked else await self._ask_pending(actors, left, loops)
            dead += more_dead
            left = [i for i in left if i not in more_dead]
            if more_dead:
                hung += frozen
            else:  # (an expert loop between two steps, waiting for the next header, is not the one)
                hung = [
                    i
                    for i in left
                    if not (watch and (watch.in_collective(i) or (i in loops.values() and watch.idle(i))))
                ]
                hung = hung or left
        if collateral and (dead or raised or hung):
            # a rank whose collective erred may have died right after: a lost node's ranks error on each other's
            # closed connections, then their processes end with the node; asked once, as the running ones are
            more_dead, frozen = await self._ask_pending(actors, collateral, loops)
            dead += more_dead
            hung += frozen
            collateral = [i for i in collateral if i not in more_dead and i not in frozen]
        for i in left:
            if i not in hung:
                collateral.append(i)
                self._stuck[i] = ref_of[i]
        self._broken = GroupFailure(
            self.epoch,
            dead=tuple(sorted(dead)),
            hung=tuple(sorted(hung)),
            raised=raised,
            collateral=tuple(sorted(collateral)),
            names=self.names,
            detect_s=round(time.monotonic() - t_start, 3),
        )
        raise self._broken

    async def _ask_pending(
        self, actors: list, ranks: list[int], loops: dict[asyncio.Future, int]
    ) -> tuple[list[int], list[int]]:
        """After a rank failed, ask the ranks still running for their progress once: a dead one (its death not
        yet reported through its step call: several ranks of a lost node) is failed, one that cannot answer in
        FINAL_POLL_S is frozen (failed, hung), the others are waiting on the failed one (collateral). A rank whose
        loop call reports its death meanwhile is dead too (whichever of the two Ray tells first)."""
        polls = {asyncio.wrap_future(actors[i].report_progress.remote().future()): i for i in ranks}
        watched = {f: i for f, i in loops.items() if i in ranks and not f.done()}
        answered: set[int] = set()
        dead: set[int] = {i for f, i in loops.items() if i in ranks and f.done() and _died(f)}
        pending = set(polls) | set(watched)
        t_end = time.monotonic() + FINAL_POLL_S
        while pending and len(answered | dead) < len(ranks):
            done, pending = await asyncio.wait(
                pending, timeout=max(0.0, t_end - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                break
            for f in done:
                i = polls.get(f, watched.get(f))
                assert i is not None
                if _died(f):
                    dead.add(i)
                elif f in polls:
                    answered.add(i)
        frozen = sorted(i for i in ranks if i not in answered and i not in dead)
        return sorted(dead), frozen

    async def _poll(self, actors: list, ranks: set[int], watch: _HangWatch) -> None:
        """Ask `ranks` for their progress (one outstanding poll per rank); wait up to POLL_S for the answers."""
        for i in ranks:
            if i not in watch.polls:
                watch.polls[i] = asyncio.wrap_future(actors[i].report_progress.remote().future())
        polls = {f: i for i, f in watch.polls.items() if i in ranks}
        if not polls:
            return
        done, _ = await asyncio.wait(polls, timeout=POLL_S)
        now = time.monotonic()
        for f in done:
            i = polls[f]
            del watch.polls[i]
            if f.exception() is None:
                watch.record(i, f.result(), now)

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
    @property
    def rebalancing(self) -> bool:
        return self._rebalancing

    def window_imbalance(self) -> float | None:
        """The worst MoE layer's max/mean rows per expert rank under the current map, by the load window's
        mean (None before any load was measured)."""
        mean = self.load_window.mean_tokens()
        if self.expert_map is None or mean is None or float(mean.sum()) == 0.0:
            return None
        n = min(int(mean.shape[0]), self.expert_map.num_moe_layers)
        per_rank = per_rank_load(mean[:n], self.expert_map.owners[:n], self.shape.expert_ranks)
        return float(rank_imbalance(per_rank).max())

    async def rebalance(
        self,
        redundant: int = 0,
        *,
        tolerance: float = 0.05,
        experts_per_step: int | None = None,
        peer_copy: bool = True,
    ) -> dict[str, Any]:
        """Re-place the experts by the measured load (moving average), moving weights while serving.

        Make before break: every expert rank loads its new experts beside the serving ones (in pieces of at most
        `experts_per_step` copies per rank, default the config's, 0 = all at once, one piece between two serving
        steps; each copy from a rank that holds it when `peer_copy`, else or on failure from the checkpoint) and
        acknowledges; only then does the group bump `map_version`, which the next step's plan carries, and every rank
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
            # the search takes a while on a large model: off the event loop, which keeps serving steps
            new = await asyncio.to_thread(
                rebalance, layers, num_ranks=x, redundant=redundant, current=old, tolerance=tolerance
            )
            before = rank_imbalance(per_rank_load(layers, old.owners, x))
            after = rank_imbalance(per_rank_load(layers, new.owners, x))
            version = self.map_version + 1
            t0 = time.monotonic()
            per_step = self.config.move_experts_per_step if experts_per_step is None else experts_per_step
            try:
                refs = [e.begin_stage.remote(new, version) for e in self.experts]
                refs += [t.stage_map.remote(new, version) for t in self.trunks]
                needed = (await asyncio.wait_for(asyncio.gather(*refs), timeout=self.config.load_timeout_s))[:x]
                moved = await asyncio.wait_for(
                    self._move_weights(needed, old, version, per_step, peer_copy), timeout=self.config.load_timeout_s
                )
                finish = [e.finish_stage.remote(version) for e in self.experts]
                acks = await asyncio.wait_for(asyncio.gather(*finish), timeout=self.config.load_timeout_s)
            except BaseException as e:
                for a in self.experts + self.trunks:
                    a.drop_staged.remote(version)
                if isinstance(e, asyncio.CancelledError):
                    raise  # the caller went away (e.g. the engine stopping): the old map simply stays
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
                "experts_loaded": sum(int(a["experts_loaded"]) for a in acks),
                "from_peer": moved["peer"],
                "from_checkpoint": moved["checkpoint"],
                "pieces": moved["pieces"],
                "load_s": round(time.monotonic() - t0, 3),
                "window_steps": self.load_window.steps,
                "imbalance_before": [round(v, 4) for v in before.tolist()],
                "imbalance_after": [round(v, 4) for v in after.tolist()],
                "max_imbalance_before": round(float(before.max()), 4),
                "max_imbalance_after": round(float(after.max()), 4),
            }
        finally:
            self._rebalancing = False

    async def _move_weights(
        self, needed: list[list], old: ExpertMap, version: int, per_step: int, peer_copy: bool
    ) -> dict[str, int]:
        """Send every expert rank the copies it lacks, `per_step` per rank per piece with a serving step between
        pieces (bounded work per step keeps step latency). A copy comes from a rank that holds it under the old
        map (its export travels as a Ray object), spreading the exports over the holders; an export that fails
        falls back to the checkpoint. Raises whatever a rank's load raised."""
        left = [[(int(layer), int(e)) for layer, e in items] for items in needed]
        counts = {"peer": 0, "checkpoint": 0, "pieces": 0}
        while any(left):
            if counts["pieces"]:
                await self._step_boundary()
            exports: list[tuple[int, list, Any]] = []  # (target rank, items, export ref)
            from_ckpt: list[list] = [[] for _ in left]
            for j, items in enumerate(left):
                piece, left[j] = (items[:per_step], items[per_step:]) if per_step > 0 else (items, [])
                by_peer: dict[int, list] = {}
                for layer, e in piece:
                    holders = [r for r in old.owners[layer][e] if r != j] if peer_copy else []
                    if holders:
                        by_peer.setdefault(min(holders, key=lambda r: (len(by_peer.get(r, ())), r)), []).append(
                            (layer, e)
                        )
                    else:
                        from_ckpt[j].append((layer, e))
                exports += [(j, its, self.experts[k].export_experts.remote(its)) for k, its in by_peer.items()]
            got = await asyncio.gather(*(ref for _, _, ref in exports), return_exceptions=True)
            refs_for: list[list] = [[] for _ in left]
            for (j, its, ref), value in zip(exports, got):
                if isinstance(value, BaseException):
                    from_ckpt[j] += its  # the peer could not export: the checkpoint has them
                else:
                    refs_for[j].append(ref)
            stage = [
                self.experts[j].stage_piece.remote(version, from_ckpt[j], *refs_for[j])
                for j in range(len(left))
                if from_ckpt[j] or refs_for[j]
            ]
            for done in await asyncio.gather(*stage):
                counts["peer"] += int(done["peer"])
                counts["checkpoint"] += int(done["checkpoint"])
            counts["pieces"] += 1
        return counts

    async def _step_boundary(self, poll_s: float = 0.002) -> None:
        """Return once the step in flight (if any) has finished: the next piece of a move runs between steps."""
        done = self._steps_done
        while self._steps_in_flight and self._steps_done == done:
            await asyncio.sleep(poll_s)


def _future(call: concurrent.futures.Future | ray.ObjectRef) -> concurrent.futures.Future:
    """A rank's call as a concurrent future: a step-stream future as it is, a Ray call's own."""
    return call if isinstance(call, concurrent.futures.Future) else call.future()


def _died(fut: asyncio.Future) -> bool:
    return not fut.cancelled() and isinstance(fut.exception(), DEAD_ERRORS)


def _error_text(exc: BaseException) -> str:
    """The last line of a rank's error (Ray wraps it in a traceback)."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
