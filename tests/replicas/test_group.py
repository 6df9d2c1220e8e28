"""Expert parallelism across Ray nodes equals the single-process model.

A 3-node local Ray cluster; groups of D trunk ranks and X expert ranks on a transformers-saved
random checkpoint in fp32. Oracle: the single-process `LocalModel` on the same inputs, compared
through the full log-softmax (vocab 1024, so top-1024 logprobs are the whole distribution).
Tolerance 2e-5 on logprobs: the same arithmetic per row, but fp32 GEMMs round differently for
different row counts (an expert sees other rows in the group than alone).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cluster.topology import GroupShape
from model_shards.batch import SeqChunk, StepBatch
from model_shards.model import LocalModel
from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult
from replicas.ep.a2a_protocol import FIXED, StepPlan

pytestmark = pytest.mark.timeout(600)

TOL = 2e-5
BLOCK = 16
VOCAB = 1024
GREEDY_ALL = SamplingParams(temperature=0.0, logprobs=VOCAB)


class _Reference:
    """The single-process model keeping one cache per sequence id, stepping sequences one by one."""

    def __init__(self, folder: Path) -> None:
        self.model = LocalModel.load(folder, dtype="float32")
        self.pools = self.model.allocate(num_blocks=128, block_size=BLOCK, num_slots=16)

    def logprobs(self, chunk: SeqChunk) -> torch.Tensor:
        out = self.model.forward(StepBatch.build([chunk], block_size=BLOCK), self.pools)
        return torch.log_softmax(out.logits_RV[-1], dim=-1)


def _full_logprobs(res: StepResult, i: int) -> torch.Tensor:
    lp = res.logprobs[i]
    assert lp is not None
    out = torch.full((VOCAB,), float("nan"))
    for tok, v in lp.top:
        out[tok] = v
    return out


class _Scenario:
    """Sequences spread over trunk ranks; the reference mirrors each one in its own slot."""

    def __init__(self, group, ref: _Reference, d: int) -> None:  # noqa: ANN001
        self.group, self.ref, self.d = group, ref, d
        self.seqs: dict[int, dict] = {}
        self.next_block = [0] * d

    def add(self, sid: int, rank: int, prompt: list[int], slot: int) -> None:
        nb = 8  # 128 tokens of room per sequence at most in these tests... sized by the longest below
        nb = -(-(len(prompt) + 40) // BLOCK)
        table = tuple(range(self.next_block[rank], self.next_block[rank] + nb))
        self.next_block[rank] += nb
        ref_table = tuple(range(sid * 16, sid * 16 + nb))
        self.seqs[sid] = dict(rank=rank, slot=slot, table=table, ref_table=ref_table, pending=list(prompt), ctx=0)

    def step(self, active: list[int], plan: StepPlan | None = None) -> dict[int, int]:
        reqs: list[list[SeqStep]] = [[] for _ in range(self.d)]
        order: list[list[int]] = [[] for _ in range(self.d)]
        for sid in active:
            s = self.seqs[sid]
            first = s["ctx"] == 0  # the sequence's first step on its rank starts it there, with its whole table
            reqs[s["rank"]].append(
                SeqStep(
                    sid,
                    s["ctx"],
                    tuple(s["pending"]),
                    s["table"] if first else (),
                    start=SeqStart(s["slot"], GREEDY_ALL, len(s["pending"])) if first else None,
                )
            )
            order[s["rank"]].append(sid)
        results = asyncio.run(self.group.step([StepRequest(tuple(r)) for r in reqs], plan=plan))
        tokens = {}
        for rank in range(self.d):
            for i, sid in enumerate(order[rank]):
                s = self.seqs[sid]
                want = self.ref.logprobs(SeqChunk(tuple(s["pending"]), s["ctx"], sid, s["ref_table"]))
                got = _full_logprobs(results[rank], i)
                d = (got - want).abs()
                assert d.max().item() < TOL, f"seq {sid}: max |d| {d.max().item():.3g}, mean {d.mean().item():.3g}"
                tok = results[rank].token_ids[i]
                assert tok == int(want.argmax())
                s["ctx"] += len(s["pending"])
                s["pending"] = [tok]
                tokens[sid] = tok
        return tokens


@pytest.fixture(scope="module")
def reference(hf_checkpoint: Path) -> _Reference:
    return _Reference(hf_checkpoint)


def _group(folder: Path, d: int, x: int, **kw):  # noqa: ANN003, ANN202
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    g = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(folder),
            shape=GroupShape(d, x),
            dtype="float32",
            deadline_s=kw.pop("deadline_s", 20.0),
            caches=CacheSizes(128, BLOCK, 8),
            **kw,
        )
    )
    g.start()
    return g


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


# (1, 2), (1, 4) and (2, 2) are `slow`: the exchange's modes are covered in seconds by test_dispatch.py, and (2, 4)
# keeps an expert rank with no rows in some steps.
@pytest.mark.parametrize(
    "d,x",
    [
        (1, 1),
        pytest.param(1, 2, marks=pytest.mark.slow),
        pytest.param(1, 4, marks=pytest.mark.slow),
        (2, 1),
        pytest.param(2, 2, marks=pytest.mark.slow),
        (2, 4),
    ],
    ids=lambda v: str(v),
)
def test_group_equals_single_process(d: int, x: int, ray_cluster, hf_checkpoint: Path, reference: _Reference) -> None:  # noqa: ANN001
    _equals_single_process(d, x, 1, hf_checkpoint, reference)


# Ping-pong micro-batches (m = 2): the same oracle, so the tokens equal m = 1's (which equal it too) and the logprobs
# are within 2e-5 of the single process (the issue asks 1e-4 of m = 1). Prefill splits [1, 37, 64 | 150] on D = 1;
# the one-sequence step leaves a micro-batch empty; the C = 1 step overflows in both micro-batches. Only (2, 1) runs
# by default (D = 2 with an idle rank every 4th step): the exchange in micro-batches for D, X = 1, 2 and m = 2, 3
# runs in seconds in test_dispatch.py.
@pytest.mark.parametrize(
    "d,x",
    [
        pytest.param(1, 1, marks=pytest.mark.slow),
        pytest.param(1, 2, marks=pytest.mark.slow),
        pytest.param(1, 4, marks=pytest.mark.slow),
        (2, 1),
        pytest.param(2, 2, marks=pytest.mark.slow),
        pytest.param(2, 4, marks=pytest.mark.slow),
    ],
    ids=lambda v: str(v),
)
def test_ping_pong_equals_single_process(
    d: int,
    x: int,
    ray_cluster,  # noqa: ANN001
    hf_checkpoint: Path,
    reference: _Reference,
) -> None:
    _equals_single_process(d, x, 2, hf_checkpoint, reference)


def _equals_single_process(d: int, x: int, m: int, hf_checkpoint: Path, reference: _Reference) -> None:
    group = _group(hf_checkpoint, d, x, micro_batches=m)
    try:
        sc = _Scenario(group, reference, d)
        lengths = [1, 37, 64, 150]
        for sid, p in enumerate(_prompts(10 * d + x, lengths)):
            sc.add(sid, rank=sid % d, prompt=p, slot=sid // d)
        # uneven prefill batch across the trunk ranks, all at once (variable-size exchange)
        sc.step([0, 1, 2, 3])
        # 20 decode steps (fixed-capacity exchange); on D = 2 every 4th step leaves rank 1 idle
        for step in range(20):
            active = [0, 1, 2, 3] if d == 1 or step % 4 else [0, 2]
            sc.step(active)
        # a single token: its top-4 experts over 4 expert ranks of 4 experts each reach every rank in a
        # layer with probability ~0.14, so over 8 layers some rank surely gets no row
        group.expert_load()
        sc.step([0])
        per_rank = group.expert_load()["tokens_per_rank"][: reference.model.cfg.num_layers]
        if x == 4:
            assert (per_rank == 0).any(), "expected an expert rank with no rows in some layer"
        # capacity overflow: C = 1 row per (trunk, expert-rank) pair for a 4-sequence decode step
        layers = tuple(range(reference.model.cfg.num_layers))
        split = len(layers) if m > 1 else 0
        sc.step([0, 1, 2, 3], plan=StepPlan(layers, FIXED, capacity=1, micro_batches=m, split_layers=split))
        assert group.epoch == 0
    finally:
        group.shutdown()


def test_refused_sequence_fails_alone_and_the_group_keeps_serving(
    ray_cluster,  # noqa: ANN001
    hf_checkpoint: Path,
    reference: _Reference,
) -> None:
    """The rule for errors inside a step: a trunk rank refuses, before the step's first collective, sequences
    that would make it raise later (logprobs past the vocabulary, token ids outside it); they fail alone in
    `StepResult.errors`, the rank still runs the step's exchanges, the good sequence beside them gets the
    reference's token, and the group is not failed (epoch 0, the next step serves)."""
    group = _group(hf_checkpoint, 1, 1)
    try:
        prompt = tuple(_prompts(7, [12])[0])
        good = SeqStep(1, 0, prompt, (0,), start=SeqStart(0, SamplingParams(temperature=0.0, logprobs=2), len(prompt)))
        bad_lp = SeqStep(2, 0, (5, 6), (1,), start=SeqStart(1, SamplingParams(temperature=0.0, logprobs=VOCAB + 1), 2))
        bad_id = SeqStep(3, 0, (5, VOCAB + 3), (2,), start=SeqStart(2, SamplingParams(temperature=0.0), 2))
        res = asyncio.run(group.step([StepRequest((bad_lp, good, bad_id))]))[0]
        assert res.errors[1] is None
        assert "logprobs" in res.errors[0] and "vocabulary" in res.errors[2], res.errors
        assert res.token_ids[0] is None and res.token_ids[2] is None
        want = reference.logprobs(SeqChunk(prompt, 0, 15, tuple(range(100, 101))))
        assert res.token_ids[1] == int(want.argmax())
        assert group.epoch == 0
        # the next step continues the good sequence; sequence 2 was refused (its state dropped) and 9 never started
        nxt = res.token_ids[1]
        assert nxt is not None
        res = asyncio.run(
            group.step([StepRequest((SeqStep(2, 2, (7,)), SeqStep(1, len(prompt), (nxt,)), SeqStep(9, 3, (7,))))])
        )[0]
        assert res.errors[1] is None and res.token_ids[1] is not None and group.epoch == 0
        assert "not held" in (res.errors[0] or "") and "not held" in (res.errors[2] or ""), res.errors
    finally:
        group.shutdown()


