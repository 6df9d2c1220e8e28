"""The batched sampler against oracles: transformers' logits processors (filters, repetition penalty), the per-row
reference in tests/sampling_reference.py (penalties, masks, target distributions), known answers; draws checked
statistically (chi-square at p = 0.001, KS at alpha = 0.001, fixed seeds: a wrong distribution fails); seeds
reproducible and independent of batch composition and row order; no host sync on a fake CUDA device."""

from __future__ import annotations

import math
import random

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

from model_shards.penalty_history import PenaltyHistory
from model_shards.sampling import (
    DeviceHistory,
    SamplingParams,
    apply_bitmask,
    apply_penalties,
    apply_penalties_history,
    candidates,
    row_keys,
    sample,
    uniforms,
)
from tests import sampling_reference as ref

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
def test_candidates_and_reference_match_transformers_warpers(p: SamplingParams) -> None:
    torch.manual_seed(0)
    for _ in range(5):
        x = torch.randn(5000) * 3
        hf = _hf_filtered(x, p)
        support = set(torch.nonzero(torch.isfinite(hf)).flatten().tolist())
        ids, vals = candidates(x, params=p)
        assert set(ids.tolist()) == support
        torch.testing.assert_close(vals, hf[ids])
        assert bool((vals[:-1] >= vals[1:]).all()), "candidates come in descending order"
        mine = ref.filtered(x, p)  # the oracle the distribution tests use
        assert set(torch.nonzero(torch.isfinite(mine)).flatten().tolist()) == support
        torch.testing.assert_close(mine[sorted(support)], hf[sorted(support)])


