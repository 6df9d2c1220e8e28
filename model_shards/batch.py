"""What one forward step computes: packed new tokens of several sequences plus cache addresses.

Owns: `SeqChunk` (one sequence's part of a step, as the scheduler describes it) and
`StepBatch` (the packed, index-precomputed form the math consumes). Sequences are packed
back to back (no padding between them); each carries its context length (tokens already
cached), its DeltaNet state slot and its KV block table. The engine owns the pools; a
step only names indices into them. Tests: tests/model_shards/test_model_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import torch

_T = TypeVar("_T")


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's tokens in a step.

    Attributes:
        token_ids: the new tokens (a prefill chunk, one decode token, or 1 + k verify tokens).
        context_len: tokens of this sequence already in the caches before this step.
        state_slot: DeltaNet state slot (conv window + recurrent state) of the sequence.
        block_table: KV block ids covering positions [0, context_len + len(token_ids)).
        positions: [3, n] MRoPE positions of the new tokens; None means text positions
            context_len + rope_delta + i on all three axes.
        rope_delta: offset of text positions after images (model_spec §4.3); 0 for text.
        logits: which of the new tokens need logits ("last", "all" or "none").
        vision_rows: rows of the new tokens that take vision embeddings instead of token embeddings.
        vision_first: index, in the sequence's vision embeddings, of the first of those rows.
        verify: process the new tokens one at a time, as consecutive decode steps would (speculative
            verification): DeltaNet states after every token are kept so the caches can roll back.
    """

    token_ids: tuple[int, ...]
    context_len: int
    state_slot: int
    block_table: tuple[int, ...]
    positions: torch.Tensor | None = None
    rope_delta: int = 0
    logits: str = "last"
    vision_rows: tuple[int, ...] = ()
    vision_first: int = 0
    verify: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a SeqChunk needs at least one new token")
        if self.logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {self.logits!r}")


@dataclass(frozen=True)
class FixedDecode:
    """What makes a `StepBatch` a fixed-shape decode batch (a CUDA-graph bucket, replicas/ep/decode_graphs.py):
    one token per row on a cached state, every shape fixed by the bucket and no value read on the host, so the
    layers take their shape-stable paths (attention: `paged_attention.fixed_decode_attention`; DeltaNet: gathered
    state slots). The batch's host tuples (`context_lens`, `state_slots`) are then placeholders.

    Attributes:
        key_counts_B: [B] int64 on the device: keys each row attends to (its context + 1).
        tiles: key tiles (`paged_attention.key_tile`) every row reads; `block_tables_BN` is that many tiles wide.
    """

    key_counts_B: torch.Tensor
    tiles: int


