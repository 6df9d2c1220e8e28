"""The sparse MoE block: router, routed experts (grouped GEMM, FP8, expert shards) and shared expert.

Proves: hand-built weights give the analytic router picks, top-k order, renormalised weights,
shared-expert gate and slot-weighted combine; the grouped `expert_ffn`, the per-expert loop
`expert_ffn_reference` and the token-by-token `reference.moe_reference` agree; FP8 experts
held by an `ExpertShard` equal the dequantised dense path; `local_routed_experts` + shared
expert equals transformers' `Qwen3_5MoeSparseMoeBlock` (fp32 within rounding, bf16 bit for
bit with `experts_implementation="grouped_mm"`); shards holding subsets of the experts
reproduce the full shard and refuse rows of experts they do not hold.
"""

from __future__ import annotations

import math

import pytest
import torch

from model_shards.experts import ExpertShard, LayerExperts, local_routed_experts
from model_shards.moe import SharedMoEWeights, combine_slots, expert_ffn, expert_ffn_reference, route, shared_expert
from model_shards.quant import Fp8Weight, concat_rows, quantize_blockwise, stack
from model_shards.reference import moe_reference, route_reference
from tests.fp8_spec import dequant_per_spec

# fp32: the same SwiGLU sums in a different order (grouped GEMM vs matrix-vector, or rows of an
# expert group in another order: HF sorts expert ids unstably, we stably, and CPU fp32 grouped_mm
# results depend on a row's position); outputs are O(1), measured max |diff| <= 2e-6, so 2e-5.
FP32_ATOL = 2e-5
# bf16 against the fp32 reference: every matmul output and the weight multiply round to bf16
# (2^-8 relative); outputs reach ~3, measured max |diff| ~0.02, so 0.06 (3 ulps at 4).
BF16_VS_FP32_ATOL = 6e-2
# HF's eager experts index_add_ into a bf16 buffer slot by slot, we sum the k slots in fp32 and
# round once (model_spec §2.5): 1 bf16 ulp (0.0078 at |y| in [1, 2)), 2 ulps (0.0156 in [2, 4)).
BF16_COMBINE_ORDER_ATOL = 1.6e-2

D, E, TOP_K, I_EXPERT, I_SHARED = 128, 16, 4, 64, 128  # model_shards.config.tiny()


def _report(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"max |diff| {d.max().item():.3g}, mean |diff| {d.mean().item():.3g}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol, rtol=0, msg=lambda _: f"{what}: {_report(got, want)} (atol {atol:g})"
    )


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got, want), f"{what} not bit-identical: {_report(got, want)}"


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _silu(v: float) -> float:
    return v * _sigmoid(v)


# ============================================================================== known answers
def test_router_known_answer_picks_renormalises_and_orders() -> None:
    """Identity router, so logits = x. Token [3, 1, 2, 0], top-2: experts 0 then 2 with weights
    e^3 / (e^3 + e^2) = sigmoid(1) and sigmoid(-1) (renormalised over the top 2, not over all 4).
    Token [1, 0.5, 0, 5]: experts 3 then 0, weights sigmoid(4), sigmoid(-4)."""
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 0.5, 0.0, 5.0]])
    routing = route(x, router=torch.eye(4), top_k=2)
    assert routing.topk_ids_Tk.tolist() == [[0, 2], [3, 0]]
    want = torch.tensor([[_sigmoid(1), _sigmoid(-1)], [_sigmoid(4), _sigmoid(-4)]])
    _assert_close(routing.topk_weights_Tk, want, 1e-6, "renormalised top-k weights")
    _assert_close(routing.topk_weights_Tk.sum(-1), torch.ones(2), 1e-6, "weights sum to 1")
    ids, weights = route_reference(x, router_ED=torch.eye(4), top_k=2)
    assert ids.tolist() == [[0, 2], [3, 0]]
    _assert_close(weights, want, 1e-6, "reference router")


