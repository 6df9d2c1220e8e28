"""The readiness canary is a real one-token forward: corrupt expert weights fail readiness, healthy ones pass,
and the canary counts nothing in the expert load.

Failure induced for real: a checkpoint whose layer-0 routed experts hold NaN (headers and shapes valid, so
loading succeeds; only running the model shows it), and the same corruption written into a running
LocalRunner's expert tensors (the engine's readiness probe must then say not ready). Oracle for "counts
nothing": the counters are zero after start (known answer), and a real step afterwards still counts its
tokens (so the counters are live, and the zero is the canary's doing, not a dead counter).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from model_shards.model import LocalModel
from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest
from replicas.ep.actors import CacheSizes
from replicas.ep.local_runner import LocalRunner
from replicas.ep.offline_generate import offline_engine

pytestmark = pytest.mark.timeout(300)

BLOCK = 16
LAYER0_EXPERTS = ".layers.0.mlp.experts."


@pytest.fixture(scope="module")
def corrupt_checkpoint(hf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hf_checkpoint with every routed expert of MoE layer 0 set to NaN (a corrupt download, say)."""
    out = tmp_path_factory.mktemp("corrupt") / "ckpt"
    shutil.copytree(hf_checkpoint, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(str(f))
        hit = [n for n in tensors if LAYER0_EXPERTS in n]
        for n in hit:
            tensors[n] = torch.full_like(tensors[n], float("nan"))
        if hit:
            save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def _one_token_step(seq_id: int = 1) -> StepRequest:
    start = SeqStart(slot=0, params=SamplingParams(temperature=0.0), prompt_len=3)
    return StepRequest(seqs=(SeqStep(seq_id, 0, (5, 6, 7), new_blocks=(0,), start=start),))


def test_local_runner_canary_passes_and_counts_nothing(hf_checkpoint: Path) -> None:
    runner = LocalRunner(LocalModel.load(hf_checkpoint, dtype="float32"), CacheSizes(4, BLOCK, 2))
    try:
        load = runner.rank.routed.load
        assert int(load.counts.sum()) == 0  # the canary ran in __init__
        res = runner.run_step([StepRequest(canary=True)])[0]
        assert res.token_ids == () and int(load.counts.sum()) == 0
        # the reserved block and slot are beyond what the engine may address
        assert runner.rank.canary_block == 4 and runner.rank.canary_slot == 2
        refused = runner.run_step(
            [
                StepRequest(
                    seqs=(
                        SeqStep(
                            2, 0, (1,), new_blocks=(4,), start=SeqStart(slot=0, params=SamplingParams(), prompt_len=1)
                        ),
                    )
                )
            ]
        )[0]
        assert "outside this rank's pools" in (refused.errors[0] or "")
        runner.run_step([_one_token_step()])  # a real step counts: 3 tokens x top-k per MoE layer
        cfg = runner.rank.trunk.cfg
        assert int(load.counts.sum()) == 3 * cfg.num_experts_per_tok * cfg.num_layers
    finally:
        runner.close()


def test_corrupt_experts_fail_local_readiness(hf_checkpoint: Path, corrupt_checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match="canary: .*non-finite"):
        LocalRunner(LocalModel.load(corrupt_checkpoint, dtype="float32"), CacheSizes(4, BLOCK, 2))
    # corrupted while running: the engine's readiness probe runs the canary and reports not ready
    runner = LocalRunner(LocalModel.load(hf_checkpoint, dtype="float32"), CacheSizes(4, BLOCK, 2))

    async def probe() -> tuple[bool, bool]:
        engine = offline_engine(runner, max_prompt_len=16)
        engine.start()
        try:
            healthy = await engine.probe(max_age_s=0.0, timeout_s=30)
            gate_up = runner.rank.routed.shard.layers[0].gate_up  # type: ignore[attr-defined]  # LocalDispatcher
            gate_up.fill_(float("nan"))
            return healthy, await engine.probe(max_age_s=0.0, timeout_s=30)
        finally:
            await engine.stop()

    try:
        healthy, corrupt = asyncio.run(probe())
    finally:
        runner.close()
    assert healthy and not corrupt


def _group(folder: Path, x: int):  # noqa: ANN202
    from cluster.topology import GroupShape
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    return ExpertParallelGroup(
        GroupConfig(
            model_dir=str(folder),
            shape=GroupShape(1, x),
            dtype="float32",
            deadline_s=20.0,
            caches=CacheSizes(16, BLOCK, 2),
        )
    )


def test_group_canary_fails_on_corrupt_expert_rank_and_counts_nothing(
    ray_cluster,  # noqa: ANN001  # the session's LocalCluster
    hf_checkpoint: Path,
    corrupt_checkpoint: Path,
) -> None:
    bad = _group(corrupt_checkpoint, 2)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="non-finite"):
            bad.start()
    finally:
        bad.shutdown()
    group = _group(hf_checkpoint, 2)
    try:
        group.start()  # its canary passed: one token through trunk -> both expert ranks -> trunk
        group.canary()
        load = group.expert_load()
        assert int(load["tokens_per_expert"].sum()) == 0
        assert int(load["received_per_expert"].sum()) == 0 and int(load["padding_rows"].sum()) == 0
        assert int(load["window_steps"]) == 0
        asyncio.run(group.step([_one_token_step()]))
        load = group.expert_load()
        cfg = group.cfg
        want = 3 * cfg.num_experts_per_tok * cfg.num_layers
        assert int(load["tokens_per_expert"].sum()) == want == int(load["received_per_expert"].sum())
        assert int(load["window_steps"]) == 1
    finally:
        group.shutdown()
