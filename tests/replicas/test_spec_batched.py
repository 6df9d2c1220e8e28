"""Speculative decoding batched: verification, drafting and rollback over many sequences at once.

Oracles: each sequence run alone (a draw depends only on its own seed, position and distributions, never on
the batch); a per-sequence Python loop for greedy acceptance (known answers) and for the state rollback;
and, for the "no per-sequence loop" property, the number of aten ops the rank dispatches in its speculative
code for 1 vs 8 sequences, which must be the same (a loop of torch ops per sequence makes it grow).
Greedy output with speculation == without, and the rejection rule's distribution: tests/replicas/test_speculative.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model_shards.sampling import SamplingParams
from replicas.ep.local_runner import LocalRunner
from replicas.ep.speculative import draft, draft_rows, verify, verify_rows

pytestmark = pytest.mark.timeout(300)

V = 40
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, seed=11),
    SamplingParams(temperature=0.7, top_k=5, seed=12),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.2, top_p=0.8, seed=13),
    SamplingParams(temperature=0.9, min_p=0.05, seed=14),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.9, seed=15),
    SamplingParams(temperature=0.0),
]
COUNTS = [1, 2, 3, 3, 2, 1, 3, 2]  # draft counts: sequences of one step verify different numbers of drafts


def _peaked(rows: int, seed: int) -> torch.Tensor:
    """Logits with a few likely tokens, so sampled drafts are often accepted and often not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g)
    x[:, :4] += 3.0
    return x


def test_draft_rows_batched_equals_each_row_alone() -> None:
    logits = _peaked(len(PARAMS), 0)
    positions = [3, 0, 7, 1, 2, 9, 4, 5]
    tokens, q = draft_rows(logits, PARAMS, positions)
    sampled = [j for j, p in enumerate(PARAMS) if not p.greedy]
    assert q is not None and q.shape == (len(sampled), V)
    for j, p in enumerate(PARAMS):
        alone, q_alone = draft(logits[j], p, position=positions[j])
        assert int(tokens[j]) == alone, j
        if p.greedy:
            assert alone == int(logits[j].argmax()) and q_alone is None
        else:
            assert q_alone is not None
            assert torch.equal(q[sampled.index(j)], q_alone), j
            assert abs(float(q_alone.sum()) - 1.0) < 1e-5 and float(q_alone[alone]) > 0


