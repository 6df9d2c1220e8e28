"""A trunk rank's table of its sequences: the state the incremental step message leaves on the rank.

Owns: per sequence id, what a `SeqStart` brought (slot, sampling, prompt length, MRoPE and vision inputs),
the block table grown by each step's `new_blocks`, the tokens in its caches (`num_computed`), the penalty
history (the tokens it was fed, when a penalty reads them: a row of the rank's device `PenaltyHistory`, written
with the step's new tokens and, for a token the rank sampled itself, by the sampler on the device) and its vision
embeddings; turning one `SeqStep`
into the `SeqChunk` the model computes (`LiveSeq`); refusing a step that could fail after the first
collective (ids outside the vocabulary or the pools, a sequence it does not hold, a context it does not have)
by looking only at what the step brings. A prefix-cache hit (`SeqStart.restore`) starts a sequence at the cached
length p > 0 on the 64-token grid: its first blocks hold that KV, the rank copies the state checkpoint into its
slot (replicas/ep/trunk_rank.py), and its penalty history starts with the cached prompt's p ids when the start
brings them (`SeqStart.prefix_ids`: a repetition penalty reads the prompt), else with p padding ids (>= vocab,
which the penalties ignore: presence and frequency read outputs only) so prompt and output stay apart.
Must not: run the model or sample.
Tests: tests/replicas/test_step_protocol.py.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import torch

from model_shards.batch import SeqChunk
from model_shards.penalty_history import PenaltyHistory
from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, only_token_mask

PREFIX_GRID = 64  # the prefix cache's token grid: restores resume and saved states sit on multiples of it


@dataclass
class RankSeq:
    """One sequence's state on the rank."""

    start: SeqStart
    blocks: tuple[int, ...] = ()
    num_computed: int = 0  # tokens in the caches
    history: PenaltyHistory | None = None  # the rank's device rows (penalties only), this sequence's is `row`
    row: int = -1
    history_len: int = 0  # ids in its row: the tokens fed
    sampled: int | None = None  # the token the sampler wrote at history_len on the device (not yet fed)
    last_token: int | None = None  # the token sampled in its last step (a columnar decode feeds it back)
    embeds: torch.Tensor | None = None  # vision embeddings, encoded with the first chunk

    def feed(self, tokens: tuple[int, ...]) -> None:
        """Append tokens now in the caches to the penalty history (kept only when a penalty reads it). A fed token
        the sampler already wrote there (the last sampled one, fed back) is only counted: nothing is uploaded."""
        h = self.history
        if h is None or not tokens:
            return
        skip = 1 if self.sampled is not None and tokens[0] == self.sampled else 0
        self.sampled = None
        h.stage(self.row, self.history_len + skip, tokens[skip:])
        self.history_len += len(tokens)


class LiveSeq:
    """A sequence's part of the step being run: its `SeqStep` resolved against its state on the rank."""

    __slots__ = ("step", "state", "chunk", "allowed")

    def __init__(self, step: SeqStep, state: RankSeq, chunk: SeqChunk, allowed: torch.Tensor | None) -> None:
        self.step, self.state, self.chunk, self.allowed = step, state, chunk, allowed

    @property
    def sample(self) -> bool:
        return self.step.sample

    @property
    def params(self) -> SamplingParams:
        return self.state.start.params

    @property
    def drafts(self) -> tuple[int, ...]:
        return self.step.drafts

    @property
    def output_index(self) -> int:
        return self.step.output_index

    @property
    def mtp(self) -> bool:
        return self.state.start.mtp

    @property
    def mtp_next(self) -> int | None:
        return self.step.mtp_next


