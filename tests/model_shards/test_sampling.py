"""Sampling: filters and repetition penalty against transformers' logits processors (the oracle, applied in
our order: temperature, min_p, top_k, top_p), draws against the target distribution, seeds, penalties,
masks and logprobs (known answers and oracles, small vocabularies)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model_shards.sampling import SamplingParams, apply_bitmask, apply_penalties, candidates, filter_logits, sample

PARAMS = [
    SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8, min_p=0.05),
    SamplingParams(temperature=1.3, top_k=5, min_p=0.2, top_p=0.5),
    SamplingParams(temperature=1.0),
]


def _hf_filtered(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in our order over one row of logits: filtered-out tokens are -inf."""
    procs = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    return procs(torch.zeros(1, 0, dtype=torch.long), x[None].clone())[0]


@pytest.mark.parametrize("p", PARAMS, ids=["defaults", "top_p", "min_p", "all", "plain"])
def test_candidates_and_filter_match_transformers_warpers(p: SamplingParams) -> None:
    torch.manual_seed(0)
    for _ in range(5):
        x = torch.randn(5000) * 3
        ref = _hf_filtered(x, p)
        support = set(torch.nonzero(torch.isfinite(ref)).flatten().tolist())
        ids, vals = candidates(x, params=p)
        assert set(ids.tolist()) == support
        torch.testing.assert_close(vals, ref[ids])
        assert bool((vals[:-1] >= vals[1:]).all()), "candidates come in descending order"
        mine = filter_logits(x, params=p)  # the readable whole-vocabulary version
        assert set(torch.nonzero(torch.isfinite(mine)).flatten().tolist()) == support
        torch.testing.assert_close(mine[sorted(support)], ref[sorted(support)])


def test_draws_follow_the_filtered_distribution() -> None:
    """10,000 seeded draws from a 6-token vocabulary match softmax of the filtered logits (chi-square)."""
    x = torch.tensor([2.0, 1.5, 1.0, 0.5, -1.0, -3.0])
    p = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
    target = torch.softmax(_hf_filtered(x, p), dim=-1)
    n = 10_000
    params = [SamplingParams(temperature=0.8, top_k=4, top_p=0.95, seed=s) for s in range(n)]
    drawn = sample(x.expand(n, -1).clone(), params, positions=[0] * n).token_ids
    freq = torch.bincount(drawn, minlength=6).float() / n
    assert float(freq[target == 0].sum()) == 0.0, "a filtered-out token was drawn"
    kept = target > 0
    chi2 = float((((freq - target) ** 2) / target)[kept].sum() * n)
    assert chi2 < 20.5, f"chi-square {chi2:.1f} with {int(kept.sum()) - 1} degrees of freedom"  # p < 0.001


def test_seed_and_position_make_draws_reproducible_and_distinct() -> None:
    x = torch.randn(3, 1000)
    p = [SamplingParams(temperature=1.0, seed=7)] * 3
    a = sample(x, p, positions=[0, 1, 2]).token_ids
    b = sample(x, p, positions=[0, 1, 2]).token_ids
    assert torch.equal(a, b)
    # one row alone draws what it drew inside the batch (independent of batch composition)
    assert int(sample(x[1:2], p[:1], positions=[1]).token_ids[0]) == int(a[1])
    other = [
        sample(x[:1], [SamplingParams(temperature=1.0, seed=s)], positions=[0]).token_ids.item() for s in range(20)
    ]
    assert len(set(other)) > 5


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax() -> None:
    x = torch.randn(4, 50)
    out = sample(x, [SamplingParams(temperature=0.0, logprobs=3)] * 4)
    assert torch.equal(out.token_ids, x.argmax(-1))
    ref = torch.log_softmax(x, dim=-1)
    torch.testing.assert_close(out.logprob, ref.gather(1, out.token_ids[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs, ref.topk(3).values)


def test_repetition_penalty_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=gen) * 4
    prompt, output = torch.randint(0, 300, (40,), generator=gen), torch.randint(0, 300, (25,), generator=gen)
    for penalty in (1.3, 0.7):
        got = apply_penalties(
            x, params=SamplingParams(repetition_penalty=penalty), prompt_ids=prompt, output_ids=output
        )
        hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.cat([prompt, output])[None], x[None].clone())[0]
        torch.testing.assert_close(got, hf, rtol=0, atol=0)


def test_penalties_known_answers() -> None:
    x = torch.tensor([2.0, -2.0, 1.0, 0.5])
    rep = apply_penalties(
        x, params=SamplingParams(repetition_penalty=2.0), prompt_ids=torch.tensor([0]), output_ids=torch.tensor([1])
    )
    assert rep.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive / 2, negative * 2, unseen unchanged
    fp = apply_penalties(
        x,
        params=SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        prompt_ids=torch.tensor([3]),
        output_ids=torch.tensor([2, 2, 0]),
    )
    assert fp.tolist() == [2.0 - 0.5 - 0.25, -2.0, 1.0 - 1.0 - 0.25, 0.5]  # prompt tokens are not penalised


def test_banned_and_allowed_masks() -> None:
    x = torch.tensor([[5.0, 4.0, 3.0, 2.0]] * 2)
    g = SamplingParams(temperature=0.0, logprobs=0)
    out = sample(x, [g, g], banned=[(0,), ()], allowed=[None, torch.tensor([0b1100], dtype=torch.int32)])
    assert out.token_ids.tolist() == [1, 2]
    # logprobs stay those of the raw model distribution
    torch.testing.assert_close(out.logprob, torch.log_softmax(x, -1)[[0, 1], [1, 2]])
    row = torch.zeros(40)
    mask = torch.tensor([1 << 3, 1 << 1], dtype=torch.int32)  # tokens 3 and 33
    allowed = torch.nonzero(torch.isfinite(apply_bitmask(row, mask))).flatten().tolist()
    assert allowed == [3, 33]


def test_min_p_threshold_is_relative_to_the_top_probability() -> None:
    x = torch.tensor([0.0, math.log(0.5), math.log(0.09), math.log(0.11)])
    ids, _ = candidates(x, params=SamplingParams(temperature=1.0, min_p=0.1))
    assert sorted(ids.tolist()) == [0, 1, 3]


def test_overflowing_logits_still_give_a_token() -> None:
    """An extreme temperature or penalty can overflow logits to +inf (or leave nothing finite): the draw
    picks among the +inf tokens (or the best-ranked one) instead of failing on an empty candidate set."""
    logits = torch.tensor([1.0, 3.0e38, 2.0, 3.0e38, -1.0])
    tiny = SamplingParams(temperature=1e-3, seed=1)  # 3e38 / 1e-3 overflows to +inf
    for seed in range(8):
        tok = int(sample(logits[None], [SamplingParams(temperature=1e-3, seed=seed)]).token_ids[0])
        assert tok in (1, 3)
    ids, vals = candidates(logits, params=tiny)
    assert sorted(ids.tolist()) == [1, 3] and torch.equal(vals, torch.zeros(2))
    nan = torch.full((5,), float("nan"))
    assert int(sample(nan[None], [SamplingParams(temperature=1.0, top_k=3)]).token_ids[0]) in range(5)
