"""Moving expert weights in pieces: an expert rank builds its next shard beside the serving one.

A rebalance gives an expert rank new experts to hold. `ShardBuilder` starts from the serving shard and
the new map's ids, lists the (layer, expert) copies this rank lacks, takes them in pieces (from a peer
rank's export or the checkpoint: a `LayerExperts` each), and builds the new shard once all arrived:
layers whose ids do not change keep the serving tensors; the others are stacked anew, so the serving
shard is never written. `export_experts` is the peer side: stacked copies of held experts.
Pure torch (no Ray). Tests: tests/replicas/test_expert_moves.py, tests/replicas/test_rebalance.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_shards.experts import ExpertShard, LayerExperts
from model_shards.quant import Fp8Weight, Weight

Item = tuple[int, int]  # (MoE layer, global expert id)


def _one(w: Weight, i: int) -> Weight:
    return w.expert(i) if isinstance(w, Fp8Weight) else w[i]


def _stack(ws: Sequence[Weight], like: Weight) -> Weight:
    if not ws:  # an empty layer keeps the [0, ...] shape of `like`
        return like.select(torch.zeros(0, dtype=torch.long)) if isinstance(like, Fp8Weight) else like[:0].clone()
    if isinstance(ws[0], Fp8Weight):
        f8 = [w for w in ws if isinstance(w, Fp8Weight)]
        return Fp8Weight(torch.stack([w.data for w in f8]), torch.stack([w.scale_inv for w in f8]), f8[0].block)
    return torch.stack([w for w in ws if isinstance(w, torch.Tensor)])


def _to(w: Weight, like: Weight) -> Weight:
    """`w` on `like`'s device (a peer's export arrives on the CPU)."""
    dev = like.data.device if isinstance(like, Fp8Weight) else like.device
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.data.to(dev), w.scale_inv.to(dev), w.block)
    return w.to(dev)


def _cpu(w: Weight) -> Weight:
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.data.cpu().clone(), w.scale_inv.cpu().clone(), w.block)
    return w.cpu().clone()  # a copy: the export must not pin (or alias) the serving stack


def export_experts(shard: ExpertShard, items: Sequence[Item]) -> dict[int, LayerExperts]:
    """Copies (on the CPU) of the held experts `items`, one stacked `LayerExperts` per layer.

    Raises:
        ValueError: an item this shard does not hold.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, e in items:
        by_layer.setdefault(layer, []).append(e)
    out = {}
    for layer, ids in by_layer.items():
        lay = shard.layers[layer]
        ids = sorted(set(ids))
        missing = [e for e in ids if e not in lay.expert_ids]
        if missing:
            raise ValueError(f"layer {layer}: experts {missing} are not held here")
        local = [lay.expert_ids.index(e) for e in ids]
        out[layer] = LayerExperts(
            tuple(ids),
            _cpu(_stack([_one(lay.gate_up, i) for i in local], lay.gate_up)),
            _cpu(_stack([_one(lay.down, i) for i in local], lay.down)),
        )
    return out


class ShardBuilder:
    """The next shard of one expert rank, filled in pieces.

    Args:
        serving: the shard serving now (read, never written).
        want: expert ids per MoE layer under the new map.
    """

    def __init__(self, serving: ExpertShard, want: Sequence[Sequence[int]]) -> None:
        if len(want) != len(serving.layers):
            raise ValueError(f"new map has {len(want)} MoE layers for this rank, it serves {len(serving.layers)}")
        self.serving = serving
        self.want = [tuple(sorted(set(ids))) for ids in want]
        self.needed: list[Item] = [
            (layer, e) for layer, ids in enumerate(self.want) for e in ids if e not in serving.layers[layer].expert_ids
        ]
        self._got: dict[Item, tuple[Weight, Weight]] = {}
        self.bytes = 0

    @property
    def missing(self) -> list[Item]:
        return [it for it in self.needed if it not in self._got]

    def add(self, layer: int, experts: LayerExperts) -> int:
        """Take the needed experts of `experts` (layer `layer`); returns how many were new."""
        like = self.serving.layers[layer]
        n = 0
        for i, e in enumerate(experts.expert_ids):
            if (layer, e) in self.needed and (layer, e) not in self._got:
                gu, dn = _to(_one(experts.gate_up, i), like.gate_up), _to(_one(experts.down, i), like.down)
                self._got[(layer, e)] = (gu, dn)
                self.bytes += sum(
                    w.nbytes if isinstance(w, Fp8Weight) else w.numel() * w.element_size() for w in (gu, dn)
                )
                n += 1
        return n

    def build(self) -> ExpertShard:
        """The new shard; unchanged layers share the serving tensors.

        Raises:
            RuntimeError: some needed expert never arrived.
        """
        if self.missing:
            raise RuntimeError(f"{len(self.missing)} expert copies not loaded yet, e.g. {self.missing[:3]}")
        layers = []
        for layer, ids in enumerate(self.want):
            old = self.serving.layers[layer]
            if ids == tuple(old.expert_ids):
                layers.append(old)
                continue
            gate_up, down = [], []
            for e in ids:
                if e in old.expert_ids:
                    i = old.expert_ids.index(e)
                    gate_up.append(_one(old.gate_up, i))
                    down.append(_one(old.down, i))
                else:
                    gu, dn = self._got[(layer, e)]
                    gate_up.append(gu)
                    down.append(dn)
            layers.append(LayerExperts(ids, _stack(gate_up, old.gate_up), _stack(down, old.down)))
        return ExpertShard(layers, num_experts=self.serving.num_experts)
