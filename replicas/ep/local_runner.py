"""The in-process runner: the single-process model (one trunk rank, every expert local) as the engine drives it.

`LocalRunner` implements the engine's `AsyncRunner` protocol (replicas/engine/engine.py), as the
expert-parallel group (replicas/ep/group.py) does, so `epserve generate`, the benchmarks and the tests
run the same Engine (schedule -> execute -> update, speculation included) as serving. It is the seam of
the GPU path: weights and caches live on the model's device, and on a CUDA device decode steps replay
CUDA graphs captured at construction, one per batch-size / context bucket (replicas/ep/decode_graphs.py;
`cuda_graph=False`, `--no-cuda-graph`, turns them off); the engine above it does not change.
Steps run on one dedicated worker thread, so the event loop keeps serving while the model computes and
thread-bound state (a device's current stream, captured graphs) always sees the same thread.
Tests: tests/replicas/test_offline_generate.py, tests/replicas/test_speculative.py,
tests/replicas/test_decode_graphs.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from model_shards.cache import CachePools
from model_shards.model import LocalModel
from replicas.engine.step_types import StepRequest, StepResult
from replicas.ep.actors import CacheSizes, fit_caches_to_device
from replicas.ep.decode_graphs import DecodeGraphs, is_fake
from replicas.ep.dispatch import LocalDispatcher
from replicas.ep.trunk_rank import CANARY_RESERVE, TrunkRank


class LocalRunner:
    """One trunk rank with every expert in-process (`--expert-ranks 0`).

    Args:
        model: the loaded model (trunk and all experts).
        caches: the KV blocks and state slots to allocate; the engine's BlockPool must match them
            (replicas/ep/offline_generate.py `engine_pools`, which reads `self.caches`).
        gpu_memory_utilization: on cuda, size the blocks (and at most `caches.num_slots` slots) from the free
            device memory after the weights loaded (model_shards/cache_sizing.py); None, or on cpu: the fixed counts.
        cuda_graph: decode steps through CUDA graphs, captured here, where the model is on a CUDA device (on cpu
            nothing to do); False: every step eager.
        decode_graphs: "auto" (what `cuda_graph` says), or "static": the graphs' static-buffer path without
            capture on any device (how the CPU tests prove bucketing and padding change nothing).
    """

    num_trunk_ranks = 1

    def __init__(
        self,
        model: LocalModel,
        caches: CacheSizes,
        *,
        gpu_memory_utilization: float | None = None,
        cuda_graph: bool = True,
        decode_graphs: str = "auto",
    ) -> None:
        if decode_graphs not in ("auto", "static"):
            raise ValueError(f"decode_graphs must be 'auto' or 'static', got {decode_graphs!r}")
        self.vocab_size = model.cfg.vocab_size
        self.device = model.device  # the runner's one device: the model's weights, its pools and batches
        if gpu_memory_utilization is not None and self.device.type == "cuda":
            caches = fit_caches_to_device(
                caches,
                model.cfg,
                device=self.device,
                dtype=model.dtype,
                utilization=gpu_memory_utilization,
                with_mtp=model.trunk.w.mtp is not None,
            )
        self.caches = caches
        pools = model.allocate(  # plus the canary's reserved block and slot (trunk_rank.py)
            num_blocks=caches.num_blocks + CANARY_RESERVE,
            block_size=caches.block_size,
            num_slots=caches.num_slots + CANARY_RESERVE,
            spec_tokens=caches.spec_tokens,
            num_checkpoints=caches.state_checkpoints,
        )
        routed = LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
        self.rank = TrunkRank(model.trunk, pools, routed)
        self.rank.canary()  # a device, layout or weight mistake fails here, not at the first request
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epserve-local-runner")
        real_cuda = self.device.type == "cuda" and not is_fake(model.trunk.w.embed)
        capture = cuda_graph and real_cuda and decode_graphs == "auto" and model.trunk.attention == "paged"
        self.graphs: DecodeGraphs | None = None
        if capture or decode_graphs == "static":
            self.graphs = DecodeGraphs(
                model.trunk,
                pools,
                routed,
                max_rows=caches.num_slots,
                max_keys=min(caches.num_blocks * caches.block_size, model.cfg.max_position_embeddings),
                pad_block=self.rank.canary_block,  # padding rows write only the canary's reserved block and slot
                pad_slot=self.rank.canary_slot,
                capture=capture,
            )
            self._thread.submit(self.graphs.capture).result()  # on the thread that replays them
            self.rank.decode_graphs = self.graphs

    @property
    def pools(self) -> CachePools:
        return self.rank.pools

    def run_step(self, requests: list[StepRequest]) -> list[StepResult]:
        """One step now, on the calling thread (tests that drive the rank by hand)."""
        if len(requests) != 1:
            raise ValueError(f"a LocalRunner has one trunk rank; got {len(requests)} step requests")
        return [self.rank.step(requests[0])]

    async def step(self, requests: list[StepRequest]) -> list[StepResult]:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.run_step, requests)

    def close(self) -> None:
        """Stop the worker thread (it also ends when the runner is garbage collected)."""
        self._thread.shutdown(wait=True)