# ---------------------------------------------------------------------------- distributions
LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.5, -0.2, -1.0, -2.0, -3.0])
HISTORY = {"prompt": torch.tensor([0, 5]), "output": torch.tensor([1, 1, 3])}
KINDS = {
    "temperature": SamplingParams(temperature=0.7),
    "top_k": SamplingParams(temperature=1.2, top_k=4),
    "top_p": SamplingParams(temperature=1.0, top_p=0.8),
    "min_p": SamplingParams(temperature=1.0, min_p=0.15),
    "all": SamplingParams(temperature=0.9, top_k=6, top_p=0.9, min_p=0.05),
    "penalties": SamplingParams(temperature=1.0, repetition_penalty=1.6, frequency_penalty=0.3, presence_penalty=0.4),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_draws_follow_the_target_distribution(kind: str) -> None:
    """5,000 rows of one batch, one seed each: the drawn tokens follow the oracle's distribution (chi-square);
    then one seed over 5,000 output positions (the position stream)."""
    base, n = KINDS[kind], 5000
    kw = HISTORY if base.has_penalties else {}
    target = ref.target_probs(LOGITS8, base, **kw)
    hist = {"prompt_ids": [HISTORY["prompt"]] * n, "output_ids": [HISTORY["output"]] * n} if kw else {}
    logits = LOGITS8.expand(n, -1).contiguous()
    by_seed = [SamplingParams(**{**base.__dict__, "seed": s}) for s in range(n)]
    drawn = sample(logits, by_seed, positions=[0] * n, **hist).token_ids
    stat, crit = ref.chi_square(drawn, target)
    assert stat < crit, f"{kind} over seeds: chi-square {stat:.1f} >= {crit}"
    one_seed = [SamplingParams(**{**base.__dict__, "seed": 12345})] * n
    drawn = sample(logits, one_seed, positions=list(range(n)), **hist).token_ids
    stat, crit = ref.chi_square(drawn, target)
    assert stat < crit, f"{kind} over positions: chi-square {stat:.1f} >= {crit}"


def test_a_mixed_batch_keeps_every_rows_distribution() -> None:
    """Every kind interleaved in one batch (with greedy rows and a masked row kind): each kind's draws follow
    its own target, so the groups never leak into each other."""
    n = 4000
    kinds = [*KINDS, "masked"]
    mask = torch.tensor([0b01101010], dtype=torch.int32)  # tokens 1, 3, 5, 6
    params, allowed, prompts, outputs = [], [], [], []
    for i in range(n * len(kinds)):
        kind = kinds[i % len(kinds)]
        base = KINDS.get(kind, SamplingParams(temperature=1.0, top_p=0.95))
        params.append(SamplingParams(**{**base.__dict__, "seed": i}))
        allowed.append(mask if kind == "masked" else None)
        prompts.append(HISTORY["prompt"])
        outputs.append(HISTORY["output"])
    greedy = SamplingParams(temperature=0.0)
    rng = random.Random(0)
    for at in sorted(rng.sample(range(len(params)), 50), reverse=True):  # greedy rows sprinkled in
        params.insert(at, greedy)
        allowed.insert(at, None)
        prompts.insert(at, HISTORY["prompt"])
        outputs.insert(at, HISTORY["output"])
    logits = LOGITS8.expand(len(params), -1).contiguous()
    drawn = sample(logits, params, positions=[0] * len(params), prompt_ids=prompts, output_ids=outputs, allowed=allowed)
    tokens = drawn.token_ids
    is_greedy = torch.tensor([p.greedy for p in params])
    assert bool((tokens[is_greedy] == 0).all())
    sampled = tokens[~is_greedy]
    for j, kind in enumerate(kinds):
        base = KINDS.get(kind, SamplingParams(temperature=1.0, top_p=0.95))
        kw = HISTORY if base.has_penalties else {}
        target = ref.target_probs(LOGITS8, base, mask=mask if kind == "masked" else None, **kw)
        stat, crit = ref.chi_square(sampled[j :: len(kinds)], target)
        assert stat < crit, f"{kind}: chi-square {stat:.1f} >= {crit}"


@pytest.mark.parametrize("p", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)])
def test_large_vocabulary_draws_pass_a_ks_test(p: SamplingParams) -> None:
    """1,000 tokens, 3,000 draws: the empirical CDF over token ids stays within the KS bound of the target's
    (the full-vocabulary race and the sorted top-p path)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1000, generator=gen) * 2
    target = ref.target_probs(x, p).double()
    n = 3000
    params = [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(n)]
    drawn = sample(x.expand(n, -1).contiguous(), params, positions=[7] * n).token_ids
    ecdf = torch.bincount(drawn, minlength=1000).double().cumsum(0) / n
    d = float((ecdf - target.cumsum(0)).abs().max())
    assert d < 1.95 / math.sqrt(n), f"KS distance {d:.4f}"  # alpha 0.001
    assert float(target[drawn].min()) > 0, "drew a filtered-out token"


def test_uniforms_are_uniform_and_independent_across_keys() -> None:
    """The counter-based hash: 200,000 uniforms over adjacent seeds, positions and ids pass KS, and values of
    adjacent seeds are uncorrelated."""
    seeds = torch.arange(100).repeat_interleave(20)
    pos = torch.arange(20).repeat(100)
    u = uniforms(row_keys(seeds, pos), torch.arange(100)[None]).flatten().double()
    n = u.numel()
    s = torch.sort(u).values
    d = float(torch.maximum(torch.arange(1, n + 1) / n - s, s - torch.arange(n) / n).max())
    assert d < 1.95 / math.sqrt(n), f"KS distance {d:.5f}"
    a = uniforms(row_keys(torch.arange(5000), torch.zeros(5000, dtype=torch.long)), torch.zeros(1, 1, dtype=torch.long))
    b = uniforms(
        row_keys(torch.arange(1, 5001), torch.zeros(5000, dtype=torch.long)), torch.zeros(1, 1, dtype=torch.long)
    )
    corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])
    assert abs(corr) < 0.05, corr
    other_stream = uniforms(
        row_keys(torch.arange(5000), torch.zeros(5000, dtype=torch.long), stream=1), torch.zeros(1, 1, dtype=torch.long)
    )
    assert not torch.equal(a, other_stream)


# ---------------------------------------------------------------------------- reproducibility
def test_seeded_tokens_do_not_depend_on_the_batch() -> None:
    """A row draws the same token alone, inside a batch of other kinds (wider top_k, top_p-only, plain,
    penalties, masks), and with the batch shuffled; other seeds or positions draw other tokens."""
    gen = torch.Generator().manual_seed(5)
    v = 3000
    rows = torch.randn(12, v, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=11),
        SamplingParams(temperature=1.0, top_k=200, seed=12),
        SamplingParams(temperature=1.0, top_p=0.9, seed=13),
        SamplingParams(temperature=1.1, seed=14),
        SamplingParams(temperature=0.9, min_p=0.05, seed=15),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, seed=16),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=50, seed=17),
        SamplingParams(temperature=0.8, top_p=0.5, seed=18),
        SamplingParams(temperature=1.0, seed=19, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(temperature=1.0, top_k=3, seed=20),
    ]
    out_ids = [torch.randint(0, v, (30,), generator=gen) for _ in params]
    prompt_ids = [torch.randint(0, v, (10,), generator=gen) for _ in params]
    banned = [(int(rows[i].argmax()),) if i % 4 == 0 else () for i in range(12)]
    allowed = [torch.full((v // 32 + 1,), -1, dtype=torch.int32) if i == 2 else None for i in range(12)]
    positions = list(range(3, 15))

    def run(order: list[int]) -> list[int]:
        return sample(
            rows[order],
            [params[i] for i in order],
            positions=[positions[i] for i in order],
            prompt_ids=[prompt_ids[i] for i in order],
            output_ids=[out_ids[i] for i in order],
            banned=[banned[i] for i in order],
            allowed=[allowed[i] for i in order],
        ).token_ids.tolist()

    together = run(list(range(12)))
    alone = [run([i])[0] for i in range(12)]
    assert together == alone
    order = list(range(12))
    random.Random(3).shuffle(order)
    assert run(order) == [together[i] for i in order]
    assert run(list(range(12))) == together
    p = SamplingParams(temperature=1.0)
    x = rows[:1].expand(40, -1).contiguous()
    by_seed = sample(x, [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(40)], positions=[0] * 40)
    by_pos = sample(x, [p] * 40, positions=list(range(40)))
    assert len(set(by_seed.token_ids.tolist())) > 20 and len(set(by_pos.token_ids.tolist())) > 20


# ---------------------------------------------------------------------------- greedy, penalties, masks, logprobs
def test_greedy_rows_are_exactly_the_argmax_of_the_processed_logits() -> None:
    """Greedy rows (plain, banned, masked, penalised) in a batch with sampled rows: exactly the oracle's argmax."""
    gen = torch.Generator().manual_seed(6)
    v, b = 500, 24
    x = torch.randn(b, v, generator=gen) * 3
    params, banned, allowed, prompts, outputs = [], [], [], [], []
    for i in range(b):
        kind = i % 6
        params.append(
            SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.2)
            if kind == 3
            else SamplingParams(temperature=0.0)
            if kind < 4
            else SamplingParams(temperature=0.9, top_k=10, seed=i)
        )
        banned.append(tuple(torch.topk(x[i], 2).indices.tolist()) if kind == 1 else ())
        allowed.append(
            torch.randint(-(2**31), 2**31 - 1, (v // 32 + 1,), generator=gen, dtype=torch.int32) if kind == 2 else None
        )
        prompts.append(torch.randint(0, v, (20,), generator=gen))
        outputs.append(torch.randint(0, v, (15,), generator=gen))
    got = sample(x, params, prompt_ids=prompts, output_ids=outputs, banned=banned, allowed=allowed).token_ids
    for i, p in enumerate(params):
        if p.greedy:
            want = ref.processed(x[i], p, prompt=prompts[i], output=outputs[i], banned=banned[i], mask=allowed[i])
            assert int(got[i]) == int(want.argmax()), i
    plain = [
        i for i, p in enumerate(params) if p.greedy and not p.has_penalties and not banned[i] and allowed[i] is None
    ]
    assert torch.equal(got[plain], x[plain].argmax(-1))


def _padded(rows: list[torch.Tensor], v: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=v)


def test_batched_penalties_equal_the_per_row_oracle_and_transformers() -> None:
    gen = torch.Generator().manual_seed(3)
    v = 300
    settings = [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.25), (1.2, -0.3, 0.8), (1.0, 0.0, 0.0)]
    x = torch.randn(len(settings), v, generator=gen) * 4
    prompts = [torch.randint(0, v, (int(n),), generator=gen) for n in (40, 3, 0, 17, 8)]
    outputs = [torch.randint(0, v, (int(n),), generator=gen) for n in (25, 60, 9, 0, 4)]
    t = torch.tensor(settings)
    got = apply_penalties(
        x.clone(),
        repetition=t[:, 0],
        frequency=t[:, 1],
        presence=t[:, 2],
        prompt_RL=_padded(prompts, v),
        output_RL=_padded(outputs, v),
    )
    for i, (rp, fp, pp) in enumerate(settings):
        p = SamplingParams(repetition_penalty=rp, frequency_penalty=fp, presence_penalty=pp)
        torch.testing.assert_close(got[i], ref.penalties(x[i], p, prompts[i], outputs[i]), rtol=0, atol=0)
        if fp == pp == 0.0:
            hf = RepetitionPenaltyLogitsProcessor(rp)(torch.cat([prompts[i], outputs[i]])[None], x[i : i + 1].clone())[
                0
            ]
            torch.testing.assert_close(got[i], hf, rtol=0, atol=0)
    assert torch.equal(got[4], x[4]), "neutral settings leave the row bit-identical"


def test_penalties_known_answers() -> None:
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    got = apply_penalties(
        x,
        repetition=torch.tensor([2.0, 1.0]),
        frequency=torch.tensor([0.0, 0.5]),
        presence=torch.tensor([0.0, 0.25]),
        prompt_RL=torch.tensor([[0], [3]]),
        output_RL=torch.tensor([[1, 4, 4], [2, 2, 0]]),  # 4 = V: padding
    )
    assert got[0].tolist() == [1.0, -4.0, 1.0, 0.5]  # positive / 2, negative * 2, unseen unchanged
    assert got[1].tolist() == [2.0 - 0.5 - 0.25, -2.0, 1.0 - 1.0 - 0.25, 0.5]  # prompt tokens are not penalised


def test_history_penalties_equal_the_per_row_oracle() -> None:
    """The device-history layout (one row of fed ids per sequence, the first prompt_len of them the prompt,
    padded with V) penalises exactly as the oracle."""
    gen = torch.Generator().manual_seed(4)
    v = 300
    settings = [(1.3, 0.0, 0.0), (0.7, 0.4, 0.0), (1.0, 0.5, 0.25), (1.2, -0.3, 0.8)]
    x = torch.randn(len(settings), v, generator=gen) * 4
    prompts = [torch.randint(0, v, (int(n),), generator=gen) for n in (40, 3, 0, 17)]
    outputs = [torch.randint(0, v, (int(n),), generator=gen) for n in (25, 60, 9, 0)]
    t = torch.tensor(settings)
    got = apply_penalties_history(
        x.clone(),
        repetition=t[:, 0],
        frequency=t[:, 1],
        presence=t[:, 2],
        ids_RL=_padded([torch.cat([p, o]) for p, o in zip(prompts, outputs)], v),
        prompt_len=torch.tensor([len(p) for p in prompts]),
    )
    for i, (rp, fp, pp) in enumerate(settings):
        p = SamplingParams(repetition_penalty=rp, frequency_penalty=fp, presence_penalty=pp)
        torch.testing.assert_close(got[i], ref.penalties(x[i], p, prompts[i], outputs[i]), rtol=0, atol=0)


def test_device_history_decodes_as_host_histories_and_appends_the_chosen_tokens() -> None:
    """Several decode steps over a PenaltyHistory (rows and width grown past their first size, prefixes written in
    one flush, each chosen token appended by the sampler itself and never written again) give, step by step, the
    tokens of the host-history path fed the whole history every step (itself the oracle's: tests above); greedy
    penalised rows are the oracle's argmax; rows without a penalty hold no history."""
    gen = torch.Generator().manual_seed(5)
    v, b, steps = 400, 7, 6
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, repetition_penalty=1.3, frequency_penalty=0.4, seed=3),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5),
        SamplingParams(temperature=1.1, top_k=30, seed=9),
        SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.3),
    ]
    prompts = [torch.randint(0, v, (int(n),), generator=gen) for n in (9, 40, 5, 0, 23, 7, 12)]
    hist = PenaltyHistory(v, torch.device("cpu"), rows=2, width=8)  # grows in rows and width
    rows = [hist.take() if p.has_penalties else -1 for p in params]
    for r, prompt in zip(rows, prompts):
        if r >= 0:
            hist.stage(r, 0, tuple(prompt.tolist()))
    hist.flush()
    outputs: list[list[int]] = [[] for _ in range(b)]
    changed = 0
    for step in range(steps):
        # a peaked distribution that repeats: without the penalties the greedy rows would pick their history
        x = torch.randn(b, v, generator=gen)
        for i in range(b):
            x[i, prompts[i][:3]] += 3.0
            x[i, 7] += 3.0  # a token outside the prompts: the output penalties push it away once chosen
        lens = [len(prompts[i]) + len(outputs[i]) for i in range(b)]
        hist.reserve(max(lens) + 1)
        dev = DeviceHistory(hist.ids, rows=rows, lens=lens, prompt_lens=[len(p) for p in prompts])
        got = sample(x.clone(), params, history=dev, positions=[step] * b).token_ids
        want = sample(
            x.clone(),
            params,
            prompt_ids=prompts,
            output_ids=[torch.tensor(o, dtype=torch.long) for o in outputs],
            positions=[step] * b,
        ).token_ids
        assert torch.equal(got, want), step
        for i, p in enumerate(params):
            if p.greedy and p.has_penalties:
                out = torch.tensor(outputs[i], dtype=torch.long)
                assert int(got[i]) == int(ref.penalties(x[i], p, prompts[i], out).argmax()), (step, i)
                changed += int(got[i]) != int(x[i].argmax())
            outputs[i].append(int(got[i]))
    assert changed >= steps, "the penalties were meant to change greedy choices"
    for i, r in enumerate(rows):
        if r >= 0:
            n = len(prompts[i]) + steps
            assert hist.ids[r, :n].tolist() == prompts[i].tolist() + outputs[i]
            assert bool((hist.ids[r, n:] == v).all()), "past the fed ids: padding"
    assert hist.ids.shape[0] >= 5 and hist.width >= max(len(p) for p in prompts) + steps
    for r in rows:
        if r >= 0:
            hist.give(r)
    assert tuple(hist.ids.shape) == (2, 8), "an empty pool shrinks back to its first size"


