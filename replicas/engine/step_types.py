"""The step interface between the engine and a group's trunk ranks (design.md).

Small typed, picklable messages: the engine says, per trunk rank, which sequences take part,
their new tokens and cache addresses and how to sample; the rank answers with token ids and
requested logprobs only (logits never leave the rank). Tests: tests/replicas/test_trunk_rank.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model_shards.batch import SeqChunk
from model_shards.sampling import SamplingParams


@dataclass(frozen=True)
class SeqStep:
    """One sequence in one step.

    Attributes:
        chunk: its new tokens and cache addresses.
        sample: whether to sample a token after this chunk (False for a non-final prefill chunk).
        params: how to sample.
        output_index: index in the output of the token about to be sampled (seeds the draw).
        prompt_ids, output_ids: token history, sent only when a penalty needs it.
        suppress_ids: tokens that may not be sampled this step (min_tokens keeps eos out).
        allowed_mask: int32 bitmask of the tokens a grammar allows now (structured output), or None.
        vision: the sequence's preprocessed images/videos, sent with its first chunk (the trunk rank
            encodes them once and keeps the embeddings with the sequence's state slot).
        drafts: speculative tokens at the end of `chunk.token_ids` to verify (chunk.verify is set).
        mtp: the sequence takes part in MTP drafting (its MTP cache is kept up to date).
        mtp_next: for a prefill chunk that does not sample, the token after it (the MTP's input).
    """

    chunk: SeqChunk
    sample: bool
    params: SamplingParams
    output_index: int = 0
    prompt_ids: tuple[int, ...] = ()
    output_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    allowed_mask: torch.Tensor | None = None
    vision: tuple[Any, ...] | None = None
    drafts: tuple[int, ...] = ()
    mtp: bool = False
    mtp_next: int | None = None


@dataclass(frozen=True)
class StepRequest:
    """What one trunk rank computes in one step (may be empty: the rank still joins the collectives).

    Attributes:
        mtp_steps: k > 0 when the group speculates: after the target forward every rank runs one MTP pass
            and k - 1 recursive draft steps (each an MoE call of the MTP layer, in lock-step).
    """

    seqs: tuple[SeqStep, ...] = ()
    mtp_steps: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the sampled token and the top alternatives (raw model distribution)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepResult:
    """Per sequence of the request, in order: the sampled token (None when not sampling) and logprobs.

    With speculation: `accepted[i]` are verified drafts emitted before `token_ids[i]` (with their
    logprobs in `accepted_logprobs[i]`, one entry per accepted token, None when not asked), and `drafts[i]`
    the new drafts to verify next step.
    """

    token_ids: tuple[int | None, ...] = ()
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    accepted: tuple[tuple[int, ...], ...] = ()
    accepted_logprobs: tuple[tuple[TokenLogprobs | None, ...], ...] = ()
    drafts: tuple[tuple[int, ...], ...] = ()
    errors: tuple[str | None, ...] = ()  # per sequence: refused before the step's first collective (why), or None
