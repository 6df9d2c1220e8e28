"""Token sampling from fp32 logits, per sequence parameters, reproducible by seed.

Order (vLLM's): repetition / frequency / presence penalties -> greedy if temperature == 0,
else temperature -> min_p -> top_k -> top_p -> draw. Returned logprobs are those of the raw
model distribution (log_softmax of the logits before any processing), as vLLM returns by
default. A seeded draw depends only on (seed, position of the token in the output), so
results do not change with batch composition, preemption or which rank samples.
Tests: tests/model_shards/test_sampling.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings (already resolved against generation_config defaults).

    Attributes:
        temperature: 0 means greedy.
        top_k: 0 or -1 disables. top_p: 1 disables. min_p: 0 disables.
        seed: per-request seed; the engine assigns one when the client gives none.
        logprobs: None for no logprobs; n >= 0 for the chosen token's plus n top alternatives.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class SampleOutput:
    """token_ids [B]; logprob [B] of the chosen tokens; top_ids / top_logprobs [B, n] (n = max asked)."""

    token_ids: torch.Tensor
    logprob: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


def _step_seed(seed: int, index: int) -> int:
    # splitmix64-style mix: distinct, well-spread seeds per (request seed, output position).
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def apply_penalties(
    logits_V: torch.Tensor, *, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (divide positive logits, multiply negative),
    frequency (x count) and presence (once) penalties over output tokens only (OpenAI/vLLM)."""
    vocab = logits_V.shape[-1]
    out = logits_V.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=out.device)
        seen[prompt_ids] = True
        seen[output_ids] = True
        penalised = torch.where(out > 0, out / params.repetition_penalty, out * params.repetition_penalty)
        out = torch.where(seen, penalised, out)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = torch.bincount(output_ids, minlength=vocab)[:vocab].to(out.dtype)
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def candidates(logits_V: torch.Tensor, *, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a non-greedy draw may pick and their tempered logits (descending), without a full sort
    when top_k is set (the common case: the checkpoint's defaults have top_k 20).

    Same support as `filter_logits`: min_p keeps x_i >= x_max + log(min_p) (softmax-free: the ratio to
    the top probability), top_k the k largest, top_p the smallest prefix of the renormalised rest
    reaching top_p.

    Returns:
        ids [C] int64, logits [C] float.
    """
    x = logits_V / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        vals, ids = torch.topk(x, params.top_k)
    elif params.min_p > 0.0:  # sort only what min_p keeps
        ids = torch.nonzero(x >= x.max() + math.log(params.min_p)).flatten()
        vals, order = torch.sort(x[ids], descending=True)
        ids = ids[order]
    else:
        vals, ids = torch.sort(x, descending=True)
    if bool(torch.isposinf(vals).any()):  # overflow (an extreme temperature or penalty): the +inf tokens tie
        top = torch.isposinf(vals)
        return ids[top], torch.zeros(int(top.sum()), dtype=vals.dtype, device=vals.device)
    keep = torch.isfinite(vals)
    if not bool(keep.any()):  # nothing finite (NaN or fully masked): the best-ranked token, never an empty draw
        return ids[:1], torch.zeros(1, dtype=vals.dtype, device=vals.device)
    if params.min_p > 0.0:
        keep &= vals >= vals[0] + math.log(params.min_p)
    vals, ids = vals[keep], ids[keep]
    if params.top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        n = int(((probs.cumsum(dim=-1) - probs) < params.top_p).sum())  # smallest prefix reaching top_p
        vals, ids = vals[: max(n, 1)], ids[: max(n, 1)]
    return ids, vals


def filter_logits(logits_V: torch.Tensor, *, params: SamplingParams) -> torch.Tensor:
    """Readable reference of `candidates`: temperature, min_p, top_k and top_p as -inf masks over the
    whole vocabulary (masked entries become -inf)."""
    x = logits_V / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_x, dim=-1) >= params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample(
    logits_BV: torch.Tensor,
    params: list[SamplingParams],
    *,
    prompt_ids: list[torch.Tensor] | None = None,
    output_ids: list[torch.Tensor] | None = None,
    positions: list[int] | None = None,
    banned: list[tuple[int, ...]] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
) -> SampleOutput:
    """Choose one token per row.

    Args:
        logits_BV: [B, V] fp32 logits.
        params: one `SamplingParams` per row.
        prompt_ids, output_ids: per-row int64 token tensors (only read when a penalty is set).
        positions: per-row index of the token being sampled in its output (seeds the draw).
        banned: per-row token ids that may not be drawn (min_tokens); logprobs stay those of
            the raw logits.
        allowed: per-row int32 bitmask of the tokens a grammar allows (structured output), or None.
    """
    b = logits_BV.shape[0]
    if len(params) != b:
        raise ValueError(f"{len(params)} sampling params for {b} rows")
    tokens = torch.empty(b, dtype=torch.long, device=logits_BV.device)

    def simple(i: int) -> bool:
        return (
            params[i].greedy
            and not params[i].has_penalties
            and not (banned and banned[i])
            and not (allowed and allowed[i] is not None)
        )

    greedy_rows = [i for i in range(b) if simple(i)]
    if greedy_rows:
        idx = torch.tensor(greedy_rows, device=logits_BV.device)
        tokens[idx] = logits_BV[idx].argmax(dim=-1)
    for i, p in enumerate(params):
        if simple(i):
            continue
        row = logits_BV[i]
        mask = allowed[i] if allowed else None
        if (banned and banned[i]) or mask is not None:
            row = row.clone()
            if banned and banned[i]:
                row[list(banned[i])] = float("-inf")
            if mask is not None:
                apply_bitmask(row, mask)
        if p.has_penalties:
            empty = torch.empty(0, dtype=torch.long, device=row.device)
            row = apply_penalties(
                row,
                params=p,
                prompt_ids=prompt_ids[i] if prompt_ids is not None else empty,
                output_ids=output_ids[i] if output_ids is not None else empty,
            )
        if p.greedy:
            tokens[i] = row.argmax()
            continue
        ids, x = candidates(row, params=p)
        gen = torch.Generator(device=row.device).manual_seed(_step_seed(p.seed, positions[i] if positions else 0))
        # Gumbel-max: argmax(x + G) is a draw from softmax(x); one uniform per candidate.
        u = torch.rand(x.shape, generator=gen, device=row.device, dtype=torch.float32).clamp_(1e-20, 1.0)
        tokens[i] = ids[(x - torch.log(-torch.log(u))).argmax()]
    return _with_logprobs(logits_BV, tokens, params)


def _with_logprobs(logits_BV: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> SampleOutput:
    want = [p.logprobs for p in params if p.logprobs is not None]
    if not want:
        return SampleOutput(tokens, None, None, None)
    logp = torch.log_softmax(logits_BV, dim=-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    n = max(want)
    if n == 0:
        return SampleOutput(tokens, chosen, None, None)
    top = torch.topk(logp, n, dim=-1)
    return SampleOutput(tokens, chosen, top.indices, top.values)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place (pure torch, any device).

    Args:
        logits: float [V] or [B, V].
        bitmask: int32 [W] or [B, W] (the `GrammarMatcher.bitmask` layout); tokens at or past 32 * W are disallowed.

    Returns:
        `logits`.
    """
    if bitmask.dtype != torch.int32 or bitmask.dim() != logits.dim() or bitmask.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"bitmask must be int32 with the logits' leading shape, got {bitmask.dtype} "
            f"{tuple(bitmask.shape)} for logits {tuple(logits.shape)}"
        )
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()  # [..., 32 * W]
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
    return logits.masked_fill_(~allowed[..., :vocab], float("-inf"))
