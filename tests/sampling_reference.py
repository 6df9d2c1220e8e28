"""The per-row sampling oracle the batched sampler (model_shards/sampling.py) is checked against.

One row at a time, whole-vocabulary masks, written for reading: min_tokens bans and grammar masks, then
penalties (vLLM/HF semantics: the repetition penalty divides positive and multiplies negative logits of every
token seen in the prompt or output; frequency subtracts penalty x count and presence subtracts the penalty
once, over output tokens only), then temperature, min_p (probability relative to the top), top_k, top_p
(smallest prefix of the renormalised rest reaching top_p). `target_probs` is the distribution a sampled row
must follow; greedy rows take the argmax of the processed logits.
"""

from __future__ import annotations

import math

import torch

from model_shards.sampling import SamplingParams


def penalties(
    logits_V: torch.Tensor, params: SamplingParams, prompt: torch.Tensor, output: torch.Tensor
) -> torch.Tensor:
    out = logits_V.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(out.shape[-1], dtype=torch.bool)
        seen[prompt] = True
        seen[output] = True
        p = params.repetition_penalty
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        counts = torch.bincount(output, minlength=out.shape[-1]).to(out.dtype)
        out = out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def constrained(logits_V: torch.Tensor, banned: tuple[int, ...] = (), mask: torch.Tensor | None = None) -> torch.Tensor:
    """Banned tokens and the tokens a grammar bitmask (int32 words, bit j of word w = token 32w + j; tokens past
    the mask disallowed) leaves out set to -inf, read bit by bit."""
    out = logits_V.clone()
    for t in banned:
        out[t] = float("-inf")
    if mask is not None:
        words = mask.tolist()
        for t in range(out.shape[-1]):
            w, b = divmod(t, 32)
            if w >= len(words) or not (words[w] >> b) & 1:
                out[t] = float("-inf")
    return out


def filtered(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p as -inf masks over the whole vocabulary."""
    x = logits_V / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def processed(
    logits_V: torch.Tensor,
    params: SamplingParams,
    *,
    prompt: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
    banned: tuple[int, ...] = (),
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits after bans, the grammar mask and penalties (what greedy takes the argmax of)."""
    empty = torch.empty(0, dtype=torch.long)
    x = constrained(logits_V, banned, mask)
    return penalties(x, params, prompt if prompt is not None else empty, output if output is not None else empty)


def target_probs(logits_V: torch.Tensor, params: SamplingParams, **kw: object) -> torch.Tensor:
    """The distribution of a row's next token."""
    x = processed(logits_V, params, **kw)  # type: ignore[arg-type]  # processed's keyword arguments
    if params.greedy:
        return torch.nn.functional.one_hot(x.argmax(), x.shape[-1]).float()
    return torch.softmax(filtered(x, params), dim=-1)


# chi-square critical values at p = 0.001 by degrees of freedom
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}


def chi_square(tokens: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value at p = 0.001) of drawn tokens against a target distribution, after checking no
    token outside the target's support was drawn."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=target.numel()).double()
    kept = target > 0
    assert float(counts[~kept].sum()) == 0.0, f"drew tokens outside the support: {torch.nonzero(counts * ~kept)}"
    expected = target.double()[kept] * n
    stat = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    crit = _CHI2_999.get(dof) or dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # Wilson-Hilferty
    return stat, crit
