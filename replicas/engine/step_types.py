"""The step message between the engine and a group's trunk ranks: one `StepRequest` per trunk rank per step.

Incremental, so a step costs the engine O(new tokens), never O(context): a trunk rank keeps the state of
each sequence placed on it, keyed by sequence id, and each step says only what changed.

    StepRequest                      the header, one per trunk rank per step
      released: (seq_id, ...)        sequences the rank forgets before reading `seqs` (finished, aborted,
                                     refused, preempted); unknown ids are ignored
      seqs: (SeqStep, ...)           the sequences taking part in this step
      decodes: (seq_id, ...),        plain decodes in columns (before `seqs` in the result): each continues
      decode_context: (n, ...)       at context n with the token the rank sampled for it in its last step,
                                     its block table unchanged (the rank refuses one it does not hold at n)
      mtp_steps: k                   the group speculates: k MTP draft steps after the target forward
      canary                         readiness: one token through the whole model on the rank's reserved
                                     block and slot (no sequences; not counted in the expert load)
    SeqStep                          one sequence's part of one step
      seq_id, context_len            which sequence; tokens already in its caches (a check: the rank refuses
                                     a sequence whose context it does not hold)
      token_ids                      the new tokens: a prefill chunk or the last sampled token (drafts apart)
      new_blocks                     KV block ids appended to its block table
      sample, output_index           sample a token after the chunk; index in the output of that token
      drafts                         speculative tokens to verify after token_ids
      suppress_ids, allowed_mask,    per-step sampling constraints: min_tokens, a grammar's bitmask, a token
      forced_token                   the thinking budget forces
      mtp_next                       a non-sampling prefill chunk's next token (the MTP head's input)
      start: SeqStart | None         set on the sequence's first step on this rank (fresh, or again after a
                                     preemption: its caches are recomputed from context 0)
    SeqStart                         what stays fixed for the sequence's stay on the rank
      slot, params, prompt_len,      state slot; sampling; where the prompt ends in the token stream
      rope_delta, mm_positions,      MRoPE offset after images; [3, prompt_len] positions of the prompt
      vision_rows, vision            prompt indices that take vision embeddings; the preprocessed images
      mtp                            the sequence drafts with the MTP head
      restore                        a prefix-cache hit: state checkpoint copied into `slot` before the first
                                     chunk, whose context_len (the cached length, on the 64-token grid) of KV
                                     is in the first blocks of `new_blocks` (shared, never written)
      prefix_ids                     with `restore`, when the sequence has a repetition penalty (which reads the
                                     whole prompt): the cached prompt's token ids, for the rank's penalty history
    SeqStep.save_state               after the chunk, copy the sequence's DeltaNet state into this state
                                     checkpoint (the chunk ends on the 64-token grid; the prefix cache keeps it)

The rank derives the rest: the block table (every `new_blocks` in order), the penalty history (prompt and
output ids are exactly the tokens it was fed, plus the drafts it accepted), MRoPE positions and vision rows of
each chunk. A rank that restarted (a group failure fails every running request, so a rebuilt group starts
empty) refuses a `SeqStep` without `start` for a sequence it does not know: that sequence ends alone, with an
error in `StepResult.errors`, and the group keeps serving.

The header is the one place later work extends (a device path, ping-pong micro-batches, the expert-map version
a load balancer publishes): add fields to `StepRequest`, not a second message.
The rank answers with token ids and requested logprobs only (logits never leave the rank).
Tests: tests/replicas/test_step_protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from model_shards.sampling import SamplingParams


@dataclass(frozen=True)
class SeqStart:
    """A sequence's fixed state on a trunk rank, sent with its first step there.

    Attributes:
        slot: its DeltaNet state slot on the rank.
        params: how to sample.
        prompt_len: the first prompt_len tokens it is fed are the prompt (penalties tell prompt from output).
        rope_delta: offset of text positions after images (model_spec §4.3); 0 for text.
        mm_positions: [3, prompt_len] MRoPE positions of the prompt (images and videos), or None for text.
        vision_rows: prompt indices, ascending, whose embeddings come from the vision tower.
        vision: the preprocessed images / videos (the rank encodes them once, with the first chunk).
        mtp: the sequence takes part in MTP drafting (its MTP cache is kept up to date).
        restore: a prefix-cache hit: the state checkpoint (an index into the rank's checkpoint pool) copied into
            `slot` before the first chunk; that chunk's context_len is the cached length (a multiple of 64) and
            the blocks holding it come first in its `new_blocks`, shared with the cache (read-only). None: fresh.
        prefix_ids: with `restore`, the cached prompt's token ids (context_len of them) when the sequence's
            repetition penalty reads its whole prompt; () otherwise (the rank pads its history there).
    """

    slot: int
    params: SamplingParams
    prompt_len: int
    rope_delta: int = 0
    mm_positions: torch.Tensor | None = None
    vision_rows: tuple[int, ...] = ()
    vision: tuple[Any, ...] | None = None
    mtp: bool = False
    restore: int | None = None
    prefix_ids: tuple[int, ...] = ()


class SeqStep(NamedTuple):
    """One sequence in one step (a NamedTuple: cheap to build and to pickle, hundreds per step).

    Attributes:
        seq_id: the sequence (unique per engine).
        context_len: tokens of it already in the rank's caches before this step.
        token_ids: its new tokens (not the drafts).
        new_blocks: KV blocks appended to its block table (the first step brings the whole table so far).
        sample: whether to sample a token after this chunk (False for a non-final prefill chunk).
        output_index: index in the output of the token about to be sampled (seeds the draw).
        start: set on its first step on this rank (see `SeqStart`), else None.
        drafts: speculative tokens to verify after `token_ids` (a decode of one token).
        suppress_ids: tokens that may not be sampled this step (min_tokens keeps eos out).
        allowed_mask: int32 bitmask of the tokens a grammar allows now (structured output), or None.
        forced_token: the token this sample must be (a spent thinking budget forces `</think>`), or None.
        mtp_next: for a prefill chunk that does not sample, the token after it (the MTP's input).
        save_state: after this chunk (which ends on the 64-token grid), copy the sequence's DeltaNet state into
            this state checkpoint of the rank's checkpoint pool (the prefix cache keeps it; it is never written
            again while the cache holds it). None: nothing saved.
    """

    seq_id: int
    context_len: int
    token_ids: tuple[int, ...]
    new_blocks: tuple[int, ...] = ()
    sample: bool = True
    output_index: int = 0
    start: SeqStart | None = None
    drafts: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()
    allowed_mask: torch.Tensor | None = None
    forced_token: int | None = None
    mtp_next: int | None = None
    save_state: int | None = None


@dataclass(frozen=True)
class StepRequest:
    """What one trunk rank computes in one step (may be empty: the rank still joins the collectives).

    Attributes:
        seqs: the sequences taking part, in the order of the result's per-sequence fields.
        released: sequences whose state the rank drops before this step (ids it does not hold are ignored).
        mtp_steps: k > 0 when the group speculates: after the target forward every rank runs one MTP pass
            and k - 1 recursive draft steps (each an MoE call of the MTP layer, in lock-step).
        canary: run the readiness canary instead of sequences (replicas/ep/trunk_rank.py `TrunkRank.canary`).
        decodes: sequences that decode one token without anything but that token: the token the rank sampled
            for them in their last step (an engine that never changes a sampled token: no grammar, forced
            token, min_tokens or drafts), at an unchanged block table. Columns instead of a `SeqStep` each: at
            hundreds decoding, building and sending entries was most of the engine's step message work.
        decode_context: per `decodes` entry, its context length (the rank checks it, as `SeqStep.context_len`).
    """

    seqs: tuple[SeqStep, ...] = ()
    released: tuple[int, ...] = ()
    mtp_steps: int = 0
    canary: bool = False
    decodes: tuple[int, ...] = ()
    decode_context: tuple[int, ...] = ()

    @property
    def num_seqs(self) -> int:
        """Sequences in the step: `decodes`, then `seqs` (the order of the result's per-sequence fields)."""
        return len(self.seqs) + len(self.decodes)


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


# A StepResult error starting with this is the server's (out of memory for the step), not the request's input:
# the request fails alone with a 500 that is not retried elsewhere, and the group keeps serving.
SERVER_ERROR = "server error: "


def only_token_mask(token_id: int) -> torch.Tensor:
    """An allowed-token bitmask (the GrammarMatcher layout, shortened: ids past it are disallowed) of one token:
    how a trunk rank applies `SeqStep.forced_token`."""
    word, bit = divmod(token_id, 32)
    mask = torch.zeros(word + 1, dtype=torch.int32)
    mask[word] = (1 << bit) - (1 << 32 if bit == 31 else 0)  # bit 31 is the int32 sign bit
    return mask