def test_banned_and_allowed_masks() -> None:
    x = torch.tensor([[5.0, 4.0, 3.0, 2.0]] * 3)
    g = SamplingParams(temperature=0.0, logprobs=0)
    out = sample(x, [g, g, g], banned=[(0,), (), ()], allowed=[None, torch.tensor([0b1100], dtype=torch.int32), None])
    assert out.token_ids.tolist() == [1, 2, 0]
    # logprobs stay those of the raw model distribution
    torch.testing.assert_close(out.logprob, torch.log_softmax(x, -1)[[0, 1, 2], [1, 2, 0]])
    row = torch.zeros(40)
    mask = torch.tensor([1 << 3, 1 << 1], dtype=torch.int32)  # tokens 3 and 33
    assert torch.nonzero(torch.isfinite(apply_bitmask(row, mask))).flatten().tolist() == [3, 33]
    # sampled rows with short masks (the tokens past them disallowed) next to unmasked rows
    n = 64
    short = torch.tensor([0b1010], dtype=torch.int32)  # tokens 1 and 3 of 40
    xs = torch.zeros(n, 40)
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    got = sample(xs, params, allowed=[short if i % 2 else None for i in range(n)]).token_ids
    assert set(got[1::2].tolist()) == {1, 3} and len(set(got[0::2].tolist())) > 10


