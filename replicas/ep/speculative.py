"""Speculative decoding with the MTP head: drafting from MTP logits and verifying drafts exactly, batched.

Owns: drafting (greedy argmax, or a seeded draw from the draft distribution q, kept for the
verification), and verification of k drafts against the target's k + 1 logit rows: greedy
accepts while the target's argmax equals the draft (identical tokens to decoding without
speculation); sampled uses the standard rejection rule (accept d with probability
min(1, p(d) / q(d)), else draw from normalise(max(0, p - q)); all accepted: draw the bonus
token from p), which keeps the target distribution. p and q are the same filtered distributions
(temperature, top-k, top-p, min-p) the sampler uses, held dense ([rows, V], zero outside the
candidates); draws are seeded by (request seed, output position, purpose) through the sampler's
counter-based hash, so results do not depend on batching.

Batched: `draft_rows` and `verify_rows` take every speculating sequence of a step at once and run a
fixed number of tensor ops on the logits' device (one group for greedy rows, one for sampled rows),
never a loop over sequences; they return device tensors and never read one back (the rank moves the
results to the host once, at its named transfer point). Sequences with fewer drafts than the step's
widest are padded (a padded draft never matches), so their accepted counts differ freely.
`draft` / `verify` are the one-sequence forms (the rule's statistical tests call them).
Tests: tests/replicas/test_speculative.py, tests/replicas/test_spec_batched.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.sampling import (
    SamplingParams,
    candidates,
    filter_sorted,  # the sampler's own filters: p and q must be exactly its distributions
    finite_support,
    min_p_filter,
    race,
    row_keys,
    uniforms,
    upload_list,
)

# A one-layer MTP head chained beyond a few steps is rarely right; the bound also caps the per-token
# DeltaNet states each slot keeps.
MAX_SPECULATIVE_TOKENS = 8

# distinct random streams per output position (the plain sampler uses stream 0)
DRAFT_STREAM = 1_000_003
ACCEPT_STREAM = 2_000_003
RESIDUAL_STREAM = 3_000_017

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Distribution:
    """A filtered next-token distribution: candidate ids and their probabilities (summing to 1)."""

    ids: torch.Tensor
    probs: torch.Tensor

    @staticmethod
    def of(logits_V: torch.Tensor, params: SamplingParams) -> Distribution:
        ids, vals = candidates(logits_V.float(), params=params)
        return Distribution(ids, torch.softmax(vals, dim=-1))


@dataclass(frozen=True)
class RowParams:
    """Sampling parameters of R rows as device tensors (uploaded once: one transfer per dtype).

    Attributes:
        seeds, positions: int64 [R] (the counter-based hash's inputs; positions are output indices).
        temp, top_p, min_p: float32 [R]; top_k: int64 [R] (V where off).
        sort: some row needs its candidates sorted (top-k or top-p); k_max: the widest top-k (V: a full sort).
    """

    seeds: torch.Tensor
    positions: torch.Tensor
    temp: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    top_k: torch.Tensor
    sort: bool
    k_max: int

    @staticmethod
    def of(params: list[SamplingParams], positions: list[int], *, vocab: int, device: torch.device) -> RowParams:
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        ints = upload_list([p.seed % 2**63 for p in params] + list(positions) + top_k, torch.long, device)
        seeds, pos, k = ints.split(len(params))
        f = upload_list([[p.temperature or 1.0, p.top_p, p.min_p] for p in params], torch.float32, device).reshape(
            -1, 3
        )
        temp, top_p, min_p = f.unbind(1)
        sort = any(k < vocab or p.top_p < 1.0 for k, p in zip(top_k, params))
        return RowParams(seeds, pos, temp, top_p, min_p, k, sort, max(top_k, default=vocab))

    def repeat(self, n: int, *, offsets: torch.Tensor) -> RowParams:
        """Each row's parameters n times (rows r * n + j), positions advanced by `offsets` [n]."""
        rep = lambda t: t.repeat_interleave(n, dim=0, output_size=t.shape[0] * n)  # noqa: E731
        pos = (self.positions.unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1)
        t, p, m, k = (rep(x) for x in (self.temp, self.top_p, self.min_p, self.top_k))
        return RowParams(rep(self.seeds), pos, t, p, m, k, self.sort, self.k_max)


def filtered_logits(logits_RV: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Tempered logits after min-p, top-k and top-p, dense [R, V] (-inf outside each row's candidates): the
    sampler's `candidates` for every row at once (softmax of a row is its distribution)."""
    x = logits_RV.float()
    vocab = x.shape[-1]
    if not rp.sort:  # no top-k / top-p anywhere: no sort
        return min_p_filter(finite_support(x / rp.temp.unsqueeze(1)), rp.min_p)
    vals, ids = torch.topk(x, rp.k_max, dim=-1) if rp.k_max < vocab else torch.sort(x, dim=-1, descending=True)
    kept = filter_sorted(vals, rp.temp, rp.min_p, rp.top_k, rp.top_p)
    return torch.full_like(x, _NEG_INF).scatter_(1, ids, kept)


def _vocab_ids(vocab: int, device: torch.device) -> torch.Tensor:
    return torch.arange(vocab, device=device).unsqueeze(0)


def draft_rows(
    logits_RV: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft token per row, batched on the logits' device (no host read).

    Args:
        logits_RV: [R, V] MTP logits. params: one per row. positions: the output index each draft proposes.
    Returns:
        tokens int64 [R]; q float32 [S, V], the draft distributions of the sampled rows (in row order; None
        when every row is greedy).
    """
    tokens = logits_RV.argmax(dim=-1)  # greedy rows' drafts (sampled rows overwritten below)
    sampled = [j for j, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens, None
    dev, vocab = logits_RV.device, logits_RV.shape[-1]
    rows = (
        logits_RV if len(sampled) == len(params) else logits_RV.index_select(0, upload_list(sampled, torch.long, dev))
    )
    rp = RowParams.of([params[j] for j in sampled], [positions[j] for j in sampled], vocab=vocab, device=dev)
    x = filtered_logits(rows, rp)
    chosen = race(x, row_keys(rp.seeds, rp.positions, DRAFT_STREAM), _vocab_ids(vocab, dev))
    if len(sampled) == len(params):
        tokens = chosen
    else:
        tokens.index_copy_(0, upload_list(sampled, torch.long, dev), chosen)
    return tokens, torch.softmax(x, dim=-1)


@dataclass(frozen=True)
class Verified:
    """Device results of `verify_rows` for S sequences: accepted int64 [S] (drafts kept), token int64 [S]
    (the target's token at position + accepted), emitted int64 [S, n + 1] (the drafts, then the token at
    column accepted; columns past it are meaningless)."""

    accepted: torch.Tensor
    token: torch.Tensor
    emitted: torch.Tensor


def verify_rows(
    logits_TV: torch.Tensor,
    rows_SJ: torch.Tensor,
    drafts_SN: torch.Tensor,
    counts: list[int],
    params: list[SamplingParams],
    positions: list[int],
    q_SNV: torch.Tensor | None,
) -> Verified:
    """Check every sequence's drafts against the target's logits at once.

    Args:
        logits_TV: the step's target logits. rows_SJ: int64 [S, n + 1] row of logits_TV that predicts output
            position `positions[s] + j` (rows past a sequence's count + 1 repeat a valid row).
        drafts_SN: int64 [S, n], draft j proposed for position `positions[s] + j` (padding: -1).
        counts: each sequence's draft count (<= n). params / positions: per sequence.
        q_SNV: the draft distributions of the sampled sequences, in their order ([S_sampled, n, V], zero past a
            sequence's count), or None when all are greedy.
    """
    s, n = drafts_SN.shape
    dev, vocab = logits_TV.device, logits_TV.shape[-1]
    logits = logits_TV.index_select(0, rows_SJ.reshape(-1)).view(s, n + 1, vocab)
    target = logits.argmax(dim=-1)  # [S, n + 1]
    col = torch.arange(n + 1, device=dev)
    accepted = (drafts_SN == target[:, :n]).long().cumprod(dim=1).sum(dim=1)
    token = target.gather(1, accepted.unsqueeze(1)).squeeze(1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        if q_SNV is None or q_SNV.shape[0] != len(sampled):
            raise ValueError("sampled drafts need their draft distributions")
        idx = upload_list(sampled, torch.long, dev)
        a, t = _reject(
            logits.index_select(0, idx),
            drafts_SN.index_select(0, idx),
            [counts[i] for i in sampled],
            [params[i] for i in sampled],
            [positions[i] for i in sampled],
            q_SNV,
        )
        accepted = accepted.index_copy(0, idx, a)
        token = token.index_copy(0, idx, t)
    emitted = torch.where(col < accepted.unsqueeze(1), torch.cat([drafts_SN, drafts_SN[:, :1]], dim=1), token[:, None])
    return Verified(accepted, token, emitted)


def _reject(
    logits_SJV: torch.Tensor,
    drafts_SN: torch.Tensor,
    counts: list[int],
    params: list[SamplingParams],
    positions: list[int],
    q_SNV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule for sampled sequences: (accepted [S], token [S]), on the device."""
    s, j1, vocab = logits_SJV.shape
    n, dev = j1 - 1, logits_SJV.device
    rp = RowParams.of(params, positions, vocab=vocab, device=dev)
    offsets = torch.arange(j1, device=dev)
    p = torch.softmax(filtered_logits(logits_SJV.reshape(-1, vocab), rp.repeat(j1, offsets=offsets)), dim=-1)
    p = p.view(s, j1, vocab)
    q = q_SNV[:, :n].float()
    valid = offsets[:n].unsqueeze(0) < upload_list(counts, torch.long, dev).unsqueeze(1)  # [S, n]
    d = drafts_SN.clamp(min=0).unsqueeze(2)
    ratio = p[:, :n].gather(2, d).squeeze(2) / q.gather(2, d).squeeze(2).clamp(min=1e-30)
    per_draft = rp.repeat(n, offsets=offsets[:n])
    keys = row_keys(per_draft.seeds, per_draft.positions, ACCEPT_STREAM)
    r = uniforms(keys, torch.zeros(1, 1, dtype=torch.long, device=dev)).view(s, n)
    accepted = ((r < ratio.clamp(max=1.0)) & valid).long().cumprod(dim=1).sum(dim=1)
    # residual max(0, p - q) at the first rejected position; past the drafts q is zero, so the bonus row is p
    q_pad = torch.cat([q * valid.unsqueeze(2), q.new_zeros(s, 1, vocab)], dim=1)
    at = accepted.view(s, 1, 1).expand(s, 1, vocab)
    p_a = p.gather(1, at).squeeze(1)
    residual = (p_a - q_pad.gather(1, at).squeeze(1)).clamp_(min=0)
    # p == q up to rounding leaves no residual mass: any draw from p is then exact
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_a)
    keys = row_keys(rp.seeds, rp.positions + accepted, RESIDUAL_STREAM)
    token = race(residual.log(), keys, _vocab_ids(vocab, dev))
    return accepted, token


# ---------------------------------------------------------------------------- one sequence (the rule's tests)
def draft(logits_V: torch.Tensor, params: SamplingParams, *, position: int) -> tuple[int, torch.Tensor | None]:
    """A draft token from one row of MTP logits; for sampled requests also q (dense [V], needed to verify it)."""
    tokens, q = draft_rows(logits_V.unsqueeze(0), [params], [position])
    return int(tokens[0]), (q[0] if q is not None else None)


def verify(
    logits_JV: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    *,
    position: int,
    q: list[torch.Tensor | None],
) -> tuple[int, int]:
    """Check one sequence's k drafts against the target's logits at the k + 1 verified positions.

    Args:
        logits_JV: [k + 1, V] target logits; row j predicts output position `position + j`.
        drafts: the k drafted tokens (draft j proposed for position `position + j`).
        q: the dense draft distributions (sampled requests) or Nones (greedy).
    Returns:
        (number of accepted drafts a, the token the target adds at position `position + a`).
    """
    k, dev = len(drafts), logits_JV.device
    q_NV = torch.stack([x for x in q if x is not None]).unsqueeze(0) if not params.greedy else None
    out = verify_rows(
        logits_JV,
        torch.arange(k + 1, device=dev).unsqueeze(0),
        torch.tensor([drafts], dtype=torch.long, device=dev),
        [k],
        [params],
        [position],
        q_NV,
    )
    return int(out.accepted[0]), int(out.token[0])
