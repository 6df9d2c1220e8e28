"""An expert shard: the routed experts one rank holds, for every MoE layer (incl. MTP layers).

Owns: the stacked per-layer expert weights of a given set of global expert ids, and the
computation of routed rows for those experts (`forward`; `forward_tokens` takes tokens and
their top-k ids without materialising the repeated rows), plus `local_routed_experts`, the
whole in-process dispatch -> FFN -> combine path (the reference every distributed
dispatcher is compared with). Must not: know how rows travel between processes.
Tests: tests/model_shards/test_moe.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.moe import Routing, combine_slots, expert_ffn, expert_ffn_reference
from model_shards.quant import Fp8Weight, Weight, dense


@dataclass
class LayerExperts:
    """Experts of one MoE layer held locally.

    Attributes:
        expert_ids: sorted global ids held (local index i holds expert_ids[i]).
        gate_up: [E_local, 2I, D]; down: [E_local, D, I] (plain or FP8).
    """

    expert_ids: tuple[int, ...]
    gate_up: Weight
    down: Weight


class ExpertShard:
    """Routed experts of every MoE layer for one set of expert ids.

    Args:
        layers: one `LayerExperts` per MoE layer (decoder layers, then MTP layers).
        num_experts: experts per layer in the model (size of the global id space).
    """

    def __init__(self, layers: list[LayerExperts], *, num_experts: int) -> None:
        self.layers = layers
        self.num_experts = num_experts
        self._local_index = []
        self._holds_all = []  # local index == global id: no translation, nothing to check
        for lay in layers:
            dev = lay.gate_up.data.device if isinstance(lay.gate_up, Fp8Weight) else lay.gate_up.device
            index = torch.full((num_experts,), -1, dtype=torch.long, device=dev)  # on the weights' device
            index[torch.tensor(lay.expert_ids, dtype=torch.long, device=dev)] = torch.arange(
                len(lay.expert_ids), device=dev
            )
            self._local_index.append(index)
            self._holds_all.append(tuple(lay.expert_ids) == tuple(range(num_experts)))

    def holds(self, layer: int) -> tuple[int, ...]:
        return self.layers[layer].expert_ids

    def local_index(self, layer: int) -> torch.Tensor:
        """[num_experts] local index of each global id, -1 where not held."""
        return self._local_index[layer]

    def forward(self, layer: int, x_RD: torch.Tensor, expert_ids_R: torch.Tensor) -> torch.Tensor:
        """Expert outputs (unweighted) for routed rows whose experts this shard holds.

        Args:
            layer: MoE layer index (decoder layer, or num_layers + j for MTP layer j).
            x_RD: [R, D] rows in any order.
            expert_ids_R: [R] global expert id of each row.
        Returns:
            [R, D] in x's dtype, same row order.
        """
        return self._run(layer, x_RD, expert_ids_R, fan_out=1)

    def forward_tokens(self, layer: int, x_TD: torch.Tensor, topk_ids_Tk: torch.Tensor) -> torch.Tensor:
        """`forward` of every (token, slot) pair without materialising repeated tokens.

        Args:
            x_TD: [T, D] tokens. topk_ids_Tk: [T, k] global expert ids.
        Returns:
            [T * k, D] unweighted outputs, row t * k + j = slot j of token t.
        """
        return self._run(layer, x_TD, topk_ids_Tk.reshape(-1), fan_out=topk_ids_Tk.shape[1])

    def _run(self, layer: int, x: torch.Tensor, expert_ids_R: torch.Tensor, *, fan_out: int) -> torch.Tensor:
        """Rows R = x rows x fan_out (row r reads x[r // fan_out]), sorted by expert, FFN, unsorted."""
        lay = self.layers[layer]
        if self._holds_all[layer]:
            local = expert_ids_R
        else:
            local = self._local_index[layer][expert_ids_R]
            if bool((local < 0).any()):
                missing = sorted(set(expert_ids_R[local < 0].tolist()))
                raise ValueError(f"layer {layer}: experts {missing} are not held by this shard")
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=len(lay.expert_ids))
        src = order if fan_out == 1 else torch.div(order, fan_out, rounding_mode="floor")
        y_sorted = expert_ffn(x.index_select(0, src), counts_E=counts, gate_up=lay.gate_up, down=lay.down)
        return torch.empty_like(y_sorted).index_copy_(0, order, y_sorted)

    def forward_reference(self, layer: int, x_RD: torch.Tensor, expert_ids_R: torch.Tensor) -> torch.Tensor:
        """Same as `forward` through the per-expert loop (dequantised weights)."""
        lay = self.layers[layer]
        gate_up, down = dense(lay.gate_up, x_RD.dtype), dense(lay.down, x_RD.dtype)
        return expert_ffn_reference(
            x_RD, expert_idx_R=self._local_index[layer][expert_ids_R], gate_up=gate_up, down=down
        )

    @property
    def nbytes(self) -> int:
        total = 0
        for lay in self.layers:
            for w in (lay.gate_up, lay.down):
                total += w.nbytes if isinstance(w, Fp8Weight) else w.numel() * w.element_size()
        return total


def local_routed_experts(shard: ExpertShard, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """In-process dispatch -> expert FFN -> combine, all experts local (the reference seam).

    Returns:
        [T, D] routed output of the MoE block (shared expert not included).
    """
    y = shard.forward_tokens(layer, x_TD, routing.topk_ids_Tk)  # row t*k + j = token t, slot j
    return combine_slots(y, routing=routing)