class SeqTable:
    """The sequences a trunk rank holds, keyed by sequence id.

    Args:
        vocab_size: rows of the LM head (ids at or past it are refused).
        num_slots, num_blocks, block_size: the rank's cache pools.
        num_checkpoints: the rank's prefix-cache state checkpoints (0: no prefix cache on this rank).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_slots: int,
        num_blocks: int,
        block_size: int,
        num_checkpoints: int = 0,
        device: torch.device | None = None,
    ) -> None:
        self.vocab_size, self.num_slots = vocab_size, num_slots
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_checkpoints = num_checkpoints
        self.seqs: dict[int, RankSeq] = {}
        # allocated at the first sequence with a penalty
        self.history = PenaltyHistory(vocab_size, device if device is not None else torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.seqs)

    def release(self, seq_ids: tuple[int, ...]) -> None:
        for i in seq_ids:
            self._drop(self.seqs.pop(i, None))

    def clear(self) -> None:
        """Forget every sequence."""
        self.release(tuple(self.seqs))

    def _drop(self, state: RankSeq | None) -> None:
        if state is not None and state.history is not None:
            state.history.give(state.row)
            state.history = None

    def decode_steps(self, seq_ids: tuple[int, ...], context: tuple[int, ...]) -> tuple[SeqStep, ...]:
        """The step message's columnar decodes (StepRequest.decodes) as the `SeqStep`s they stand for: each feeds
        back the token the rank sampled for it in its last step, at the output index after it. One the rank does
        not hold, or holds without a sampled token, gets an entry `refusal` names.

        Raises:
            ValueError: the columns differ in length (a malformed message: the engine never sends one).
        """
        if len(seq_ids) != len(context):
            raise ValueError(f"{len(seq_ids)} columnar decodes with {len(context)} context lengths")
        get, out = self.seqs.get, []
        for i, c in zip(seq_ids, context):
            state = get(i)
            token = state.last_token if state is not None else None
            if state is None or token is None:
                out.append(SeqStep(i, c, ()))  # refused: not held, or nothing sampled to feed back
            else:
                out.append(SeqStep(i, c, (token,), (), True, c + 1 - state.start.prompt_len))
        return tuple(out)

    def refusal(self, s: SeqStep) -> str | None:
        """Why this step of this sequence must not run (it could make the rank raise after the step's first
        collective, or the rank does not hold the context it continues), or None. Looks only at what the step
        brings (the prompt was checked once at admission, outputs are sampled from the vocabulary)."""
        vocab = self.vocab_size
        if s.start is not None:
            why = self._start_refusal(s)
            if why is not None:
                return why
            blocks = len(s.new_blocks)
        else:
            state = self.seqs.get(s.seq_id)
            if state is None:
                return f"sequence {s.seq_id} is not held by this trunk rank (its state was lost: restarted rank?)"
            if s.context_len != state.num_computed:
                return f"sequence {s.seq_id} continues at {s.context_len} tokens, this rank holds {state.num_computed}"
            blocks = len(state.blocks) + len(s.new_blocks)
        if not s.token_ids:  # (a columnar decode of a sequence that sampled nothing yet gets none)
            return "a step needs at least one new token (a columnar decode: a token the rank sampled)"
        for name, ids in (("token ids", s.token_ids), ("drafts", s.drafts), ("suppressed ids", s.suppress_ids)):
            if any(not 0 <= t < vocab for t in ids):
                return f"{name} outside the vocabulary [0, {vocab})"
        for name, one in (("forced token", s.forced_token), ("mtp_next", s.mtp_next)):
            if one is not None and not 0 <= one < vocab:
                return f"{name} {one} outside the vocabulary [0, {vocab})"
        if any(not 0 <= b < self.num_blocks for b in s.new_blocks):
            return "cache addresses outside this rank's pools"
        if blocks * self.block_size < s.context_len + len(s.token_ids) + len(s.drafts):
            return f"{blocks} KV blocks cannot hold {s.context_len + len(s.token_ids) + len(s.drafts)} tokens"
        mask = s.allowed_mask
        if mask is not None and (mask.dtype != torch.int32 or mask.dim() != 1):
            return "the structured-output mask is not an int32 vector"
        if (s.drafts or s.allowed_mask is not None or s.forced_token is not None) and not s.sample:
            return "drafts and sampling constraints need a sampling step"
        if s.save_state is not None:
            return self._save_refusal(s)
        return None

    def _save_refusal(self, s: SeqStep) -> str | None:
        ckpt, end = s.save_state, s.context_len + len(s.token_ids)
        if ckpt is None:
            return None
        if not 0 <= ckpt < self.num_checkpoints:
            return f"save_state {ckpt} outside this rank's state checkpoints [0, {self.num_checkpoints})"
        if s.drafts:
            return "save_state on a step that verifies drafts (the saved state must sit at a known position)"
        if end % PREFIX_GRID:
            return f"save_state after a chunk ending at {end}, not on the {PREFIX_GRID}-token grid"
        return None

    def _start_refusal(self, s: SeqStep) -> str | None:
        st = s.start
        assert st is not None
        if st.restore is not None:
            why = self._restore_refusal(s, st)
            if why is not None:
                return why
        elif s.context_len != 0:
            return "a sequence starts on a trunk rank at context 0 (or at a cached length with `restore`)"
        elif st.prefix_ids:
            return "prefix ids come only with a restore"
        if not 0 <= st.slot < self.num_slots:
            return "cache addresses outside this rank's pools"
        n = st.params.logprobs
        if n is not None and not 0 <= n <= self.vocab_size:
            return f"logprobs {n} is outside [0, {self.vocab_size}]"
        if st.mm_positions is not None and tuple(st.mm_positions.shape) != (3, st.prompt_len):
            return f"MRoPE positions must be [3, {st.prompt_len}], got {tuple(st.mm_positions.shape)}"
        if any(not 0 <= r < st.prompt_len for r in st.vision_rows):
            return "vision rows outside the prompt"
        return None

    def _restore_refusal(self, s: SeqStep, st: SeqStart) -> str | None:
        p, ckpt = s.context_len, st.restore
        assert ckpt is not None
        if not 0 <= ckpt < self.num_checkpoints:
            return f"restore {ckpt} outside this rank's state checkpoints [0, {self.num_checkpoints})"
        if p <= 0 or p % PREFIX_GRID:
            return f"a restored sequence resumes at a cached length > 0 on the {PREFIX_GRID}-token grid, got {p}"
        if p >= st.prompt_len:
            return f"a restored sequence resumes inside its prompt: cached length {p} >= prompt length {st.prompt_len}"
        if len(s.new_blocks) * self.block_size < p:
            return f"{len(s.new_blocks)} KV blocks cannot hold the {p} cached tokens of a restored sequence"
        if st.prefix_ids and len(st.prefix_ids) != p:
            return f"a restored sequence brings {len(st.prefix_ids)} cached prompt ids for a cached length of {p}"
        if st.params.repetition_penalty != 1.0 and not st.prefix_ids:
            # the repetition penalty reads the whole prompt: the rank holds none of the cached part
            return "a restored sequence with a repetition penalty needs its cached prompt ids (prefix_ids)"
        if any(not 0 <= t < self.vocab_size for t in st.prefix_ids):
            return f"prefix ids outside the vocabulary [0, {self.vocab_size})"
        return None

    def resolve(self, s: SeqStep) -> LiveSeq:
        """Apply an accepted step to the sequence's state (a start replaces any state of that id) and build its
        chunk: the new tokens then the drafts, at its context, with its slot and block table."""
        if s.start is not None:
            st = s.start
            self._drop(self.seqs.pop(s.seq_id, None))  # a start replaces (a preempted sequence recomputes)
            state = RankSeq(st)
            if st.params.has_penalties:
                state.history, state.row = self.history, self.history.take()
                if st.prefix_ids:  # a restore: the cached prompt's ids (else padding: the row starts as padding)
                    state.feed(st.prefix_ids)
                state.history_len = s.context_len
            self.seqs[s.seq_id] = state
        else:
            state = self.seqs[s.seq_id]
        if s.new_blocks:
            state.blocks = (*state.blocks, *s.new_blocks)
        state.feed(s.token_ids)
        st = state.start
        n = len(s.token_ids) + len(s.drafts)
        positions, rows, first = self._vision(st, s.context_len, n)
        chunk = SeqChunk(
            (*s.token_ids, *s.drafts) if s.drafts else s.token_ids,
            s.context_len,
            st.slot,
            state.blocks,
            positions=positions,
            rope_delta=st.rope_delta,
            logits="all" if s.drafts else "last" if s.sample else "none",
            vision_rows=rows,
            vision_first=first,
            verify=bool(s.drafts),
        )
        allowed = only_token_mask(s.forced_token) if s.forced_token is not None else s.allowed_mask
        return LiveSeq(s, state, chunk, allowed)

    @staticmethod
    def _vision(st: SeqStart, start: int, n: int) -> tuple[torch.Tensor | None, tuple[int, ...], int]:
        """For tokens [start, start + n): their [3, n] MRoPE positions (None: text positions), the chunk rows
        that take vision embeddings, and the index of the first such embedding."""
        if st.mm_positions is None or start >= st.prompt_len:
            return None, (), 0
        end = min(start + n, st.prompt_len)
        positions = (torch.arange(start, start + n, dtype=torch.long) + st.rope_delta).expand(3, n).clone()
        positions[:, : end - start] = st.mm_positions[:, start:end]
        lo, hi = bisect_left(st.vision_rows, start), bisect_left(st.vision_rows, end)
        return positions, tuple(r - start for r in st.vision_rows[lo:hi]), lo

    def advance(self, live: LiveSeq, accepted: tuple[int, ...], token: int | None) -> None:
        """After the forward: the chunk's own tokens and the accepted drafts are in the caches; `token` was
        sampled after them (None: the chunk did not sample)."""
        live.state.num_computed = live.step.context_len + len(live.step.token_ids) + len(accepted)
        live.state.last_token = token
        live.state.feed(accepted)
