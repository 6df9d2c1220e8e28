"""Sparse MoE math (model_spec §2.5), split at the seam where routed experts may live elsewhere.

Trunk side: `route` (fp32 softmax over all experts, top-k on probabilities, renormalise, cast
to the model dtype) and the sigmoid-gated shared expert (`route_and_shared` runs both off one
stacked router | gate | up GEMM when the loader provides it). Expert side: `expert_ffn` on routed
rows (SwiGLU per expert, grouped GEMM for plain weights, one expert at a time for FP8 in
fp8_experts.py) with `expert_ffn_reference` (per-expert loop) beside it.
Combine: weight each routed row after down_proj (model dtype), then sum the k slots of a
token in fp32 with one rounding: HF's `grouped_mm` experts back-end (transformers' default),
not the `eager` index_add order (they differ by 1 bf16 ulp, model_spec §2.5).
Legend: T tokens, D hidden, k top-k, R routed rows, E experts, I expert width.
Tests: tests/model_shards/test_moe.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.fp8_experts import fp8_expert_ffn
from model_shards.kernels import grouped_mm
from model_shards.quant import Fp8Weight, Weight, linear


@dataclass(frozen=True)
class Routing:
    """Where each token goes: its k experts (global ids) and their renormalised weights.

    Attributes:
        topk_ids_Tk: [T, k] int64 global expert ids, in top-k order.
        topk_weights_Tk: [T, k] model dtype, summing to ~1 per token.
    """

    topk_ids_Tk: torch.Tensor
    topk_weights_Tk: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids_Tk.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids_Tk.shape[1])


@dataclass
class SharedMoEWeights:
    """The trunk-side half of an MoE block: router, shared expert and its gate."""

    router: torch.Tensor  # [E, D] (`mlp.gate.weight`, never quantised)
    shared_gate_proj: Weight  # [Is, D]
    shared_up_proj: Weight  # [Is, D]
    shared_down_proj: Weight  # [D, Is]
    shared_expert_gate: torch.Tensor  # [1, D]
    # [E + 2 Is, D] router, shared gate_proj and up_proj stacked (one GEMM, same bits as three);
    # the loader sets it (plain weights only) and makes the three fields row views of it.
    router_gate_up: torch.Tensor | None = None


def route(x_TD: torch.Tensor, *, router: torch.Tensor, top_k: int) -> Routing:
    """Router: logits in model dtype, softmax in fp32 over all experts, top-k, renormalise."""
    return _route_logits(F.linear(x_TD, router), top_k)


def _route_logits(logits_TE: torch.Tensor, top_k: int) -> Routing:
    probs = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return Routing(topk_ids_Tk=ids, topk_weights_Tk=weights.to(logits_TE.dtype))


def shared_expert(x_TD: torch.Tensor, *, w: SharedMoEWeights) -> torch.Tensor:
    """sigmoid(x . shared_expert_gate) * down(silu(gate(x)) * up(x))."""
    return _shared_from(x_TD, linear(x_TD, w.shared_gate_proj), linear(x_TD, w.shared_up_proj), w)


def _shared_from(x_TD: torch.Tensor, gate_TI: torch.Tensor, up_TI: torch.Tensor, w: SharedMoEWeights) -> torch.Tensor:
    hidden = F.silu(gate_TI) * up_TI
    return torch.sigmoid(F.linear(x_TD, w.shared_expert_gate)) * linear(hidden, w.shared_down_proj)


def route_and_shared(x_TD: torch.Tensor, *, w: SharedMoEWeights, top_k: int) -> tuple[Routing, torch.Tensor]:
    """`route` and `shared_expert` of the same tokens, with one GEMM for router | gate | up when
    `w.router_gate_up` is set (same bits as the separate calls).

    Returns:
        The routing, and the gated shared-expert output [T, D].
    """
    if w.router_gate_up is None:
        return route(x_TD, router=w.router, top_k=top_k), shared_expert(x_TD, w=w)
    e, i = w.router.shape[0], (w.router_gate_up.shape[0] - w.router.shape[0]) // 2
    logits, gate, up = F.linear(x_TD, w.router_gate_up).split([e, i, i], dim=-1)
    return _route_logits(logits, top_k), _shared_from(x_TD, gate, up, w)


def expert_ffn(x_RD: torch.Tensor, *, counts_E: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """SwiGLU of every routed row by its expert, rows grouped by expert (grouped GEMM).

    Args:
        x_RD: [R, D] rows sorted so that expert e's rows are contiguous, in expert order.
        counts_E: [E] int rows per expert of the stacked weights (zeros allowed).
        gate_up: [E, 2I, D] gate rows then up rows (fused HF layout), plain or FP8.
        down: [E, D, I].
    Returns:
        [R, D] in x's dtype.
    """
    if x_RD.shape[0] == 0:
        return x_RD.new_zeros((0, x_RD.shape[1]))
    if isinstance(gate_up, Fp8Weight) or isinstance(down, Fp8Weight):
        # One expert's weights at a time, never a dequantised copy of the expert set (fp8_experts.py).
        return fp8_expert_ffn(x_RD, counts_E=counts_E, gate_up=gate_up, down=down)
    offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    gu = grouped_mm(x_RD.to(gate_up.dtype), gate_up.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    return grouped_mm(hidden, down.transpose(-2, -1), offs=offs).to(x_RD.dtype)


def expert_ffn_reference(
    x_RD: torch.Tensor, *, expert_idx_R: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Readable reference: one F.linear pair per expert, rows in any order (HF `eager` experts' math)."""
    out = x_RD.new_zeros(x_RD.shape)
    for e in torch.unique(expert_idx_R).tolist():
        rows = torch.nonzero(expert_idx_R == e, as_tuple=True)[0]
        gate, up = F.linear(x_RD[rows], gate_up[e]).chunk(2, dim=-1)
        out[rows] = F.linear(F.silu(gate) * up, down[e])
    return out


def combine_slots(expert_out_Tk_D: torch.Tensor, *, routing: Routing) -> torch.Tensor:
    """Weighted sum over each token's k slots.

    Args:
        expert_out_Tk_D: [T * k, D] unweighted expert outputs, row t*k + j = slot j of token t.
    Returns:
        [T, D]: sum_j w_tj * y_tj, product in model dtype, slot sum accumulated in fp32.
    """
    t, k = routing.topk_ids_Tk.shape
    weighted = expert_out_Tk_D * routing.topk_weights_Tk.reshape(-1, 1)
    return weighted.view(t, k, -1).sum(dim=1).to(expert_out_Tk_D.dtype)