def _greedy_oracle(logits_JV: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    target = [int(t) for t in logits_JV.argmax(dim=-1)]
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return a, target[a]


def test_verify_rows_batched_equals_each_sequence_alone() -> None:
    """8 sequences, greedy and sampled, 1-3 drafts each, in one call: each one's accepted count and token are
    those it gets alone; greedy ones also match a per-sequence loop (known answers)."""
    n = max(COUNTS)
    logits = _peaked(sum(c + 1 for c in COUNTS), 1)
    starts = [sum(c + 1 for c in COUNTS[:i]) for i in range(len(COUNTS))]
    positions = [5 * i for i in range(len(COUNTS))]
    drafts: list[list[int]] = []
    qs: list[list[torch.Tensor]] = []
    for i, (p, c) in enumerate(zip(PARAMS, COUNTS)):
        rows = logits[starts[i] : starts[i] + c + 1]
        if p.greedy:  # right for the first i % (c + 1) drafts, then wrong: every depth is reached
            right = [int(t) for t in rows.argmax(dim=-1)][:c]
            d = [t if j < i % (c + 1) else (t + 1) % V for j, t in enumerate(right)]
            drafts.append(d)
            qs.append([])
        else:  # drawn from a draft distribution near the target's, as the MTP head's would be
            near = rows[:c] + 0.5 * torch.randn(c, V, generator=torch.Generator().manual_seed(i))
            pairs = [draft(near[j], p, position=positions[i] + j) for j in range(c)]
            drafts.append([t for t, _ in pairs])
            qs.append([q for _, q in pairs if q is not None])
    rows_SJ = torch.tensor([[starts[i] + min(j, c) for j in range(n + 1)] for i, c in enumerate(COUNTS)])
    drafts_SN = torch.tensor([d + [-1] * (n - len(d)) for d in drafts])
    q_SNV = torch.stack(
        [torch.cat([torch.stack(q), torch.zeros(n - len(q), V)]) for q, p in zip(qs, PARAMS) if not p.greedy]
    )
    out = verify_rows(logits, rows_SJ, drafts_SN, COUNTS, PARAMS, positions, q_SNV)
    seen = set()
    for i, (p, c) in enumerate(zip(PARAMS, COUNTS)):
        rows = logits[starts[i] : starts[i] + c + 1]
        alone = verify(rows, drafts[i], p, position=positions[i], q=qs[i] or [None] * c)
        got = (int(out.accepted[i]), int(out.token[i]))
        assert got == alone, (i, got, alone)
        if p.greedy:
            assert got == _greedy_oracle(rows, drafts[i]), i
        a = got[0]
        assert out.emitted[i, : a + 1].tolist() == [*drafts[i][:a], got[1]]
        seen.add(a)
    assert seen >= {0, 1, 2, 3}, seen


def test_rollback_many_equals_rollback_one_by_one(tiny_fused) -> None:  # noqa: ANN001
    from model_shards.cache import CachePools
    from model_shards.config import from_hf_config

    cfg = from_hf_config(tiny_fused)
    kw: dict[str, Any] = dict(num_blocks=2, block_size=16, num_slots=6, dtype=torch.float32, spec_tokens=3)
    a, b = CachePools.allocate(cfg, **kw), CachePools.allocate(cfg, **kw)
    g = torch.Generator().manual_seed(3)
    for t in ("conv", "recurrent", "spec_conv", "spec_recurrent"):
        x = torch.randn(getattr(a, t).shape, generator=g)
        getattr(a, t).copy_(x)
        getattr(b, t).copy_(x)
    slots, keep = [4, 1, 5], [2, 0, 3]
    for s, k in zip(slots, keep):
        a.rollback(s, keep=k)
    b.rollback_many(torch.tensor(slots), torch.tensor(keep))
    assert torch.equal(a.conv, b.conv) and torch.equal(a.recurrent, b.recurrent)


# ---------------------------------------------------------------------------- whole rank: ops do not grow
class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while `depth` > 0 (inside the regions `count` wraps)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204  # torch's protocol
        if self.depth > 0:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def count(self, fn: Callable) -> Callable:
        def wrapped(*a: Any, **kw: Any) -> Any:  # noqa: ANN401  # passes through
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1

        return wrapped

    def pause(self, fn: Callable) -> Callable:
        def wrapped(*a: Any, **kw: Any) -> Any:  # noqa: ANN401  # passes through
            depth, self.depth = self.depth, 0
            try:
                return fn(*a, **kw)
            finally:
                self.depth = depth

        return wrapped


@contextmanager
def _counting(rank, monkeypatch: pytest.MonkeyPatch) -> Iterator[_OpCounter]:  # noqa: ANN001
    """Count the ops of the rank's speculative code: verification (`_verify`), the DeltaNet verify steps
    (`_verify_steps`, per layer) and drafting (`MtpDrafter.draft`) except the MTP layer's forward itself (its MoE
    runs one expert call per expert the tokens reach, which grows with the batch by design)."""
    from model_shards import gated_deltanet
    from replicas.ep import mtp_drafter

    counter = _OpCounter()
    monkeypatch.setattr(rank, "_verify", counter.count(rank._verify))
    monkeypatch.setattr(rank.drafter, "draft", counter.count(rank.drafter.draft))
    monkeypatch.setattr(gated_deltanet, "_verify_steps", counter.count(gated_deltanet._verify_steps))
    monkeypatch.setattr(mtp_drafter, "mtp_forward", counter.pause(mtp_drafter.mtp_forward))
    with counter:
        yield counter


K = 2
PROMPT_LEN = 9


def _verify_step(
    runner: LocalRunner, params: list[SamplingParams], monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[tuple]]:
    """Prefill len(params) sequences (drafting k each), then count the ops of one step that verifies all their
    drafts and drafts again. Returns (ops, per sequence (accepted, token, new drafts, logprob))."""
    from replicas.engine.step_types import SeqStart, SeqStep, StepRequest

    rank = runner.rank
    g = torch.Generator().manual_seed(4)
    prompts = [tuple(torch.randint(0, 1000, (PROMPT_LEN,), generator=g).tolist()) for _ in params]
    first = StepRequest(
        tuple(
            SeqStep(i, 0, p, (2 * i, 2 * i + 1), start=SeqStart(i, params[i], PROMPT_LEN, mtp=True))
            for i, p in enumerate(prompts)
        ),
        mtp_steps=K,
    )
    res = rank.step(first)
    assert all(len(d) == K for d in res.drafts), res.drafts
    second = StepRequest(
        tuple(
            SeqStep(i, PROMPT_LEN, (res.token_ids[i],), output_index=1, drafts=res.drafts[i])
            for i in range(len(params))
        ),
        mtp_steps=K,
    )
    with torch.no_grad(), _counting(rank, monkeypatch) as counter:  # dispatch modes see nothing in inference_mode
        out = type(rank).step.__wrapped__(rank, second)  # type: ignore[attr-defined]  # torch's decorator keeps it
    monkeypatch.undo()
    rank.reset()
    lps = [(lp.logprob if lp is not None else None) for lp in out.logprobs]
    return counter.ops, [(out.accepted[i], out.token_ids[i], out.drafts[i], lps[i]) for i in range(len(params))]


@pytest.fixture(scope="module")
def runner(embedded_fp32_mtp_model) -> Iterator[LocalRunner]:  # noqa: ANN001
    from replicas.ep.actors import CacheSizes

    r = LocalRunner(embedded_fp32_mtp_model, CacheSizes(num_blocks=16, block_size=16, num_slots=8, spec_tokens=K))
    yield r
    r.close()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, seed=21, logprobs=1),
    ],
    ids=["greedy", "sampled"],
)
def test_speculative_ops_do_not_grow_with_the_batch(runner, params: SamplingParams, monkeypatch) -> None:  # noqa: ANN001
    """The verify step and the drafting dispatch as many ops for 8 sequences as for 1 (a per-sequence loop of
    torch ops would add its ops 7 more times), and each sequence's result is the one it gets alone."""
    many = [params if params.greedy else replace(params, seed=21 + i) for i in range(8)]
    _verify_step(runner, many[:1], monkeypatch)  # warm-up: weights' derived tensors are made on first use
    ops_1, alone = _verify_step(runner, many[:1], monkeypatch)
    ops_8, together = _verify_step(runner, many, monkeypatch)
    print(f"\n{params.temperature=}: {len(ops_1)} ops for 1 sequence, {len(ops_8)} for 8")
    assert ops_1
    extra = Counter(ops_8)
    extra.subtract(Counter(ops_1))
    assert len(ops_8) == len(ops_1), (
        f"{len(ops_1)} ops for 1 sequence, {len(ops_8)} for 8: a per-sequence loop of torch ops is back? "
        f"{ {op: n for op, n in extra.items() if n} }"
    )
    assert together[0][:3] == alone[0][:3]
    assert abs(together[0][3] - alone[0][3]) < 1e-4