def test_logprobs_are_raw_log_softmax_for_the_rows_that_ask() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 50, generator=gen)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.7, top_k=5, seed=2, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=1, repetition_penalty=2.0),
        SamplingParams(temperature=1.0, top_p=0.9, seed=3, logprobs=2),
    ]
    out = sample(x, params, prompt_ids=[torch.tensor([1])] * 5, output_ids=[torch.tensor([2])] * 5)
    host = out.to_host()
    logp = torch.log_softmax(x, dim=-1)
    assert host.token_ids[0] == int(x[0].argmax())
    for i in (0, 2, 3, 4):
        assert abs(host.logprob[i] - float(logp[i, host.token_ids[i]])) < 1e-6  # type: ignore[index]
        n = params[i].logprobs or 0
        want = logp[i].topk(n)
        assert host.top_ids[i][:n] == want.indices.tolist()  # type: ignore[index]
        torch.testing.assert_close(torch.tensor(host.top_logprobs[i][:n]), want.values)  # type: ignore[index]


def test_min_p_threshold_is_relative_to_the_top_probability() -> None:
    x = torch.tensor([0.0, math.log(0.5), math.log(0.09), math.log(0.11)])
    ids, _ = candidates(x, params=SamplingParams(temperature=1.0, min_p=0.1))
    assert sorted(ids.tolist()) == [0, 1, 3]
    n = 300
    got = sample(x.expand(n, -1).contiguous(), [SamplingParams(min_p=0.1, seed=s) for s in range(n)]).token_ids
    assert set(got.tolist()) == {0, 1, 3}


