"""The engine deployment: one Serve replica = one expert-parallel group + its engine.

Owns: building the group inside the replica's own placement group (bundle 0 is this replica,
the ranks' bundles follow, so replicas scale in whole groups), the engine's step loop, readiness
(weights loaded and a step run), Serve's health hook (a group that cannot be rebuilt fails the
replica so Serve replaces it), draining on stop (epserve/serve_cmd.py), and pushing metrics to the
app's hub. `serve.deployment` is applied in replicas/serving/app.py. Tests: tests/replicas/test_serving.py,
tests/replicas/test_graceful_shutdown.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import ray
import torch

from cluster.expert_balance import rebalance
from cluster.expert_load import per_rank_load, rank_imbalance, read_load_file
from cluster.placement import ExpertMap
from cluster.topology import GroupShape
from model_shards.config import ModelConfig, from_hf_config
from replicas.engine.block_pool import BlockPool
from replicas.engine.engine import Engine
from replicas.engine.engine_types import GenerateRequest, RequestOutput
from replicas.engine.scheduler import SchedulerConfig
from replicas.ep.actors import CacheSizes
from replicas.ep.group import ExpertParallelGroup, GroupConfig
from replicas.serving.app_args import AppArgs
from replicas.serving.metrics import MetricsRegistry, push_forever, record_prefix_cache, retire_from_hub
from replicas.serving.rebalance_trigger import RebalanceTrigger, auto_rebalance

if TYPE_CHECKING:  # annotations only: llguidance loads with the first grammar
    from replicas.engine.structured_output import GrammarCache

log = logging.getLogger("ray.serve.epserve.engine")

METRICS_PUSH_S = 1.0
CALLER_CHECK_S = 1.0  # how often the callers (ingress replicas) of open requests are checked for life


class EngineServer:
    """Hosts one group and its engine.

    Args:
        args: the app's `AppArgs` as a dict.
        metrics_hub: handle of the app's MetricsHub actor, or None.
    """

    def __init__(self, args: dict[str, Any], metrics_hub: Any = None) -> None:  # noqa: ANN401  # Ray handle
        from model_shards.tiny_checkpoint import resolve_model_dir

        a = AppArgs.model_validate(args)
        self.args = a
        folder = resolve_model_dir(a.model)
        self.cfg = from_hf_config(folder)
        k = a.speculative_tokens
        if k and not self.cfg.has_mtp:
            raise ValueError(f"speculative_tokens {k} needs an MTP head: {folder}'s config has mtp_num_hidden_layers 0")
        caches = CacheSizes(
            num_blocks=a.num_kv_blocks,
            block_size=a.block_size,
            num_slots=a.max_num_seqs,
            spec_tokens=k,
            state_checkpoints=a.prefix_state_checkpoints(),
        )
        placement = ray.util.get_current_placement_group()
        self.group = ExpertParallelGroup(
            GroupConfig(
                model_dir=a.model,
                shape=GroupShape(a.trunk_ranks, a.expert_ranks),
                dtype=a.dtype,
                deadline_s=a.collective_deadline_s,  # type: ignore[arg-type]  # set by AppArgs' validator
                caches=caches,
                capacity_factor=a.capacity_factor,
                micro_batches=a.micro_batches or 1,  # set by AppArgs' validator
                cpus_per_rank=a.cpus_per_rank,
                gpus=a.gpus,
                gpu_memory_utilization=a.gpu_memory_utilization,
                load_timeout_s=a.load_timeout_s,
                expert_map=_initial_map(a, self.cfg),
                rank_nodes=a.group_rank_nodes(),
                move_experts_per_step=a.rebalance_experts_per_step,
            ),
            placement=placement,
            first_bundle=1 if placement is not None else 0,
        )
        t0 = time.monotonic()
        self.group.start()  # loads every rank's weights and runs one idle step through all of them
        log.info(
            "group of %d trunk + %d expert ranks ready in %.1f s", a.trunk_ranks, a.expert_ranks, time.monotonic() - t0
        )
        self.metrics = MetricsRegistry()
        sized = self.group.caches  # on GPUs sized by the ranks from free memory; else num_kv_blocks / max_num_seqs
        pools = [
            BlockPool(
                num_blocks=sized.num_blocks,
                num_slots=sized.num_slots,
                block_size=sized.block_size,
                num_checkpoints=sized.state_checkpoints,
            )
            for _ in range(a.trunk_ranks)
        ]
        self.engine = Engine(
            self.group,
            pools=pools,
            config=SchedulerConfig(
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, lookahead=2 * k
            ),
            max_waiting=a.max_waiting_requests,
            recover=self.group.rebuild,
            metrics=self.metrics,
            grammars=self._grammar_cache,
            spec_tokens=k,
            prefix_cache=a.prefix_cache_config(),
            max_queue_steps=a.max_queue_steps,
            vocab_size=self.cfg.vocab_size,
            engine_id=_serve_replica_id(),
        )
        self._folder = folder
        self._grammars: GrammarCache | None = None
        self._grammar_lock = threading.Lock()
        self.hub = metrics_hub
        self.replica_id = uuid.uuid4().hex[:12]
        self._push_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None
        self._callers: dict[str, str] = {}  # request id -> name of the replica actor that called
        self._watch_task: asyncio.Task | None = None
        self._trigger = RebalanceTrigger(
            interval_steps=a.rebalance_interval_steps,
            threshold=a.rebalance_imbalance_threshold,
            cooldown_steps=self.group.config.load_window_steps,
        )
        self._rebalance_task: asyncio.Task | None = None

    def _grammar_cache(self) -> GrammarCache:  # built on first use
        """The bounded cache of compiled grammars (its tokenizer costs ~200 MB and seconds: only when needed)."""
        with self._grammar_lock:
            if self._grammars is None:
                from model_shards.generation_config import GenerationDefaults
                from replicas.engine.structured_output import GrammarCache, build_guidance_tokenizer

                eos = GenerationDefaults.load(self._folder, self.cfg).eos_token_ids
                self._grammars = GrammarCache(build_guidance_tokenizer(self._folder, eos_ids=eos))
            return self._grammars

    def _ensure_started(self) -> None:
        self.engine.start()
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_callers())
        if self._rebalance_task is None and self._trigger.enabled:
            self._rebalance_task = asyncio.get_running_loop().create_task(
                auto_rebalance(
                    self._trigger, self.engine, self.group, redundant=self.args.redundant_experts, metrics=self.metrics
                )
            )
        if self._push_task is None and self.hub is not None:
            self._push_task = asyncio.get_running_loop().create_task(
                push_forever(
                    self.hub,
                    self.replica_id,
                    self.metrics,
                    METRICS_PUSH_S,
                    before=self._record_expert_load,
                    on_loop=lambda: record_prefix_cache(self.metrics, self.engine.prefix_cache_stats()),
                )
            )

    def _record_expert_load(self) -> None:
        """Expert load as the expert ranks received it: imbalance since the last push (max / mean tokens per
        expert rank, mean over layers), and over the group's moving window: tokens per step per expert rank,
        max / mean per MoE layer (MTP layers labelled mtpJ), padding rows per step."""
        if self.group.expert_map is None or self.engine.failure is not None:
            return
        try:
            load = self.group.expert_load()
        except Exception:  # noqa: BLE001  # a failing group reports no load
            return
        per_rank = load.get("received_per_rank", load["tokens_per_rank"]).to(torch.float64)
        totals = per_rank.sum(dim=1)
        used = totals > 0
        if bool(used.any()):
            ratio = per_rank[used].max(dim=1).values / per_rank[used].mean(dim=1)
            self.metrics.set("expert_load_imbalance_sum", float(ratio.mean()))
            self.metrics.set("expert_load_imbalance_count", 1.0)
        window = load.get("window_per_expert")
        if window is None:
            return
        win_rank = per_rank_load(window, self.group.expert_map.owners, self.group.shape.expert_ranks)
        rid = self.replica_id
        for j, v in enumerate(win_rank.sum(dim=0).tolist()):
            self.metrics.set("expert_rank_tokens_per_step", v, replica=rid, rank=str(j))
        n_dec = self.cfg.num_layers
        for layer, v in enumerate(rank_imbalance(win_rank).tolist()):
            name = str(layer) if layer < n_dec else f"mtp{layer - n_dec}"
            self.metrics.set("expert_layer_imbalance", v, replica=rid, layer=name)
        pad = self.group.load_window.mean_padding()
        if pad is not None:
            self.metrics.set("expert_padding_rows_per_step", float(pad.sum()), replica=rid)

    async def rebalance(self, redundant: int = 0, skip: list[str] | None = None) -> dict[str, Any]:
        """Admin (epserve rebalance; no HTTP route): re-place this replica's experts by the measured load with
        `redundant` extra copies per layer, moving weights while serving. Returns the report with this
        replica's id; a replica named in `skip` (already done) only returns its id."""
        self._ensure_started()
        if skip and self.replica_id in skip:
            return {"replica": self.replica_id, "skipped": True}
        try:
            report = await self.group.rebalance(redundant)
        except (RuntimeError, ValueError) as e:
            return {"replica": self.replica_id, "error": str(e)}
        log.info(
            "expert rebalance v%d: max/mean %.3f -> %.3f, %d slots moved",
            report["version"],
            report["max_imbalance_before"],
            report["max_imbalance_after"],
            report["moved_slots"],
        )
        return {"replica": self.replica_id, **report}

    async def reset_prefix_cache(self, skip: list[str] | None = None) -> dict[str, Any]:
        """Admin (POST /reset_prefix_cache, `epserve reset-prefix-cache`): drop this replica's prefix cache.
        Returns this replica's id with the states and KV blocks the reset dropped (what running sequences still use
        stays), or an error when the engine has no prefix cache; a replica named in `skip` (already done: calls are
        routed, so the ingress repeats them) only returns its id."""
        if skip and self.replica_id in skip:
            return {"replica": self.replica_id, "skipped": True}
        self._ensure_started()
        before = self.engine.prefix_cache_stats()
        if not self.engine.reset_prefix_cache():
            return {"replica": self.replica_id, "error": "this engine has no prefix cache"}
        after = self.engine.prefix_cache_stats()
        dropped = {k: before[f"prefix_cache_{k}"] - after[f"prefix_cache_{k}"] for k in ("states", "blocks")}
        log.info("prefix cache reset: dropped %d states and %d KV blocks", dropped["states"], dropped["blocks"])
        return {"replica": self.replica_id, **dropped}

    async def save_expert_load(self, path: str) -> dict[str, Any]:
        """Admin: write this replica's moving-average expert load (cluster/expert_load.py's file) at `path`."""
        return await asyncio.to_thread(self.group.save_load, path)

    # ----------------------------------------------------------------- called through handles
    async def generate(self, req: GenerateRequest, caller: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the engine's items as they are (token ids, one item per request per step at most); a cancelled
        call (client gone) aborts it, and so does the death of `caller` (the calling replica's actor name): Ray
        does not cancel a dead caller's stream."""
        self._ensure_started()
        log.info(
            "request %s: admitted, %d prompt tokens, max_tokens %d", req.request_id, len(req.prompt_ids), req.max_tokens
        )
        if caller is not None:
            self._callers[req.request_id] = caller
        try:
            async for item in self.engine.generate(req):
                yield item
        finally:
            self._callers.pop(req.request_id, None)

    async def finish_choice(self, engine_id: str, request_id: str, index: int) -> None:
        """The front end found a stop string in choice `index`: stop generating it (caches freed between steps).
        `engine_id` (RequestOutput.engine_id) is read by the request router, which sends this call to the replica
        running the request (replicas/serving/engine_router.py); elsewhere the request is unknown and this is a
        no-op."""
        self.engine.finish_choice(request_id, index)

    async def _watch_callers(self) -> None:
        while True:
            await asyncio.sleep(CALLER_CHECK_S)
            for name in set(self._callers.values()):
                if not await asyncio.to_thread(_actor_alive, name):
                    for rid in [r for r, c in self._callers.items() if c == name]:
                        log.warning("request %s: its caller %s is gone; aborting", rid, name)
                        self.engine.end(rid, "the ingress replica serving this request is gone")

    async def ready(self) -> bool:
        """Readiness: the group's data path works (a recent step, or an idle canary step now)."""
        self._ensure_started()
        if self.engine.draining:
            return False
        return await self.engine.probe(max_age_s=5.0, timeout_s=4 * self.args.collective_deadline_s + 10)  # type: ignore[operator]  # set by AppArgs' validator

    def record_routing_stats(self) -> dict[str, Any]:
        """Read by the engine request router (replicas/serving/engine_router.py): avoid a group that is down; its
        load (running + waiting) when Serve's queue length of the replica is not known yet."""
        return {
            "available": self.engine.failure is None and not self.engine.draining,
            "running": self.engine.scheduler.num_running,
            "waiting": len(self.engine.scheduler.waiting),
        }

    async def pool_state(self) -> list[dict[str, int]]:
        return self.engine.pool_state()

    async def group_epoch(self) -> int:
        """The group's epoch, bumped by every rebuild (tests check that bad input never fails the group)."""
        return self.group.epoch

    async def stats(self) -> dict[str, Any]:
        """Running and waiting sequences, open streams, aborts and the pools, as of now."""
        return self.engine.stats()

    async def drain(self, grace_s: float) -> tuple[str, int]:
        """Stop admitting (new requests get a retriable 503); open requests may run `grace_s` more, then end
        with a retriable error. Idempotent. Returns this replica's id and its open requests, so the caller
        (epserve/serve_cmd.py) can reach every replica and see when they are done."""
        self._ensure_started()
        if self._drain_task is None:
            log.info("draining: %d open requests get %.1f s", self.engine.stats()["streams"], grace_s)
            self._drain_task = asyncio.get_running_loop().create_task(self.engine.drain(grace_s))
        return self.replica_id, self.engine.stats()["streams"]

    async def check_health(self) -> None:
        """Serve's health hook: unhealthy only when the group is down and could not be rebuilt."""
        self._ensure_started()
        failure = self.engine.failure
        if failure is not None and failure.startswith("rebuild failed"):
            raise RuntimeError(f"expert-parallel group is down: {failure}")

    async def __del__(self) -> None:
        try:
            await self.engine.stop()
        finally:
            self.group.shutdown()
            if self.hub is not None:
                retire_from_hub(self.hub, self.replica_id, self.metrics)


def _initial_map(a: AppArgs, cfg: ModelConfig) -> ExpertMap | None:
    """The expert map placed by a saved load file, or None (contiguous ranges)."""
    if a.expert_load_file is None:
        auto = a.rebalance_interval_steps is not None or a.rebalance_imbalance_threshold is not None
        if a.redundant_experts and not auto:
            raise ValueError(
                "redundant_experts needs expert_load_file or a rebalance trigger (copies are placed by measured load)"
            )
        return None  # contiguous; an automatic rebalance places the copies once load is measured
    if a.expert_ranks == 0:
        raise ValueError("expert_load_file needs expert_ranks >= 1")
    loads = read_load_file(a.expert_load_file, num_experts=cfg.num_experts)
    if not 0 < len(loads) <= cfg.num_moe_layers:
        raise ValueError(f"{a.expert_load_file}: {len(loads)} MoE layers, the model has {cfg.num_moe_layers}")
    loads += [[1.0] * cfg.num_experts] * (cfg.num_moe_layers - len(loads))  # unmeasured (MTP) layers: even
    return rebalance(loads, num_ranks=a.expert_ranks, redundant=a.redundant_experts)


def _serve_replica_id() -> str:
    """This Serve replica's unique id (what the request router sees as `replica_id.unique_id`), or "" outside
    Serve."""
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001  # no replica context (tests that build the server directly)
        return ""


def _actor_alive(name: str) -> bool:
    """Whether the named Serve actor is alive (a dead one's name is released)."""
    from ray.serve._private.constants import SERVE_NAMESPACE

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001  # the GCS unreachable for a moment: assume alive, look again later
        return True
    return True