def test_router_top_k_order_is_descending_probability() -> None:
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    assert route(x, router=torch.eye(5), top_k=3).topk_ids_Tk.tolist() == [[1, 2, 0]]
    assert route_reference(x, router_ED=torch.eye(5), top_k=3)[0].tolist() == [[1, 2, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_router_softmax_is_fp32_and_weights_are_model_dtype(dtype: torch.dtype) -> None:
    """Random router: same picks as the reference; weights cast to the model dtype after renormalising."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=gen).to(dtype)
    router = (0.1 * torch.randn(E, D, generator=gen)).to(dtype)
    routing = route(x, router=router, top_k=TOP_K)
    ids, weights = route_reference(x, router_ED=router, top_k=TOP_K)
    assert routing.topk_weights_Tk.dtype == dtype
    assert torch.equal(routing.topk_ids_Tk, ids)
    # bf16: our logits are rounded to bf16 (as HF's are), the reference's are exact fp32 products of the same
    # bf16 inputs; plus one rounding of each weight <= 1 (2^-9). Measured 3.1e-3.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    _assert_close(routing.topk_weights_Tk, weights, tol, "top-k weights vs reference")


def _hand_shared(gate_logit_weight: float) -> SharedMoEWeights:
    """D = 2, I = 1: gate(x) = x0, up(x) = x1, down puts the product on dim 0; shared gate = w * x0."""
    return SharedMoEWeights(
        router=torch.eye(2),
        shared_gate_proj=torch.tensor([[1.0, 0.0]]),
        shared_up_proj=torch.tensor([[0.0, 1.0]]),
        shared_down_proj=torch.tensor([[1.0], [0.0]]),
        shared_expert_gate=torch.tensor([[gate_logit_weight, 0.0]]),
    )


def test_shared_expert_known_answer_sigmoid_gate_scalar() -> None:
    """x = [1, 2]: silu(1) * 2 on dim 0, times sigmoid(ln 3 * 1) = 0.75; x = [-1, 2]: gate sigmoid(-ln 3) = 0.25."""
    w = _hand_shared(math.log(3.0))
    x = torch.tensor([[1.0, 2.0], [-1.0, 2.0]])
    want = torch.tensor([[0.75 * _silu(1.0) * 2, 0.0], [0.25 * _silu(-1.0) * 2, 0.0]])
    _assert_close(shared_expert(x, w=w), want, 1e-6, "shared expert")


def _hand_experts(num: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """D = 8, I = 4 (grouped_mm needs 16-byte row strides), every expert the same SwiGLU: gate = (x0, x1, 0, 0),
    up = (x2, x3, 0, 0), down = identity onto dims 0, 1, except that expert e's down is scaled by (e + 1):
    y_e(x) = (e + 1) * [silu(x0) x2, silu(x1) x3, 0, ..., 0]."""
    gate_up = torch.zeros(num, 8, 8)
    gate_up[:, 0, 0] = gate_up[:, 1, 1] = 1.0  # gate rows 0..3
    gate_up[:, 4, 2] = gate_up[:, 5, 3] = 1.0  # up rows 4..7
    down = torch.zeros(num, 8, 4)
    for e in range(num):
        down[e, 0, 0] = down[e, 1, 1] = e + 1.0
    return gate_up, down


def test_routed_experts_known_answer_weight_after_down() -> None:
    """Token [3, 1, 2, 0, 0, ...] picks experts 0 and 2 (identity router over the first 4 dims), weights
    sigmoid(+-1): routed = (1 * sigmoid(1) + 3 * sigmoid(-1)) * [2 silu(3), 0, ...]."""
    gate_up, down = _hand_experts()
    router = torch.eye(4, 8)
    x = torch.tensor([[3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    routing = route(x, router=router, top_k=2)
    assert routing.topk_ids_Tk.tolist() == [[0, 2]]
    base = torch.zeros(1, 8)
    base[0, 0] = 2 * _silu(3.0)
    want = (1 * _sigmoid(1) + 3 * _sigmoid(-1)) * base
    shard = ExpertShard([LayerExperts(tuple(range(4)), gate_up, down)], num_experts=4)
    _assert_close(local_routed_experts(shard, 0, x, routing), want, 1e-5, "grouped routed output")
    rows = x.repeat_interleave(2, dim=0)
    per_slot = expert_ffn_reference(rows, expert_idx_R=routing.topk_ids_Tk.reshape(-1), gate_up=gate_up, down=down)
    _assert_close(per_slot, torch.cat([1 * base, 3 * base]), 1e-5, "per-expert outputs before weighting")
    _assert_close(combine_slots(per_slot, routing=routing), want, 1e-5, "combine")
    no_shared = SharedMoEWeights(
        router=router,
        shared_gate_proj=torch.zeros(1, 8),
        shared_up_proj=torch.zeros(1, 8),
        shared_down_proj=torch.zeros(8, 1),
        shared_expert_gate=torch.zeros(1, 8),
    )
    _assert_close(
        moe_reference(x, shared=no_shared, gate_up_E2ID=gate_up, down_EDI=down, top_k=2), want, 1e-5, "moe_reference"
    )


# ============================================================================== random weights
def _random_moe(seed: int, dtype: torch.dtype = torch.float32) -> tuple[SharedMoEWeights, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    shared = SharedMoEWeights(
        router=randn(E, D, scale=0.1),  # spread logits: no near-ties in top-k
        shared_gate_proj=randn(I_SHARED, D, scale=D**-0.5),
        shared_up_proj=randn(I_SHARED, D, scale=D**-0.5),
        shared_down_proj=randn(D, I_SHARED, scale=I_SHARED**-0.5),
        shared_expert_gate=randn(1, D, scale=D**-0.5),
    )
    return shared, randn(E, 2 * I_EXPERT, D, scale=D**-0.5), randn(E, D, I_EXPERT, scale=I_EXPERT**-0.5)


def _moe_forward(x: torch.Tensor, shard: ExpertShard, shared: SharedMoEWeights) -> torch.Tensor:
    """What the trunk does: route, routed experts through the local seam, plus the shared expert."""
    routing = route(x, router=shared.router, top_k=TOP_K)
    return local_routed_experts(shard, 0, x, routing) + shared_expert(x, w=shared)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_expert_ffn_matches_per_expert_loop_and_reference(dtype: torch.dtype) -> None:
    """Rows sorted by expert (some experts get none) through the grouped GEMM vs the per-expert loop
    (fp32 reference of each row) and the whole block vs `moe_reference`."""
    shared, gate_up, down = _random_moe(1, dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, D, generator=gen).to(dtype)
    expert_R = torch.randint(0, E - 3, (120,), generator=gen).sort().values  # experts 13..15 get no rows
    rows = x[torch.randint(0, 40, (120,), generator=gen)]
    counts = torch.bincount(expert_R, minlength=E)
    got = expert_ffn(rows, counts_E=counts, gate_up=gate_up, down=down)
    loop = expert_ffn_reference(rows, expert_idx_R=expert_R, gate_up=gate_up, down=down)
    want = expert_ffn_reference(rows.float(), expert_idx_R=expert_R, gate_up=gate_up.float(), down=down.float())
    tol = FP32_ATOL if dtype == torch.float32 else BF16_VS_FP32_ATOL
    assert got.dtype == dtype
    _assert_close(got, want, tol, "grouped expert_ffn vs fp32 per-expert loop")
    _assert_close(loop, want, tol, f"{dtype} per-expert loop vs fp32 per-expert loop")

    shard = ExpertShard([LayerExperts(tuple(range(E)), gate_up, down)], num_experts=E)
    block = _moe_forward(x, shard, shared)
    ref = moe_reference(x, shared=shared, gate_up_E2ID=gate_up, down_EDI=down, top_k=TOP_K)
    _assert_close(block, ref, tol, "route + local_routed_experts + shared vs moe_reference")


def test_expert_ffn_with_no_rows() -> None:
    _, gate_up, down = _random_moe(3)
    out = expert_ffn(torch.zeros(0, D), counts_E=torch.zeros(E, dtype=torch.long), gate_up=gate_up, down=down)
    assert out.shape == (0, D)


def _fp8_experts(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[Fp8Weight, Fp8Weight]:
    """Per-expert FP8 as the checkpoint stores it: gate and up quantised separately with 128 x 128
    blocks (I = 64 rows: half a block), concatenated per expert, stacked over experts."""
    block = (128, 128)
    gate_ups, downs = [], []
    for e in range(gate_up.shape[0]):
        parts = [Fp8Weight(*quantize_blockwise(w, block=block), block) for w in gate_up[e].chunk(2)]
        gate_ups.append(concat_rows(parts))
        downs.append(Fp8Weight(*quantize_blockwise(down[e], block=block), block))
    return stack(gate_ups), stack(downs)


def _per_spec(w: Fp8Weight) -> torch.Tensor:
    return dequant_per_spec(w.data, w.scale_inv, w.block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_expert_shard_equals_dequantised_dense_shard(dtype: torch.dtype) -> None:
    """FP8 experts (dequantised per hit expert inside `expert_ffn`) give the same bits as a shard holding
    the weights dequantised densely by model_spec §5.3 (tests/fp8_spec.py, not the code's own dequantize);
    `forward_reference` (per-expert loop) agrees within rounding."""
    shared, gate_up, down = _random_moe(4)
    fp8_gate_up, fp8_down = _fp8_experts(gate_up, down)
    fp8 = ExpertShard([LayerExperts(tuple(range(E)), fp8_gate_up, fp8_down)], num_experts=E)
    dense = ExpertShard(
        [LayerExperts(tuple(range(E)), *(_per_spec(w).to(dtype) for w in (fp8_gate_up, fp8_down)))], num_experts=E
    )
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    routing = route(x, router=shared.router.to(dtype), top_k=TOP_K)
    ids = routing.topk_ids_Tk.reshape(-1)
    rows = x.repeat_interleave(TOP_K, dim=0)
    _assert_equal(fp8.forward(0, rows, ids), dense.forward(0, rows, ids), "FP8 shard vs dequantised dense shard")
    tol = FP32_ATOL if dtype == torch.float32 else BF16_VS_FP32_ATOL
    _assert_close(
        fp8.forward(0, rows, ids),
        fp8.forward_reference(0, rows.float(), ids),
        tol,
        "FP8 shard vs its fp32 per-expert reference",
    )
    # and the FP8 weights are a faithful copy: the block result moves by quantisation error only
    exact = moe_reference(x, shared=shared, gate_up_E2ID=gate_up, down_EDI=down, top_k=TOP_K)
    quantised = moe_reference(x, shared=shared, gate_up_E2ID=fp8_gate_up, down_EDI=fp8_down, top_k=TOP_K)
    assert (quantised - exact).abs().max() < 0.1 * exact.abs().max(), _report(quantised, exact)


# ============================================================================== transformers
def _hf_block(dtype: torch.dtype, experts: str, seed: int = 0):  # noqa: ANN202
    from transformers import Qwen3_5MoeTextConfig
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = Qwen3_5MoeTextConfig(
        hidden_size=D,
        num_experts=E,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=I_EXPERT,
        shared_expert_intermediate_size=I_SHARED,
        experts_implementation=experts,
    )
    torch.manual_seed(seed)
    block = Qwen3_5MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 0.1 if name == "gate.weight" else p.shape[-1] ** -0.5)
    return block.to(dtype).eval()


def _ours_from_hf(block) -> tuple[ExpertShard, SharedMoEWeights]:  # noqa: ANN001
    shared = SharedMoEWeights(
        router=block.gate.weight.data,
        shared_gate_proj=block.shared_expert.gate_proj.weight.data,
        shared_up_proj=block.shared_expert.up_proj.weight.data,
        shared_down_proj=block.shared_expert.down_proj.weight.data,
        shared_expert_gate=block.shared_expert_gate.weight.data,
    )
    layer = LayerExperts(tuple(range(E)), block.experts.gate_up_proj.data, block.experts.down_proj.data)
    return ExpertShard([layer], num_experts=E), shared


@pytest.mark.parametrize(
    "dtype,experts,tol",
    [
        (torch.float32, "eager", FP32_ATOL),
        (torch.float32, "grouped_mm", FP32_ATOL),
        (torch.bfloat16, "grouped_mm", 0.0),
        (torch.bfloat16, "eager", BF16_COMBINE_ORDER_ATOL),
    ],
    ids=["fp32-eager", "fp32-grouped_mm", "bf16-grouped_mm-bitexact", "bf16-eager-1ulp"],
)
def test_local_routed_experts_match_transformers_sparse_moe_block(dtype: torch.dtype, experts: str, tol: float) -> None:
    """`Qwen3_5MoeSparseMoeBlock` with the same weights: route + local_routed_experts + shared expert."""
    block = _hf_block(dtype, experts)
    shard, shared = _ours_from_hf(block)
    x = torch.randn(1, 50, D, generator=torch.Generator().manual_seed(6)).to(dtype)
    with torch.no_grad():
        want = block(x)[0]
        _, hf_weights, hf_ids = block.gate(x[0])
    routing = route(x[0], router=shared.router, top_k=TOP_K)
    assert torch.equal(routing.topk_ids_Tk, hf_ids)
    _assert_equal(routing.topk_weights_Tk, hf_weights, "router weights")
    got = _moe_forward(x[0], shard, shared)
    if tol == 0.0:
        _assert_equal(got, want, f"MoE block vs transformers ({experts}, {dtype})")
    else:
        _assert_close(got, want, tol, f"MoE block vs transformers ({experts}, {dtype})")


# ============================================================================== expert subsets
def test_expert_subsets_reproduce_the_full_shard() -> None:
    """Two shards holding experts {0, 2, 4, ...} and {1, 3, 5, ...} (an EP-2 split, global ids kept):
    each routed row computed by the shard that holds its expert equals the full shard's row."""
    _, gate_up, down = _random_moe(7)
    full = ExpertShard([LayerExperts(tuple(range(E)), gate_up, down)], num_experts=E)
    halves = [tuple(range(r, E, 2)) for r in (0, 1)]
    shards = [ExpertShard([LayerExperts(ids, gate_up[list(ids)], down[list(ids)])], num_experts=E) for ids in halves]
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(64, D, generator=gen)
    ids = torch.randint(0, E, (64,), generator=gen)
    want = full.forward(0, rows, ids)
    for r, shard in enumerate(shards):
        mine = ids % 2 == r
        assert shard.holds(0) == halves[r]
        _assert_close(shard.forward(0, rows[mine], ids[mine]), want[mine], FP32_ATOL, f"shard {r} rows")
        assert shard.local_index(0)[list(halves[r])].tolist() == list(range(len(halves[r])))


def test_expert_shard_rejects_rows_of_experts_it_does_not_hold() -> None:
    _, gate_up, down = _random_moe(9)
    held = (4, 5, 6, 7)
    shard = ExpertShard([LayerExperts(held, gate_up[4:8], down[4:8])], num_experts=E)
    rows = torch.randn(3, D)
    with pytest.raises(ValueError, match=r"layer 0: experts \[2, 9\] are not held by this shard"):
        shard.forward(0, rows, torch.tensor([5, 2, 9]))
    shard.forward(0, rows, torch.tensor([5, 4, 7]))  # held experts are fine
