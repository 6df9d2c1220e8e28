"""Expert load balancing while serving: load statistics as the expert ranks receive them, a rebalance with
redundant copies mid-run, and a failed weight move.

One D = 1 x X = 2 group on the transformers-saved random checkpoint (16 experts), checked every step against
the single-process model (the oracle of tests/replicas/test_group.py): outputs stay those of the model
before, across and after the map switch.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from cluster.expert_load import per_rank_load, read_load_file
from tests.replicas.test_group import VOCAB, _group, _prompts, _Reference, _Scenario

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(hf_checkpoint: Path) -> _Reference:
    return _Reference(hf_checkpoint)


def test_load_statistics_and_rebalance_while_serving(
    ray_cluster,  # noqa: ANN001
    hf_checkpoint: Path,
    reference: _Reference,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint, folder)  # a copy this test may make unreadable
    group = _group(folder, 1, 2)
    cfg = reference.model.cfg
    try:
        sc = _Scenario(group, reference, 1)
        lengths = [5, 37, 64, 20]
        for sid, p in enumerate(_prompts(7, lengths)):
            sc.add(sid, rank=0, prompt=p, slot=sid)
        group.expert_load()  # start counting from here (the start's canary step counts nothing)
        sc.step([0, 1, 2, 3])  # prefill: variable-size exchange
        for _ in range(3):
            sc.step([0, 1, 2, 3])  # decode: fixed capacity, padding slots
        load = group.expert_load()
        routed = load["tokens_per_expert"]
        # every routed (token, slot) reached exactly one copy: received per expert = the trunk's routing,
        # and each layer got all tokens x top-k
        tokens = sum(lengths) + 3 * 4
        assert torch.equal(load["received_per_expert"], routed)
        assert load["received_per_expert"].sum(dim=1).tolist() == [tokens * cfg.num_experts_per_tok] * routed.shape[0]
        assert torch.equal(
            load["received_per_rank"].to(torch.float64), per_rank_load(routed, group.expert_map.owners, 2)
        )
        assert int(load["padding_rows"].sum()) > 0  # decode steps padded their capacity
        assert int(load["window_steps"]) == 4  # these 4 (the start's canary step is not load)

        save = tmp_path / "load.json"
        group.save_load(str(save))

        saved = read_load_file(save, num_experts=cfg.num_experts)
        assert torch.allclose(
            torch.tensor(saved, dtype=torch.float64), routed.to(torch.float64) / 4
        )  # mean over the 4 counted steps

        report = asyncio.run(group.rebalance(2))
        assert report["version"] == 1 and group.map_version == 1
        assert any(len(r) > 1 for layer in group.expert_map.owners for r in layer), "no redundant copy placed"
        assert report["max_imbalance_after"] <= report["max_imbalance_before"]
        for _ in range(4):
            sc.step([0, 1, 2, 3])  # the oracle check runs inside every step: outputs unchanged by the switch
        after = group.expert_load()
        assert torch.equal(after["received_per_expert"], after["tokens_per_expert"])
        held = ray_get_held(group)
        for j in range(2):
            assert held[j] == group.expert_map.experts_of(j)[: len(held[j])]

        # the checkpoint is unreadable while the ranks load: copies read from it fail, and the old map keeps
        # serving; copies from the ranks that hold them (peer copy, one expert per rank per piece) still work
        moved = tmp_path / "gone"
        folder.rename(moved)
        try:
            with pytest.raises(RuntimeError, match="old map"):
                asyncio.run(group.rebalance(4, peer_copy=False))
            assert group.map_version == 1
            for _ in range(2):
                sc.step([0, 1, 2, 3])
            report = asyncio.run(group.rebalance(4, experts_per_step=1))
        finally:
            moved.rename(folder)
        assert group.map_version == 2 and report["from_checkpoint"] == 0
        assert report["from_peer"] == report["experts_loaded"] > 1 and report["pieces"] >= report["experts_loaded"] // 2
        for _ in range(3):
            sc.step([0, 1, 2, 3])  # the peer-copied weights give the oracle's outputs
        assert group.epoch == 0

        # a rank replaced after the rebalances loads the current map (v2, redundant copies), not the initial one
        import ray

        from replicas.engine.step_types import StepRequest
        from replicas.ep.group import GroupFailure

        ray.kill(group.experts[1], no_restart=True)
        with pytest.raises(GroupFailure):
            asyncio.run(group.step([StepRequest()]))
        group.rebuild()
        assert group.epoch == 1 and group.map_version == 2
        held = ray_get_held(group)
        for j in range(2):
            assert held[j] == group.expert_map.experts_of(j)[: len(held[j])]
        fresh = _Scenario(group, reference, 1)
        fresh.add(5, rank=0, prompt=_prompts(9, [30])[0], slot=4)
        for _ in range(3):
            fresh.step([5])
    finally:
        group.shutdown()


def ray_get_held(group) -> list[list[list[int]]]:  # noqa: ANN001
    import ray

    return ray.get([e.held_experts.remote() for e in group.experts], timeout=30)


def test_streams_unchanged_by_rebalances_while_they_run(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    """8 greedy streams on the serving Engine, once on the contiguous map and once while rebalances (R = 2,
    then R = 4) switch the map under them: every stream finishes with the same tokens."""
    from model_shards.sampling import SamplingParams
    from replicas.engine.engine_types import GenerateRequest
    from replicas.ep.offline_generate import offline_engine, run_to_completion

    prompts = _prompts(3, [9, 30, 17, 50, 4, 22, 41, 12])
    group = _group(hf_checkpoint, 1, 2)

    def req(tag: str, i: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"{tag}{i}",
            prompt_ids=tuple(prompts[i]),
            params=SamplingParams(temperature=0.0, logprobs=0),
            max_tokens=24,
            ignore_eos=True,
        )

    async def main() -> tuple[list, list, list]:
        engine = offline_engine(group, max_prompt_len=64, vocab_size=VOCAB)
        engine.start()
        try:
            alone = await asyncio.gather(*(run_to_completion(engine, req("a", i)) for i in range(len(prompts))))

            async def rebalances() -> list:
                reports = []
                for r in (2, 4):
                    start = engine.steps
                    while engine.steps < start + 2:
                        await asyncio.sleep(0.01)
                    report = await group.rebalance(r)  # weights move in pieces between steps
                    report["open_streams"] = engine.stats()["streams"]  # the switch happened under running streams
                    reports.append(report)
                return reports

            streams = asyncio.gather(*(run_to_completion(engine, req("b", i)) for i in range(len(prompts))))
            reports = await asyncio.wait_for(rebalances(), timeout=120)
            return alone, await streams, reports
        finally:
            await engine.stop()

    try:
        alone, moved, reports = asyncio.run(main())
    finally:
        group.shutdown()
    assert [r["version"] for r in reports] == [1, 2]
    assert all(r["open_streams"] > 0 for r in reports), reports
    assert all(r["moved_slots"] > 0 for r in reports), "a rebalance that moves nothing tests no switch"
    assert all(r["pieces"] >= 2 for r in reports), reports  # the moves were spread over several steps
    assert all(len(c.token_ids) == 24 for c in moved), "a stream was cut short"
    assert [c.token_ids for c in moved] == [c.token_ids for c in alone]


@pytest.mark.slow  # ~50 s: an app of its own (the group-level tests above cover the switch itself)
def test_epserve_rebalance_on_a_running_server(ray_cluster, serve_http: str, embedded_model_dir: Path) -> None:  # noqa: ANN001
    """The admin command against a served app (D = 1 x X = 2) that also rebalances by itself every 5 steps: the
    automatic rebalances are counted in /metrics, the admin one reports before/after imbalance, /metrics shows
    the per-layer load; a wrong app name is a clear error with a non-zero exit."""
    import os
    import re
    import subprocess
    import sys
    import time

    import openai
    import requests
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    app, prefix = "eplb", "/eplb"
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="eplb-tiny",
        dtype="float32",
        trunk_ranks=1,
        expert_ranks=2,
        num_kv_blocks=64,
        block_size=16,
        max_num_seqs=4,
        max_model_len=256,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        rebalance_interval_steps=5,  # the automatic trigger too: every 5 engine steps, 2 redundant copies
        redundant_experts=2,
    )
    serve.run(build_app(args), name=app, route_prefix=prefix)
    try:
        client = openai.OpenAI(base_url=serve_http + prefix + "/v1", api_key="unused", max_retries=0, timeout=120)
        for i in range(3):
            client.completions.create(model="eplb-tiny", prompt=f"count {i}: one two", max_tokens=8, temperature=0)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        # 24 tokens served: the trigger rebalanced on its own (counted in /metrics) while they streamed
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and "expert_rebalances_total{" not in text:
            time.sleep(1.0)
            text = requests.get(serve_http + prefix + "/metrics", timeout=30).text
        auto = [ln for ln in text.splitlines() if ln.startswith("epserve:expert_rebalances_total{")]
        assert auto and all('result="ok"' in ln for ln in auto), auto
        time.sleep(1.0)  # an automatic move in flight finishes before the admin one (one rebalance at a time)

        def cli(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "epserve.cli", "rebalance", "--address", ray_cluster.address, *argv],
                capture_output=True,
                text=True,
                timeout=180,
                env=env,
            )

        done = cli("--app", app, "--redundant-experts", "2")
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"map v\d+, max/mean rank load", done.stdout) and "slots moved" in done.stdout, done.stdout
        wrong = cli("--app", "nope")
        assert wrong.returncode != 0 and "no Serve application 'nope'" in wrong.stderr, wrong.stderr
        # the map switched under a serving engine: it still answers
        client.completions.create(model="eplb-tiny", prompt="after", max_tokens=4, temperature=0)
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and "epserve:expert_layer_imbalance{" not in text:
            time.sleep(1.0)
            text = requests.get(serve_http + prefix + "/metrics", timeout=30).text
        assert "epserve:expert_layer_imbalance{" in text and "epserve:expert_rank_tokens_per_step{" in text
    finally:
        serve.delete(app)


def test_initial_placement_from_a_load_file(hf_checkpoint: Path, tmp_path: Path) -> None:
    """AppArgs.expert_load_file + redundant_experts: the hottest experts get the copies; bad settings are named."""
    from cluster.expert_load import write_load_file
    from model_shards.config import from_hf_config
    from replicas.serving.app_args import AppArgs
    from replicas.serving.engine_deployment import _initial_map

    cfg = from_hf_config(hf_checkpoint)
    loads = torch.ones(cfg.num_moe_layers, cfg.num_experts)
    loads[:, 3] = 40.0  # expert 3 is hot in every layer, expert 9 warm
    loads[:, 9] = 20.0
    path = tmp_path / "load.json"
    write_load_file(path, loads, steps=10)
    m = _initial_map(AppArgs(expert_ranks=2, expert_load_file=str(path), redundant_experts=2), cfg)
    assert m is not None
    for layer in m.owners:
        assert len(layer[3]) == 2 and len(layer[9]) == 2  # the two copies go to the two loaded experts
    with pytest.raises(ValueError, match="needs expert_load_file"):
        _initial_map(AppArgs(expert_ranks=2, redundant_experts=2), cfg)
    with pytest.raises(ValueError, match="divide|slots"):
        _initial_map(AppArgs(expert_ranks=2, expert_load_file=str(path), redundant_experts=1), cfg)


@pytest.mark.slow  # 30-280 s on 2 cores by load (6 rank actors); fast variant: test_streams_unchanged_by_rebalances...
@pytest.mark.timeout(400)
def test_sixteen_streams_unchanged_by_rebalances_every_few_steps(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    """D = 2 x X = 4, 16 greedy streams: once with the contiguous map, once with the engine deployment's trigger
    (replicas/serving/rebalance_trigger.py) rebalancing every 3 steps with R = 4, moving 4 copies per expert rank
    between steps: every stream finishes with the same tokens, none lost."""
    from model_shards.sampling import SamplingParams
    from replicas.engine.engine_types import GenerateRequest
    from replicas.ep.offline_generate import offline_engine, run_to_completion
    from replicas.serving.rebalance_trigger import RebalanceTrigger, auto_rebalance

    n = 16
    prompts = _prompts(5, [7 + (11 * i) % 50 for i in range(n)])
    group = _group(hf_checkpoint, 2, 4, move_experts_per_step=4)

    def req(tag: str, i: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"{tag}{i}",
            prompt_ids=tuple(prompts[i]),
            params=SamplingParams(temperature=0.0, logprobs=0),
            max_tokens=32,
            ignore_eos=True,
        )

    async def main() -> tuple[list, list, list]:
        engine = offline_engine(group, max_prompt_len=64, vocab_size=VOCAB)
        engine.start()
        try:
            alone = await asyncio.gather(*(run_to_completion(engine, req("a", i)) for i in range(n)))
            reports: list[dict] = []
            trigger = RebalanceTrigger(interval_steps=3, threshold=None)
            trigger.fired(engine.steps)
            task = asyncio.get_running_loop().create_task(
                auto_rebalance(trigger, engine, group, redundant=4, poll_s=0.01, reports=reports)
            )
            try:
                moved = await asyncio.gather(*(run_to_completion(engine, req("b", i)) for i in range(n)))
            finally:
                task.cancel()
            return alone, moved, reports
        finally:
            await engine.stop()

    try:
        alone, moved, reports = asyncio.run(main())
    finally:
        group.shutdown()
    assert len(reports) >= 2, reports
    assert [r["version"] for r in reports] == list(range(1, len(reports) + 1))
    assert sum(r["moved_slots"] for r in reports) > 0 and any(r["pieces"] >= 2 for r in reports), reports
    assert any(r["open_streams"] > 0 for r in reports), reports
    assert all(len(c.token_ids) == 32 for c in moved), "a stream was cut short"
    assert [c.token_ids for c in moved] == [c.token_ids for c in alone]
