"""Wire format of the trunk <-> expert all-to-all: one collective each way per MoE layer.

Owns: `StepPlan` (the MoE calls every rank makes in a step, lock-step), row packing (hidden
row + its global expert id in one uint8 row, so dispatch is a single collective), the two
exchange modes and their split sizes:
- variable (prefill): a counts exchange, then `all_to_all_single` with uneven splits;
- fixed (decode): every (trunk, expert rank) pair exchanges C + 1 rows (a header row, then up to
  C rows), so no counts exchange. The dispatch header carries the pair's true row count and
  whether the sender overflowed C anywhere; the combine header carries the group-wide overflow
  flag. When any pair overflowed, one extra exchange with sizes both sides already know
  carries the rest: no token is dropped.
Ping-pong micro-batches (`StepPlan.micro_batches` = m > 1): each of the first `split_layers` MoE layers is m
exchange units (micro-batch 0..m-1 of the layer, layer-major), the rest one unit each (`StepPlan.units`). A trunk
keeps up to m units in flight (async collectives), so the overflow exchange of split unit u runs at one place
both sides agree on: after the main exchanges of unit u + m - 1, before those of unit u + m (at the end of the
split units, the outstanding ones in order).
Global ranks: 0..D-1 trunks, D..D+X-1 experts (cluster/topology.py). Tests:
tests/replicas/test_dispatch.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster.process_groups import GroupHandle

VARIABLE = "variable"
FIXED = "fixed"
ID_BYTES = 4  # int32 expert id appended to every dispatched row
HEADER_MIN_BYTES = 9  # int64 row count + 1 flag byte


@dataclass(frozen=True)
class StepPlan:
    """The MoE layer calls of one step, identical on every rank of the group.

    Attributes:
        moe_layers: MoE layer ids in call order (decoder layers, then MTP layers if drafting).
        mode: VARIABLE (counts exchange) or FIXED (capacity rows per pair, no counts exchange).
        capacity: C, rows per (trunk rank, expert rank) pair in FIXED mode.
        map_version: the expert map this step runs under; a rank that holds a staged map of this version
            switches to it before the step (so every rank switches at the same step boundary).
        canary: the readiness canary's step: expert ranks serve it but count nothing (load, rows, steps).
        micro_batches: m, how many micro-batches each trunk rank splits its tokens into for the first
            `split_layers` MoE layers (the decoder layers; MTP layers run as one): 1 turns ping-pong off.
        split_layers: how many leading entries of `moe_layers` run once per micro-batch.
    """

    moe_layers: tuple[int, ...]
    mode: str = VARIABLE
    capacity: int = 0
    map_version: int = 0
    canary: bool = False
    micro_batches: int = 1
    split_layers: int = 0

    def __post_init__(self) -> None:
        if self.mode not in (VARIABLE, FIXED):
            raise ValueError(f"mode must be {VARIABLE!r} or {FIXED!r}, got {self.mode!r}")
        if self.mode == FIXED and self.capacity < 1:
            raise ValueError("FIXED mode needs capacity >= 1")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if not 0 <= self.split_layers <= len(self.moe_layers):
            raise ValueError(f"split_layers {self.split_layers} outside 0..{len(self.moe_layers)}")

    @property
    def split(self) -> bool:
        """Whether this step runs ping-pong micro-batches."""
        return self.micro_batches > 1 and self.split_layers > 0

    def units(self) -> tuple[tuple[int, int], ...]:
        """Every exchange unit of the step in issue order: (MoE layer, units in flight), where units in flight is
        m for the split layers' units and 1 for the rest (so unit u's overflow exchange follows unit u + m - 1's
        main exchanges)."""
        m = self.micro_batches if self.split else 1
        n = self.split_layers if self.split else 0
        head = tuple((layer, m) for layer in self.moe_layers[:n] for _ in range(m))
        return head + tuple((layer, 1) for layer in self.moe_layers[n:])


def _pow2_at_least(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def fixed_capacity(max_tokens_per_trunk: int, *, top_k: int, expert_ranks: int, factor: float) -> int:
    """C for a decode step: factor x the mean rows a trunk sends an expert rank, rounded up to a
    power of two (few distinct buffer shapes), at least 1, and no more than the power of two that holds
    all of a trunk's rows (T x k: beyond that a pair cannot overflow anyway, extra rows are only padding)."""
    mean = max_tokens_per_trunk * top_k / max(expert_ranks, 1)
    c = max(1, int(-(-mean * factor // 1)))
    return min(_pow2_at_least(c), _pow2_at_least(max_tokens_per_trunk * top_k))


def row_bytes(hidden: int, dtype: torch.dtype) -> int:
    return hidden * torch.empty((), dtype=dtype).element_size()


def pack_rows(x_RD: torch.Tensor, ids_R: torch.Tensor) -> torch.Tensor:
    """[R, D] hidden rows + [R] expert ids -> [R, D * es + 4] uint8."""
    if x_RD.dim() != 2 or ids_R.dim() != 1 or x_RD.shape[0] != ids_R.shape[0]:
        raise ValueError(f"pack_rows needs [R, D] rows and [R] ids, got {tuple(x_RD.shape)} and {tuple(ids_R.shape)}")
    return torch.cat(
        [x_RD.contiguous().view(torch.uint8), ids_R.to(torch.int32).view(torch.uint8).view(-1, ID_BYTES)], dim=1
    )


def unpack_rows(buf: torch.Tensor, *, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_rows`: ([R, D] in dtype, [R] int64 ids)."""
    nb = row_bytes(hidden, dtype)
    if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[1] != nb + ID_BYTES:
        raise ValueError(
            f"packed rows must be [R, {nb + ID_BYTES}] uint8 ({hidden} x {dtype} + a 4-byte expert id), "
            f"got {tuple(buf.shape)} {buf.dtype}"
        )
    # reshape(-1) (not .contiguous()): a one-row slice counts as contiguous but keeps its row stride
    x = _aligned(buf[:, :nb].reshape(-1), torch.empty((), dtype=dtype).element_size())
    ids = _aligned(buf[:, nb : nb + ID_BYTES].reshape(-1), ID_BYTES)
    return x.view(dtype).view(buf.shape[0], hidden), ids.view(torch.int32).to(torch.long)


def _aligned(raw: torch.Tensor, size: int) -> torch.Tensor:
    """`raw` (uint8), copied when it starts off a `size`-byte boundary: a one-row slice keeps its offset
    into the buffer (e.g. the id after 3 bf16 values starts at byte 6), and a typed view needs alignment."""
    return raw.clone() if raw.storage_offset() % size else raw


def write_header(row: torch.Tensor, *, count: int, flag: bool) -> None:
    """Header row (uint8): bytes 0..7 int64 count, byte 8 flag."""
    row[:8] = torch.tensor([count], dtype=torch.int64).view(torch.uint8)
    row[8] = int(flag)


def write_headers(rows: torch.Tensor, *, counts: torch.Tensor, flag: bool) -> None:
    """All header rows at once: [P, B] uint8 rows, [P] int64 counts (same bytes as `write_header` per row)."""
    rows[:, :8] = counts.to(device=rows.device, dtype=torch.int64).contiguous().view(torch.uint8).view(-1, 8)
    rows[:, 8] = int(flag)


def read_headers(rows: torch.Tensor) -> tuple[list[int], list[bool]]:
    """[P, B] header rows -> counts, flags (one host copy of the P x 9 header bytes, decoded in Python)."""
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] < HEADER_MIN_BYTES:
        raise ValueError(f"header rows must be [P, >= {HEADER_MIN_BYTES}] uint8, got {tuple(rows.shape)} {rows.dtype}")
    raw = rows[:, :HEADER_MIN_BYTES].tolist()
    counts = [int.from_bytes(bytes(h[:8]), sys.byteorder, signed=True) for h in raw]
    return counts, [h[8] != 0 for h in raw]


def read_overflow(flags: torch.Tensor) -> bool:
    """The fixed mode's one host read per MoE layer: whether any (trunk, expert rank) pair overflowed C,
    from the combine headers' flag bytes ([P] uint8). Every rank must agree on whether the extra exchange
    follows, so this value must reach the host; on a GPU it is the decode step's one sync per MoE layer."""
    return bool(flags.any())


def combine_flags(rows: torch.Tensor) -> list[bool]:
    """Combine header rows (uint8): byte 0 is the group-wide overflow flag."""
    return (rows[:, 0] != 0).tolist()


def exchange(
    group: GroupHandle,
    send: torch.Tensor,
    *,
    send_splits: list[int],
    recv_splits: list[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One `all_to_all_single` over dim 0 with the given per-rank row counts.

    `out`: a preallocated receive buffer of sum(recv_splits) rows (reused across layers by the fixed
    mode); a new one otherwise.
    """
    if out is None:
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
    with group.progress.collective():  # counted for the driver's hang watch; its failure is a CollectiveError
        dist.all_to_all_single(
            out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group.group
        )
    return out


def exchange_start(
    group: GroupHandle,
    send: torch.Tensor,
    *,
    send_splits: list[int],
    recv_splits: list[int],
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dist.Work]:
    """`exchange`, issued asynchronously: (the receive buffer, its work handle); the buffer (and `send`) may be
    touched only after `wait_exchange` on the handle."""
    if out is None:
        out = send.new_empty((sum(recv_splits), *send.shape[1:]))
    with group.progress.collective():
        work = dist.all_to_all_single(
            out, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group.group, async_op=True
        )
    assert work is not None  # async_op=True always returns a handle
    return out, work


def wait_exchange(group: GroupHandle, work: dist.Work) -> None:
    """Wait for an exchange issued by `exchange_start` (the time counts as inside a collective for the hang watch;
    a failure is a `CollectiveError`)."""
    with group.progress.awaiting():
        work.wait()


def exchange_counts(group: GroupHandle, send_counts: list[int]) -> list[int]:
    """The variable mode's counts exchange: each rank learns how many rows every peer sends it."""
    send = torch.tensor(send_counts, dtype=torch.int64, device=group.device)
    recv = torch.empty_like(send)
    with group.progress.collective():
        dist.all_to_all_single(recv, send, group=group.group)
        return recv.tolist()
