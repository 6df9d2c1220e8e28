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
from tests.replicas.test_group import _group, _prompts, _Reference, _Scenario

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
        group.expert_load()  # start counting from here (the canary's idle step counted nothing)
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
        assert int(load["window_steps"]) == 5  # the start's idle canary step, then these 4

        save = tmp_path / "load.json"
        group.save_load(str(save))

        saved = read_load_file(save, num_experts=cfg.num_experts)
        assert torch.allclose(torch.tensor(saved, dtype=torch.float64), routed.to(torch.float64) / 5)

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

        # a failed move: the checkpoint is unreadable while the ranks load; the old map keeps serving
        moved = tmp_path / "gone"
        folder.rename(moved)
        try:
            with pytest.raises(RuntimeError, match="old map"):
                asyncio.run(group.rebalance(4))
        finally:
            moved.rename(folder)
        assert group.map_version == 1
        for _ in range(3):
            sc.step([0, 1, 2, 3])
        assert group.epoch == 0
    finally:
        group.shutdown()


def ray_get_held(group) -> list[list[list[int]]]:  # noqa: ANN001
    import ray

    return ray.get([e.held_experts.remote() for e in group.experts], timeout=30)