@dataclass(frozen=True)
class StepBatch:
    """Packed tokens of B sequences with everything the layers index by.

    Built once per step by `StepBatch.build`; the layers never loop over Python sequences
    in decode. Legend: T packed tokens, B sequences.
    """

    token_ids_T: torch.Tensor  # [T] int64
    positions_3T: torch.Tensor  # [3, T] int64
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    state_slots_B: torch.Tensor  # [B] int64
    block_tables_BN: torch.Tensor  # [B, max_blocks] int64 (0-padded; masked by length)
    slot_mapping_T: torch.Tensor  # [T] flat KV index block * block_size + offset
    block_size: int
    logit_rows: torch.Tensor  # [R] rows of T whose logits are returned
    embeds_override: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [M], embeds [M, D])
    verify: tuple[bool, ...] = ()  # per sequence: token-by-token verification (SeqChunk.verify)
    # state slot of each sequence on the host (what `state_slots_B` holds): layers index by these ints, never
    # by reading the device tensor back (a host sync per layer on a GPU)
    state_slots: tuple[int, ...] = ()
    fixed_decode: FixedDecode | None = None  # a fixed-shape decode batch (CUDA-graph bucket); see FixedDecode
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @staticmethod
    def build(seqs: list[SeqChunk], *, block_size: int, device: torch.device | str = "cpu") -> StepBatch:
        """Pack sequences, compute positions, KV slot mapping and logit rows.

        Index lists are built in Python and turned into tensors once per field (a decode
        step of B sequences costs a handful of tensor constructions, not B of each).
        """
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        ids: list[int] = []
        slot_map: list[int] = []
        logit_rows: list[int] = []
        text_pos: list[int] = []
        pos_parts: list[torch.Tensor] = []
        explicit = any(s.positions is not None for s in seqs)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables: list[tuple[int, ...]] = []
        for s in seqs:
            n, start = len(s.token_ids), len(ids)
            end_pos = s.context_len + n
            table = s.block_table
            if len(table) * block_size < end_pos:
                raise ValueError(f"block table of {len(table)} blocks x {block_size} cannot hold {end_pos} tokens")
            ids.extend(s.token_ids)
            slot_map.extend(table[p // block_size] * block_size + p % block_size for p in range(s.context_len, end_pos))
            if s.positions is not None:
                if tuple(s.positions.shape) != (3, n):
                    raise ValueError(f"positions must be [3, {n}], got {tuple(s.positions.shape)}")
                pos_parts.append(s.positions.to(torch.long))
            elif explicit:
                text = torch.arange(s.context_len, end_pos, dtype=torch.long) + s.rope_delta
                pos_parts.append(text.expand(3, n))
            else:
                text_pos.extend(range(s.context_len + s.rope_delta, end_pos + s.rope_delta))
            if s.logits == "last":
                logit_rows.append(start + n - 1)
            elif s.logits == "all":
                logit_rows.extend(range(start, start + n))
            tables.append((*table, *(0,) * (max_blocks - len(table))))
        positions = (
            torch.cat(pos_parts, dim=1).to(device)
            if explicit
            else torch.tensor([text_pos] * 3, dtype=torch.long, device=device)
        )
        return StepBatch(
            token_ids_T=torch.tensor(ids, dtype=torch.long, device=device),
            positions_3T=positions,
            query_lens=tuple(len(s.token_ids) for s in seqs),
            context_lens=tuple(s.context_len for s in seqs),
            state_slots_B=torch.tensor([s.state_slot for s in seqs], dtype=torch.long, device=device),
            block_tables_BN=torch.tensor(tables, dtype=torch.long, device=device),
            slot_mapping_T=torch.tensor(slot_map, dtype=torch.long, device=device),
            block_size=block_size,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
            verify=tuple(s.verify for s in seqs),
            state_slots=tuple(s.state_slot for s in seqs),
        )

    # ----------------------------------------------------------------- derived indices
    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @cached_property
    def starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.query_lens:
            out.append(acc)
            acc += n
        return tuple(out)

    @cached_property
    def recurrent_seqs(self) -> tuple[int, ...]:
        """Sequences whose DeltaNet step uses the recurrent form: one new token on a cached state
        (HF takes the recurrent path exactly when seq_len == 1 and a state exists)."""
        return tuple(
            i
            for i, (q, c) in enumerate(zip(self.query_lens, self.context_lens))
            if q == 1 and c > 0 and not self.is_verify(i)
        )

    @cached_property
    def verify_seqs(self) -> tuple[int, ...]:
        """Sequences whose new tokens are checked token by token (speculative verification)."""
        return tuple(i for i in range(self.num_seqs) if self.is_verify(i))

    def verify_groups(self) -> tuple[tuple[int, ...], ...]:
        """`verify_seqs` grouped by token count (1 + drafts; first-seen order): each group runs as one batch, so
        a step makes one group per distinct draft count, never one per sequence."""
        key = ("verify_groups",)
        if key not in self._cache:
            groups: dict[int, list[int]] = {}
            for i in self.verify_seqs:
                groups.setdefault(self.query_lens[i], []).append(i)
            self._cache[key] = tuple(tuple(g) for g in groups.values())
        return self._cache[key]

    def is_verify(self, i: int) -> bool:
        return bool(self.verify) and self.verify[i]

    @cached_property
    def decode_only(self) -> bool:
        """Every sequence is a recurrent step (one token on a cached state): packed row i is
        sequence i's token, so per-sequence rows need no gather."""
        return len(self.recurrent_seqs) == self.num_seqs

    @cached_property
    def chunk_seqs(self) -> tuple[int, ...]:
        taken = set(self.recurrent_seqs) | set(self.verify_seqs)
        return tuple(i for i in range(self.num_seqs) if i not in taken)

    @cached_property
    def decode_rows(self) -> tuple[tuple[int, int], ...]:
        """(sequence, key count) of every row attended like a decode step: one row per recurrent
        sequence, one row per token of a verifying sequence (token j sees context + j + 1 keys)."""
        rows: list[tuple[int, int, int]] = []
        for i in self.recurrent_seqs:
            rows.append((self.starts[i], i, self.context_lens[i] + 1))
        for i in self.verify_seqs:
            rows.extend((self.starts[i] + j, i, self.context_lens[i] + j + 1) for j in range(self.query_lens[i]))
        rows.sort()
        return tuple((i, n) for _, i, n in rows)

    @cached_property
    def decode_row_ids(self) -> torch.Tensor:
        """Packed rows of `decode_rows`, in the same order."""
        rows = sorted(
            [self.starts[i] for i in self.recurrent_seqs]
            + [self.starts[i] + j for i in self.verify_seqs for j in range(self.query_lens[i])]
        )
        return torch.tensor(rows, dtype=torch.long, device=self.token_ids_T.device)

    def memo(self, key: tuple, make: Callable[[], _T]) -> _T:
        """`make()` once per step: index tensors and masks derived from the batch that every
        layer of the step shares (e.g. attention's key mask). `key` must name what is built."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def slot_run(self, seqs: tuple[int, ...]) -> int | None:
        """The first state slot when the listed sequences' slots are consecutive (s, s + 1, ...),
        else None: their DeltaNet states are then one block of the pool, read and written in place."""

        def make() -> int | None:
            if self.fixed_decode is not None:  # slots live on the device only: always gathered
                return None
            slots = [self.state_slots[i] for i in seqs]
            return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None

        return self.memo(("slot_run", seqs), make)

    def chunk_groups(self, multiple: int) -> tuple[tuple[int, ...], ...]:
        """`chunk_seqs` grouped by new-token count rounded up to `multiple` (first-seen order):
        the sequences of a group pad to the same length, so they can run as one batch."""
        key = ("groups", multiple)
        if key not in self._cache:
            groups: dict[int, list[int]] = {}
            for i in self.chunk_seqs:
                groups.setdefault(-(-self.query_lens[i] // multiple), []).append(i)
            self._cache[key] = tuple(tuple(g) for g in groups.values())
        return self._cache[key]

    def padded_rows(self, seqs: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices [len(seqs), Tmax] into the packed tokens, padding pointing at row T
        (callers append one zero row), and the matching validity mask."""
        key = ("padded", seqs)
        if key not in self._cache:
            lens = [self.query_lens[i] for i in seqs]
            tmax = max(lens)
            rows = torch.full((len(seqs), tmax), self.num_tokens, dtype=torch.long)
            for j, i in enumerate(seqs):
                rows[j, : lens[j]] = torch.arange(self.starts[i], self.starts[i] + lens[j])
            rows = rows.to(self.token_ids_T.device)
            self._cache[key] = (rows, rows < self.num_tokens)
        return self._cache[key]

    def seq_rows(self, seqs: tuple[int, ...]) -> torch.Tensor:
        """Packed row of the single new token of each listed sequence (decode-style sequences)."""
        key = ("rows", seqs)
        if key not in self._cache:
            self._cache[key] = torch.tensor(
                [self.starts[i] for i in seqs], dtype=torch.long, device=self.token_ids_T.device
            )
        return self._cache[key]

    def index_of(self, seqs: tuple[int, ...]) -> torch.Tensor:
        key = ("idx", seqs)
        if key not in self._cache:
            self._cache[key] = torch.tensor(seqs, dtype=torch.long, device=self.token_ids_T.device)
        return self._cache[key]

    def fresh_mask(self, seqs: tuple[int, ...]) -> torch.Tensor:
        """[len(seqs)] bool: sequences with no cached state (start from zeros)."""
        key = ("fresh", seqs)
        if key not in self._cache:
            self._cache[key] = torch.tensor([self.context_lens[i] == 0 for i in seqs], device=self.token_ids_T.device)
        return self._cache[key]