def test_expert_rank_bytes_equal_safetensors_headers(ray_cluster, hf_checkpoint: Path) -> None:  # noqa: ANN001
    """Each expert rank's parameter bytes = the sizes of its expert tensors in the safetensors headers."""
    import ray
    from safetensors import safe_open

    group = _group(hf_checkpoint, 1, 4)
    try:
        sizes = {}
        with safe_open(str(hf_checkpoint / "model.safetensors"), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                n = 1
                for s in sl.get_shape():
                    n *= s
                sizes[name] = n * {"F32": 4, "BF16": 2}[sl.get_dtype()]
        total = 0
        for j, actor in enumerate(group.experts):
            held = ray.get(actor.held_experts.remote())
            names = [
                n
                for n in sizes
                if ".mlp.experts." in n
                and int(n.split(".mlp.experts.")[1].split(".")[0]) in held[int(n.split(".layers.")[1].split(".")[0])]
            ]
            assert ray.get(actor.param_bytes.remote()) == sum(sizes[n] for n in names), f"expert rank {j}"
            total += sum(sizes[n] for n in names)
        assert total == sum(v for n, v in sizes.items() if ".mlp.experts." in n)
    finally:
        group.shutdown()


def _long_prefill(group, d: int) -> list[StepRequest]:  # noqa: ANN001
    """A step long enough (several hundred ms) to kill or freeze a rank while it runs."""
    prompts = _prompts(99, [600, 600])
    reqs = [[] for _ in range(d)]
    for i, p in enumerate(prompts):
        reqs[0].append(
            SeqStep(
                i,
                0,
                tuple(p),
                tuple(range(i * 40, i * 40 + 40)),
                start=SeqStart(i, SamplingParams(temperature=0.0), len(p)),
            )
        )
    return [StepRequest(tuple(r)) for r in reqs]


# slow (suite time): the default run covers a raising and a hung expert rank at the group level (test_failures.py)
# and a killed and a frozen one through Serve (test_reliability.py: SIGKILL, SIGSTOP)
@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "sigstop"])
def test_dead_or_frozen_expert_rank_fails_the_step_then_rebuild_serves(
    how: str,
    ray_cluster,  # noqa: ANN001
    hf_checkpoint: Path,
    reference: _Reference,
) -> None:
    """A killed expert errors its peers at once; a frozen one at the collective deadline (5 s here).
    Either way the step raises GroupFailure naming expert rank 1 (never a hang), and rebuild() serves again."""
    import os
    import signal
    import threading
    import time

    import ray

    from replicas.ep.group import GroupFailure

    deadline = 5.0
    group = _group(hf_checkpoint, 1, 2, deadline_s=deadline)
    victim = group.experts[1]
    pid = ray.get(victim.pid.remote())
    try:

        def strike() -> None:
            time.sleep(0.3)
            if how == "kill":
                ray.kill(victim, no_restart=True)
            else:
                os.kill(pid, signal.SIGSTOP)

        threading.Thread(target=strike, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(GroupFailure) as info:
            asyncio.run(group.step(_long_prefill(group, 1)))
        elapsed = time.monotonic() - t0
        failure = info.value
        assert group.shape.expert_rank(1) in failure.failed_ranks, str(failure)
        assert "expert rank 1" in str(failure)
        assert elapsed < deadline * 2 + 10, f"failure took {elapsed:.1f} s"
        if how == "kill":
            assert failure.dead == (group.shape.expert_rank(1),)
        else:
            assert failure.timed_out == (group.shape.expert_rank(1),)
        # still failed until rebuilt
        with pytest.raises(GroupFailure):
            asyncio.run(group.step([StepRequest()]))
        group.rebuild()
        assert group.epoch == 1
        sc = _Scenario(group, reference, 1)
        sc.add(0, rank=0, prompt=_prompts(5, [20])[0], slot=0)
        sc.step([0])
        sc.step([0])
    finally:
        if how == "sigstop":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        group.shutdown()
