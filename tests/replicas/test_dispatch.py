"""The trunk <-> expert exchange: its wire format, and all-to-all against local on the same inputs.

- Wire format (replicas/ep/a2a_protocol.py) against layouts built by hand with `struct`: a packed
  row is the hidden row's bytes then a native int32 expert id; a header row is a native int64 count
  then a flag byte. Malformed buffers are refused with the expected width named.
- The exchange itself: D = 2 (and D = 1) trunk ranks and X = 2 expert ranks, each a forked process in
  a real gloo group (cluster/process_groups.join_group), run the variable mode, the fixed mode within
  capacity, the fixed mode with a pair over capacity (the overflow exchange), and steps where one
  trunk rank has no tokens; and ping-pong micro-batches (m = 2, 3 units in flight, overflow exchanges at their
  agreed place, empty micro-batches, an unsplit unit after the split ones).
  Oracle: `local_routed_experts` (every expert in-process) on the same
  inputs in the trunk process, and expert-rank row counts counted here from the routing.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import traceback
from typing import Any

import pytest
import torch

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle, GroupSpec, free_port, join_group, leave_group
from cluster.topology import GroupShape
from model_shards.experts import ExpertShard, LayerExperts, local_routed_experts
from model_shards.moe import Routing
from replicas.ep.a2a_protocol import (
    FIXED,
    HEADER_MIN_BYTES,
    VARIABLE,
    StepPlan,
    combine_flags,
    fixed_capacity,
    pack_rows,
    read_headers,
    row_bytes,
    unpack_rows,
    write_header,
    write_headers,
)
from replicas.ep.dispatch import AllToAllDispatcher, ExpertLoad
from replicas.ep.expert_rank import ExpertRank
from replicas.ep.micro_batches import split_sequences

# ----------------------------------------------------------------------------- wire format


def test_packed_row_is_hidden_bytes_then_int32_id() -> None:
    x = torch.tensor([[1.5, -2.0, 0.25], [3.0, 4.0, -0.5]], dtype=torch.float32)
    ids = torch.tensor([5, 70000])
    buf = pack_rows(x, ids)
    expected = [struct.pack("=fffi", 1.5, -2.0, 0.25, 5), struct.pack("=fffi", 3.0, 4.0, -0.5, 70000)]
    assert buf.dtype == torch.uint8 and buf.shape == (2, 16)
    assert [bytes(r) for r in buf.tolist()] == expected
    # and back, also from a one-row slice (contiguous, but with the parent's row stride)
    x2, ids2 = unpack_rows(buf, hidden=3, dtype=torch.float32)
    assert torch.equal(x2, x) and ids2.tolist() == [5, 70000] and ids2.dtype == torch.long
    x3, ids3 = unpack_rows(buf[1:2], hidden=3, dtype=torch.float32)
    assert x3.tolist() == [[3.0, 4.0, -0.5]] and ids3.tolist() == [70000]


def test_odd_width_bf16_rows_round_trip() -> None:
    # 3 bf16 values are 6 bytes: a 10-byte row that no typed view can stride over
    x = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.bfloat16)
    buf = pack_rows(x, torch.tensor([9]))
    assert bytes(buf[0].tolist()) == x.view(torch.uint8).numpy().tobytes() + struct.pack("=i", 9)
    assert row_bytes(3, torch.bfloat16) == 6
    x2, ids = unpack_rows(buf, hidden=3, dtype=torch.bfloat16)
    assert torch.equal(x2, x) and ids.tolist() == [9]
    empty = pack_rows(torch.empty(0, 3, dtype=torch.bfloat16), torch.empty(0, dtype=torch.long))
    assert empty.shape == (0, 10)
    assert unpack_rows(empty, hidden=3, dtype=torch.bfloat16)[0].shape == (0, 3)


def test_header_rows_are_int64_count_then_flag() -> None:
    rows = torch.zeros(3, 12, dtype=torch.uint8)
    write_header(rows[0], count=300, flag=True)
    assert bytes(rows[0, :HEADER_MIN_BYTES].tolist()) == struct.pack("=q?", 300, True)
    hand = torch.tensor([list(struct.pack("=q?", c, f)) for c, f in [(0, False), (7, True), (2**40, False)]])
    assert read_headers(hand.to(torch.uint8)) == ([0, 7, 2**40], [False, True, False])
    # the batched writer writes the same bytes as the row writer
    write_headers(rows, counts=torch.tensor([4, 0, 123456789]), flag=False)
    one = torch.zeros(12, dtype=torch.uint8)
    write_header(one, count=123456789, flag=False)
    assert torch.equal(rows[2], one)
    assert read_headers(rows) == ([4, 0, 123456789], [False, False, False])
    assert combine_flags(torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=torch.uint8)) == [True, False, False]


def test_malformed_buffers_are_refused() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[R, D\] rows and \[R\] ids"):
        pack_rows(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be \[R, 16\] uint8"):
        unpack_rows(torch.zeros(2, 17, dtype=torch.uint8), hidden=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"must be \[R, 16\] uint8"):
        unpack_rows(torch.zeros(2, 15, dtype=torch.uint8), hidden=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"must be \[R, 16\] uint8"):
        unpack_rows(torch.zeros(2, 4, dtype=torch.float32), hidden=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"header rows must be \[P, >= 9\]"):
        read_headers(torch.zeros(2, 8, dtype=torch.uint8))


def test_step_plan_validation() -> None:
    with pytest.raises(ValueError, match="mode must be 'variable' or 'fixed', got 'fast'"):
        StepPlan((0,), mode="fast")
    with pytest.raises(ValueError, match="FIXED mode needs capacity >= 1"):
        StepPlan((0,), mode=FIXED, capacity=0)
    assert StepPlan((0, 1)).mode == VARIABLE


@pytest.mark.parametrize(
    ("tokens", "top_k", "expert_ranks", "factor", "expected"),
    [
        (4, 2, 2, 1.0, 4),  # mean 4 rows per pair
        (4, 2, 2, 1.5, 8),  # 6 -> the next power of two, 8 = all of a trunk's rows
        (4, 2, 2, 3.0, 8),  # 12 -> 16, but no pair can receive more than T x k = 8
        (64, 8, 16, 1.25, 64),  # mean 32, x 1.25 = 40 -> 64
        (1, 1, 8, 1.0, 1),  # mean 1/8 rounds up to 1
        (3, 2, 4, 1.0, 2),  # mean 1.5 -> 2
    ],
)
def test_fixed_capacity_known_answers(tokens: int, top_k: int, expert_ranks: int, factor: float, expected: int) -> None:
    assert fixed_capacity(tokens, top_k=top_k, expert_ranks=expert_ranks, factor=factor) == expected


def test_expert_load_counts_and_layer_bounds() -> None:
    load = ExpertLoad(num_moe_layers=2, num_experts=4)
    load.add(0, torch.tensor([[0, 3], [3, 1]]))
    load.add(1, torch.tensor([[2, 2]]))
    assert load.take().tolist() == [[1, 1, 0, 2], [0, 0, 2, 0]]
    assert load.counts.sum().item() == 0
    with pytest.raises(IndexError, match="MoE layer 2 outside the 2 counted layers"):
        load.add(2, torch.tensor([[0]]))


def test_layer_calls_out_of_the_plan_are_refused() -> None:
    spec = GroupSpec("127.0.0.1", 1, world_size=3, backend="gloo", deadline_s=1.0, epoch=0)
    handle = GroupHandle(group=None, rank=0, spec=spec)  # type: ignore[arg-type]  # no collective is reached
    shape = GroupShape(1, 2)
    emap = ExpertMap.contiguous(num_experts=4, num_moe_layers=2, expert_ranks=2)
    disp = AllToAllDispatcher(handle, shape, emap, hidden=HIDDEN, dtype=torch.float32, num_experts=4)
    x, routing = torch.zeros(1, HIDDEN), Routing(torch.tensor([[0]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="out of the step plan's order"):
        disp(0, x, routing)  # no step begun
    disp.begin(StepPlan((0, 1)))
    with pytest.raises(RuntimeError, match="MoE layer 1 called out of the step plan's order"):
        disp(1, x, routing)
    with pytest.raises(RuntimeError, match="step ran 0 MoE layers, the plan has 2"):
        disp.finish()


# ----------------------------------------------------------------------------- the exchange

HIDDEN, INTER, EXPERTS, LAYERS, TOP_K = 8, 4, 6, 2, 2
EXPERT_MAP = ExpertMap.contiguous(num_experts=EXPERTS, num_moe_layers=LAYERS, expert_ranks=2)  # 0-2 | 3-5
LAYER_IDS = tuple(range(LAYERS))

# Per step: the plan, then two trunk ranks' top-k expert ids (one row per token; None: no tokens). With
# D = 1 the only trunk rank takes the second column (it overflows, and idles once).
STEPS: list[tuple[StepPlan, list[list[list[int]] | None]]] = [
    (StepPlan(LAYER_IDS), [[[0, 3], [1, 2], [5, 4], [0, 1], [3, 5]], [[2, 4]]]),
    # every pair within C = 2: the fixed fast path on both trunks
    (StepPlan(LAYER_IDS, FIXED, capacity=2), [[[0, 3], [1, 4]], [[2, 5]]]),
    # trunk 1 sends expert rank 0 four rows (> C = 2): the overflow exchange; trunk 0 stays within C
    (StepPlan(LAYER_IDS, FIXED, capacity=2), [[[0, 3], [1, 4]], [[0, 1], [2, 3], [0, 5]]]),
    # trunk 0 idle while trunk 1 overflows C = 1 on both expert ranks
    (StepPlan(LAYER_IDS, FIXED, capacity=1), [None, [[0, 3], [1, 4], [2, 5]]]),
    (StepPlan(LAYER_IDS), [[[4, 5]], None]),
    # ping-pong micro-batches (the trunks keep m exchange units in flight): variable mode, m = 2
    (StepPlan(LAYER_IDS, micro_batches=2, split_layers=2), [[[0, 3], [1, 2], [5, 4]], [[2, 4], [0, 1]]]),
    # fixed, m = 2, then one unsplit unit (as an MTP pass): micro-batch 0 of both trunks overflows C = 1, so its
    # overflow exchange runs after micro-batch 1's main exchange; micro-batch 1 of trunk 0 overflows too
    (
        StepPlan((0, 1, 1), FIXED, capacity=1, micro_batches=2, split_layers=2),
        [[[0, 3], [1, 4], [0, 1], [2, 5]], [[0, 3], [1, 2], [0, 5]]],
    ),
    # m = 3 with fewer sequences than micro-batches (empty ones still exchange), the other trunk idle
    (StepPlan(LAYER_IDS, FIXED, capacity=4, micro_batches=3, split_layers=2), [[[0, 3]], None]),
    (
        StepPlan((0, 1, 1), FIXED, capacity=1, micro_batches=3, split_layers=2),
        [[[0, 1], [3, 4], [2, 0]], [[1, 2], [4, 5], [0, 3], [1, 5]]],
    ),
]


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(LAYERS, EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.3
    down = torch.randn(LAYERS, EXPERTS, HIDDEN, INTER, generator=g) * 0.3
    return gate_up, down


def _shard(ids: list[int]) -> ExpertShard:
    gate_up, down = _weights()
    layers = [LayerExperts(tuple(ids), gate_up[m, ids].contiguous(), down[m, ids].contiguous()) for m in LAYER_IDS]
    return ExpertShard(layers, num_experts=EXPERTS)


def _tokens(step: int, trunk: int, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + 10 * trunk + layer)
    x = torch.randn(n, HIDDEN, generator=g)
    w = torch.softmax(torch.randn(n, TOP_K, generator=g), dim=-1)
    return x, w


def _trunk(index: int, column: int, shape: GroupShape, spec: GroupSpec) -> dict[str, Any]:
    group = join_group(spec, shape.trunk_rank(index))
    try:
        disp = AllToAllDispatcher(group, shape, EXPERT_MAP, hidden=HIDDEN, dtype=torch.float32, num_experts=EXPERTS)
        local = _shard(list(range(EXPERTS)))
        diffs = []
        for step, (plan, per_trunk) in enumerate(STEPS):
            ids = per_trunk[column]
            disp.begin(plan)
            if ids is None:
                disp.run_idle()
            elif plan.split:
                diffs += _ping_pong(disp, local, plan, step, index, ids)
            else:
                for layer in plan.moe_layers:
                    x, w = _tokens(step, index, layer, len(ids))
                    routing = Routing(torch.tensor(ids), w)
                    y = disp(layer, x, routing)
                    diffs.append((y - local_routed_experts(local, layer, x, routing)).abs().max().item())
            disp.finish()
        return {"diffs": diffs, "load": disp.load.take().tolist()}
    finally:
        leave_group()


def _ping_pong(
    disp: AllToAllDispatcher, local: ExpertShard, plan: StepPlan, step: int, index: int, ids: list[list[int]]
) -> list[float]:
    """The trunk's ping-pong order: per layer, micro-batch j's previous unit is waited on only right before its
    next one is issued (as Trunk.forward_split); then the plan's unsplit units one at a time."""
    diffs: list[float] = []

    def check(layer: int, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        assert y.shape == x.shape
        if x.shape[0]:
            diffs.append((y - local_routed_experts(local, layer, x, routing)).abs().max().item())
        else:
            diffs.append(0.0)

    groups = split_sequences([1] * len(ids), plan.micro_batches)
    pending: list[Any] = [None] * len(groups)
    for layer in plan.moe_layers[: plan.split_layers]:
        x, w = _tokens(step, index, layer, len(ids))
        topk = torch.tensor(ids)
        for j, (a, b) in enumerate(groups):
            if pending[j] is not None:
                check(*pending[j][:3], pending[j][3].wait())
            routing = Routing(topk[a:b], w[a:b])
            pending[j] = (layer, x[a:b], routing, disp.start(layer, x[a:b], routing))
    for item in pending:
        check(*item[:3], item[3].wait())
    for layer in plan.moe_layers[plan.split_layers :]:
        x, w = _tokens(step, index, layer, len(ids))
        routing = Routing(torch.tensor(ids), w)
        check(layer, x, routing, disp(layer, x, routing))
    return diffs


def _expert(index: int, column: int, shape: GroupShape, spec: GroupSpec) -> dict[str, Any]:
    group = join_group(spec, shape.expert_rank(index))
    try:
        held = [e for e in range(EXPERTS) if EXPERT_MAP.owners[0][e] == (index,)]
        rank = ExpertRank(_shard(held), group, shape, hidden=HIDDEN, dtype=torch.float32)
        steps = [rank.serve(plan).rows for plan, _ in STEPS]
        return {"rows": steps, "rows_per_layer": rank.rows_per_layer.tolist()}
    finally:
        leave_group()


def _run(role: str, index: int, column: int, shape: GroupShape, spec: GroupSpec, results: Any) -> None:  # noqa: ANN401  # an mp.Queue
    try:
        out = (_trunk if role == "trunk" else _expert)(index, column, shape, spec)
        results.put((role, index, out))
    except BaseException:  # noqa: BLE001  # the parent reports the child's traceback
        results.put((role, index, {"error": traceback.format_exc()}))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("columns", [(0, 1), (1,)], ids=["D2", "D1"])
def test_all_to_all_equals_local_in_every_mode(columns: tuple[int, ...]) -> None:
    shape = GroupShape(trunk_ranks=len(columns), expert_ranks=2)
    spec = GroupSpec("127.0.0.1", free_port(), world_size=shape.world_size, backend="gloo", deadline_s=30.0, epoch=0)
    # spawn, not fork: after the rest of the suite this process has torch's OpenMP pool and Ray's threads running,
    # and a forked child can hang in its first parallel region (one rank stuck, its peers time out in gloo)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    roles = [("trunk", i) for i in range(shape.trunk_ranks)] + [("expert", j) for j in range(shape.expert_ranks)]
    procs = [
        ctx.Process(
            target=_run, args=(role, i, columns[i] if role == "trunk" else -1, shape, spec, results), daemon=True
        )
        for role, i in roles
    ]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in roles:
            role, i, out = results.get(timeout=90)
            assert "error" not in out, f"{role} rank {i} failed:\n{out['error']}"
            got[role, i] = out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    # every token's output equals the in-process experts' (same fp32 arithmetic, other row groupings)
    # (ping-pong steps: one output per micro-batch of each split layer)
    for i, col in enumerate(columns):
        units = [len(p.units()) for p, t in STEPS if t[col] is not None]
        assert len(got["trunk", i]["diffs"]) == sum(units)
        assert max(got["trunk", i]["diffs"]) < 1e-5
    # rows each expert rank computed, counted from the routing by hand: expert e lives on rank e // 3; a layer the
    # plan names twice (the unsplit MTP-like pass) counts twice
    for j in range(shape.expert_ranks):
        rows = [
            sum(1 for c in columns for row in per_trunk[c] or [] for e in row if e // 3 == j) for _, per_trunk in STEPS
        ]
        assert got["expert", j]["rows"] == [len(p.moe_layers) * n for (p, _), n in zip(STEPS, rows)]
        assert got["expert", j]["rows_per_layer"] == [
            sum(p.moe_layers.count(layer) * n for (p, _), n in zip(STEPS, rows)) for layer in LAYER_IDS
        ]
    # the trunks' expert-load counters: tokens per expert per layer over all steps
    for i, col in enumerate(columns):
        counts = [[0] * EXPERTS for _ in LAYER_IDS]
        for plan, per_trunk in STEPS:
            for row in per_trunk[col] or []:
                for e in row:
                    for layer in plan.moe_layers:
                        counts[layer][e] += 1
        assert got["trunk", i]["load"] == counts
