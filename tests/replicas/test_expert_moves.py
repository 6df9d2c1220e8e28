"""Building an expert rank's next shard in pieces (replicas/ep/expert_moves.py).

Oracle: one full set of random expert weights; every shard is a selection of it, so the built shard must
hold exactly the full set's rows for the new ids (plain and FP8 weights), whichever piece brought them.
"""

from __future__ import annotations

import pytest
import torch

from model_shards.experts import ExpertShard, LayerExperts
from model_shards.quant import Fp8Weight
from replicas.ep.expert_moves import ShardBuilder, export_experts

E, D, INTER = 8, 4, 3


def _full(seed: int, fp8: bool) -> list[tuple[torch.Tensor | Fp8Weight, torch.Tensor | Fp8Weight]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):  # two MoE layers
        gu, dn = torch.randn(E, 2 * INTER, D, generator=g), torch.randn(E, D, INTER, generator=g)
        if fp8:
            out.append(
                (
                    Fp8Weight(gu.to(torch.float8_e4m3fn), torch.rand(E, 1, 1, generator=g), (128, 128)),
                    Fp8Weight(dn.to(torch.float8_e4m3fn), torch.rand(E, 1, 1, generator=g), (128, 128)),
                )
            )
        else:
            out.append((gu, dn))
    return out


def _rows(w: torch.Tensor | Fp8Weight, idx: torch.Tensor) -> torch.Tensor | Fp8Weight:
    return w.select(idx) if isinstance(w, Fp8Weight) else w[idx]


def _shard(full: list, ids: list[list[int]]) -> ExpertShard:
    layers = []
    for (gu, dn), want in zip(full, ids):
        idx = torch.tensor(sorted(want), dtype=torch.long)
        layers.append(LayerExperts(tuple(sorted(want)), _rows(gu, idx), _rows(dn, idx)))
    return ExpertShard(layers, num_experts=E)


def _plain(w: torch.Tensor | Fp8Weight) -> torch.Tensor:
    return torch.cat([w.data.float().flatten(), w.scale_inv.flatten()]) if isinstance(w, Fp8Weight) else w.flatten()


@pytest.mark.parametrize("fp8", [False, True])
def test_pieces_from_peers_and_checkpoint_build_the_new_shard(fp8: bool) -> None:
    full = _full(0, fp8)
    serving = _shard(full, [[0, 1, 2], [4, 5, 6]])
    peer = _shard(full, [[3, 4, 5], [0, 1, 7]])
    checkpoint = _shard(full, [list(range(E)), list(range(E))])  # stands in for load_experts
    b = ShardBuilder(serving, [[1, 2, 3, 4], [4, 5, 6]])  # layer 1 unchanged
    assert b.needed == [(0, 3), (0, 4)]
    got = export_experts(peer, [(0, 3)])
    assert b.add(0, got[0]) == 1
    with pytest.raises(RuntimeError, match="not loaded yet"):
        b.build()
    assert b.add(0, checkpoint.layers[0]) == 1  # only the still-missing expert 4 is taken
    new = b.build()
    assert new.layers[1] is serving.layers[1]  # an unchanged layer shares the serving tensors
    assert new.layers[0].expert_ids == (1, 2, 3, 4)
    oracle = _shard(full, [[1, 2, 3, 4], [4, 5, 6]])
    for mine, want in ((new.layers[0].gate_up, oracle.layers[0].gate_up), (new.layers[0].down, oracle.layers[0].down)):
        assert torch.equal(_plain(mine), _plain(want))
    assert serving.layers[0].expert_ids == (0, 1, 2)  # the serving shard was not written
    assert torch.equal(_plain(serving.layers[0].gate_up), _plain(_shard(full, [[0, 1, 2], []]).layers[0].gate_up))


def test_export_refuses_an_expert_it_does_not_hold() -> None:
    serving = _shard(_full(1, False), [[0, 1], [2]])
    with pytest.raises(ValueError, match=r"experts \[5\] are not held"):
        export_experts(serving, [(0, 5)])
    with pytest.raises(ValueError, match="MoE layers"):
        ShardBuilder(serving, [[0, 1]])
