"""Speculative decoding with the MTP head: drafting from MTP logits and verifying drafts exactly.

Owns: drafting (greedy argmax, or a seeded draw from the draft distribution q, kept for the
verification), and verification of k drafts against the target's k + 1 logit rows: greedy
accepts while the target's argmax equals the draft (identical tokens to decoding without
speculation); sampled uses the standard rejection rule (accept d with probability
min(1, p(d) / q(d)), else draw from normalise(max(0, p - q)); all accepted: draw the bonus
token from p), which keeps the target distribution. p and q are the same filtered distributions
(temperature, top-k, top-p, min-p) the sampler uses; draws are seeded by (request seed, output
position, purpose), so results do not depend on batching. Tests: tests/replicas/test_speculative.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.sampling import SamplingParams, candidates, race, row_keys, uniforms

# A one-layer MTP head chained beyond a few steps is rarely right; the bound also caps the per-token
# DeltaNet states each slot keeps.
MAX_SPECULATIVE_TOKENS = 8

# distinct random streams per output position (the plain sampler uses stream 0)
DRAFT_STREAM = 1_000_003
ACCEPT_STREAM = 2_000_003
RESIDUAL_STREAM = 3_000_017


@dataclass(frozen=True)
class Distribution:
    """A filtered next-token distribution: candidate ids and their probabilities (summing to 1)."""

    ids: torch.Tensor
    probs: torch.Tensor

    @staticmethod
    def of(logits_V: torch.Tensor, params: SamplingParams) -> Distribution:
        ids, vals = candidates(logits_V.float(), params=params)
        return Distribution(ids, torch.softmax(vals, dim=-1))

    def prob(self, token: int) -> float:
        hit = (self.ids == token).nonzero()
        return float(self.probs[hit[0, 0]]) if hit.numel() else 0.0

    def dense(self, vocab: int) -> torch.Tensor:
        out = torch.zeros(vocab)
        out[self.ids] = self.probs.float()
        return out


def _keys(seed: int, position: int, stream: int) -> torch.Tensor:
    """The counter-based random keys of one (seed, position, stream): model_shards.sampling's hash, so the
    draws are reproducible without a random generator."""
    return row_keys(torch.tensor([seed % 2**63]), torch.tensor([position]), stream)


def _draw(probs: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> int:
    """Exponential-race draw of one of `ids` with probabilities `probs` (zeros are never drawn)."""
    return int(ids[race(probs.log()[None], keys, ids[None])[0]])


def draft(logits_V: torch.Tensor, params: SamplingParams, *, position: int) -> tuple[int, Distribution | None]:
    """A draft token from the MTP logits; for sampled requests also q (needed to verify it)."""
    if params.greedy:
        return int(logits_V.argmax()), None
    q = Distribution.of(logits_V, params)
    return _draw(q.probs, q.ids, _keys(params.seed, position, DRAFT_STREAM)), q


def verify(
    logits_JV: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    *,
    position: int,
    q: list[Distribution | None],
) -> tuple[int, int]:
    """Check k drafts against the target's logits at the k + 1 verified positions.

    Args:
        logits_JV: [k + 1, V] target logits; row j predicts output position `position + j`.
        drafts: the k drafted tokens (draft j proposed for position `position + j`).
        q: the draft distributions (sampled requests) or Nones (greedy).
    Returns:
        (number of accepted drafts a, the token the target adds at position `position + a`).
    """
    if params.greedy:
        target = logits_JV.argmax(dim=-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == target[a]:
            a += 1
        return a, target[a]
    vocab = logits_JV.shape[-1]
    for j, d in enumerate(drafts):
        p = Distribution.of(logits_JV[j], params)
        qj = q[j]
        assert qj is not None, "a sampled draft needs its draft distribution"
        ratio = p.prob(d) / max(qj.prob(d), 1e-30)
        r = float(uniforms(_keys(params.seed, position + j, ACCEPT_STREAM), torch.zeros(1, 1, dtype=torch.long)))
        if r < min(1.0, ratio):
            continue
        residual = (p.dense(vocab) - qj.dense(vocab)).clamp_(min=0)
        total = float(residual.sum())
        if total <= 0:  # p == q up to rounding: any draw from p is exact
            residual = p.dense(vocab)
        return j, _draw(residual, torch.arange(vocab), _keys(params.seed, position + j, RESIDUAL_STREAM))
    p = Distribution.of(logits_JV[len(drafts)], params)
    bonus = _draw(p.probs, p.ids, _keys(params.seed, position + len(drafts), RESIDUAL_STREAM))
    return len(drafts), bonus