def test_overflowing_logits_still_give_a_token() -> None:
    """An extreme temperature or penalty can overflow logits to +inf (or leave nothing finite): the draw
    picks among the +inf tokens (or the best-ranked one) instead of failing on an empty candidate set."""
    logits = torch.tensor([1.0, 3.0e38, 2.0, 3.0e38, -1.0])
    for p in (
        SamplingParams(temperature=1e-3),
        SamplingParams(temperature=1e-3, top_k=3),
        SamplingParams(temperature=1e-3, top_p=0.5),
    ):
        got = sample(
            logits.expand(16, -1).contiguous(), [SamplingParams(**{**p.__dict__, "seed": s}) for s in range(16)]
        )
        drawn = set(got.token_ids.tolist())
        assert drawn <= {1, 3} and (p.top_p < 1.0 or drawn == {1, 3}), p  # top_p 0.5 keeps one of the tie
    ids, vals = candidates(logits, params=SamplingParams(temperature=1e-3, seed=1))
    assert sorted(ids.tolist()) == [1, 3] and torch.equal(vals, torch.zeros(2))
    nan = torch.full((5,), float("nan"))
    for p in (SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0)):
        assert int(sample(nan[None], [p]).token_ids[0]) in range(5)
    masked_out = torch.full((1, 5), float("-inf"))
    assert int(sample(masked_out, [SamplingParams(temperature=1.0, top_p=0.9)]).token_ids[0]) in range(5)


# ---------------------------------------------------------------------------- on a device
def test_no_host_sync_on_a_fake_cuda_device() -> None:
    """Under FakeTensorMode with the logits on "cuda" (no GPU needed): every output stays on the device, and
    no op reads a device value on the host or copies device data to the host (`.item()`, `.tolist()`,
    `nonzero` raise on fake tensors; the dispatch mode below catches device-to-host copies). Only
    `SampleOutput.to_host` transfers. The pure-torch bitmask apply runs here (llguidance's compiled helper
    needs a real GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoDeviceToHost(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None:
                assert torch.device(kwargs["device"]).type != "cpu", f"device-to-host copy: {func}"
            if func in (torch.ops.aten.copy_.default,):
                assert args[0].device.type != "cpu" or args[1].device.type == "cpu", "device-to-host copy"
            assert func is not torch.ops.aten._local_scalar_dense.default, "host sync"
            return func(*args, **kwargs)

    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.95, seed=1, logprobs=3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=2),
        SamplingParams(temperature=1.0, min_p=0.1, seed=3, logprobs=0),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.1, seed=4),
    ]
    v = 1000
    kw = dict(
        prompt_ids=[torch.arange(5)] * 6,
        output_ids=[torch.arange(3)] * 6,
        positions=list(range(6)),
        banned=[(), (5,), (), (), (7, 8), ()],
        allowed=[None, None, torch.full((v // 32 + 1,), -1, dtype=torch.int32), None, None, None],
    )
    with FakeTensorMode(allow_non_fake_inputs=True), NoDeviceToHost():
        logits = torch.empty(8, v, device="cuda")
        out = sample(logits, params, rows=[0, 1, 2, 4, 5, 7], **kw)  # type: ignore[arg-type]
        outs = [out.token_ids, out.logprob, out.top_ids, out.top_logprobs]
        assert all(t is not None and t.device.type == "cuda" for t in outs)
        hist = PenaltyHistory(v, torch.device("cuda"))
        hrows = [hist.take() for _ in params]
        for r in hrows:
            hist.stage(r, 0, (1, 2, 3, 4, 5))
        hist.flush()
        dev = DeviceHistory(hist.ids, rows=hrows, lens=[5] * 6, prompt_lens=[3] * 6)
        kw.pop("prompt_ids"), kw.pop("output_ids")
        out = sample(logits, params, rows=[0, 1, 2, 4, 5, 7], history=dev, **kw)  # type: ignore[arg-type]
        assert out.token_ids.device.type == "cuda" and hist.ids.device.type == "cuda"


def test_cpu_shortlists_draw_what_the_full_race_draws() -> None:
    """The CPU-only width cuts (model_shards.sampling._cpu_prefix / _cpu_shortlist) drop only -inf entries, so
    the race (hashed by vocabulary id) picks the same token as over the whole row, as the device path does."""
    from model_shards.sampling import _cpu_prefix, _cpu_shortlist, race

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(64, 3000, generator=gen) * 3
    x = x.masked_fill(x < x.amax(dim=1, keepdim=True) - torch.rand(64, 1, generator=gen) * 8, float("-inf"))
    keys = row_keys(torch.arange(64) * 7919, torch.arange(64))
    full = race(x, keys, torch.arange(3000)[None])
    short, ids = _cpu_shortlist(x)
    assert short.shape[1] < 3000
    assert torch.equal(ids.gather(1, race(short, keys, ids)[:, None])[:, 0], full)
    vals, order = torch.sort(x, dim=1, descending=True)
    cut, cut_ids = _cpu_prefix(vals, order)
    assert cut.shape[1] < 3000
    assert torch.equal(cut_ids.gather(1, race(cut, keys, cut_ids)[:, None])[:, 0], full)


@pytest.mark.slow  # llguidance's helper is torch.compile'd: ~10 s to compile on a CPU
def test_llguidance_bitmask_helper_equals_ours() -> None:
    """The helper the sampler uses on a real GPU (llguidance.torch.apply_token_bitmask_inplace) against our
    pure-torch apply on CPU: a batch with unmasked rows (all bits set), random masks and a vocabulary that is
    not a multiple of 32."""
    from llguidance.torch import apply_token_bitmask_inplace

    gen = torch.Generator().manual_seed(10)
    v = 1000
    x = torch.randn(6, v, generator=gen)
    masks = torch.randint(-(2**31), 2**31 - 1, (6, (v + 31) // 32), generator=gen, dtype=torch.int32)
    masks[[1, 4]] = -1  # rows without a grammar
    ours = apply_bitmask(x.clone(), masks)
    theirs = x.clone()
    apply_token_bitmask_inplace(theirs, masks)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[[1, 4]], x[[1, 4]])
