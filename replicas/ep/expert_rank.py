"""An expert rank's core: holds its expert shard and serves the MoE exchanges of each step.

Plain Python (no Ray; the actor in replicas/ep/actors.py wraps it). Per step it walks the plan's
exchange units in order (`StepPlan.units`: with ping-pong micro-batches, each split layer once per
micro-batch), receives the rows the trunk ranks send (replicas/ep/a2a_protocol.py), runs
its experts, and sends the outputs back; a step in which no row arrives still takes part in
every exchange. Must not hold model math (that is model_shards.experts.ExpertShard).
Tests: tests/replicas/test_dispatch.py (every exchange mode against local experts), tests/replicas/test_group.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from cluster.process_groups import GroupHandle
from cluster.topology import GroupShape
from model_shards.experts import ExpertShard
from replicas.ep.a2a_protocol import (
    FIXED,
    HEADER_MIN_BYTES,
    ID_BYTES,
    StepPlan,
    exchange,
    exchange_counts,
    read_headers,
    row_bytes,
    unpack_rows,
)


@dataclass(frozen=True)
class ExpertStepStats:
    rows: int  # routed rows computed this step, all layers
    compute_s: float
    total_s: float


class _FixedBuffers:
    """An expert rank's fixed-mode buffers for one capacity C, made once and reused every layer.

    recv: [D * (C + 1), in_bytes] (a header row, then C row slots, per trunk rank); back: [D * (C + 1),
    out_bytes] (the combine answer, same layout). `back`'s header rows stay zero but for byte 0 (the
    group-wide overflow flag); its padding slots keep stale bytes (trunks read only their counted rows).
    Typed views: `rows` [n, hidden] / `ids` [n, 1] int32 into recv (None when the row width does not allow
    them), `answers` [n, hidden] into back.
    """

    def __init__(
        self, shape: GroupShape, cap: int, *, dtype: torch.dtype, in_bytes: int, out_bytes: int, device: torch.device
    ) -> None:
        d, x = shape.trunk_ranks, shape.expert_ranks
        n = d * (cap + 1)
        self.recv = torch.zeros(n, in_bytes, dtype=torch.uint8, device=device)
        self.back = torch.zeros(n, out_bytes, dtype=torch.uint8, device=device)
        self.recv_splits = [cap + 1] * d + [0] * x
        self.send_splits = [cap + 1] * d + [0] * x
        self.headers = self.recv.view(d, cap + 1, in_bytes)[:, 0, :HEADER_MIN_BYTES]
        self.back_flags = self.back.view(d, cap + 1, out_bytes)[:, 0, 0]
        self.answers = self.back.view(dtype)
        nb = in_bytes - ID_BYTES
        try:
            self.rows: torch.Tensor | None = self.recv[:, :nb].view(dtype)
            self.ids: torch.Tensor | None = self.recv[:, nb:].view(torch.int32)
        except RuntimeError:  # a row width the typed views cannot stride over
            self.rows = self.ids = None
        self.flag = False  # what `back_flags` holds now


class ExpertRank:
    """Serves steps for one expert shard.

    Args:
        shard: the experts this rank holds (every MoE layer).
        group: process-group handle; shape: D and X of the group.
    """

    def __init__(
        self, shard: ExpertShard, group: GroupHandle, shape: GroupShape, *, hidden: int, dtype: torch.dtype
    ) -> None:
        self.shard, self.group, self.shape = shard, group, shape
        self.hidden, self.dtype = hidden, dtype
        self.in_bytes = row_bytes(hidden, dtype) + ID_BYTES
        self.out_bytes = row_bytes(hidden, dtype)
        self._rows = [0] * len(shard.layers)
        # load statistics as received, since `take_received`: rows per global expert id per MoE layer (kept on the
        # device: counting must not sync), unused capacity slots (padding) per layer, and steps served
        self._received = torch.zeros(len(shard.layers), shard.num_experts, dtype=torch.int64, device=group.device)
        self._padding = [0] * len(shard.layers)
        self._steps = 0
        self._counting = True  # False while serving the readiness canary (it is not load)
        self._fixed: dict[int, _FixedBuffers] = {}
        self._no_splits = [0] * shape.world_size
        self._no_rows_in = torch.empty(0, self.in_bytes, dtype=torch.uint8, device=group.device)

    @property
    def rows_per_layer(self) -> torch.Tensor:
        """Routed rows computed per MoE layer since this rank started."""
        return torch.tensor(self._rows, dtype=torch.int64)

    def take_received(self) -> dict[str, torch.Tensor | int]:
        """Rows received per expert per MoE layer ([layers, E]), padding slots per layer, and steps, since the
        last call; resets them. MTP layers are the rows after the decoder layers."""
        out: dict[str, torch.Tensor | int] = {
            "tokens": self._received.cpu(),
            "padding": torch.tensor(self._padding, dtype=torch.int64),
            "steps": self._steps,
        }
        self._received = torch.zeros_like(self._received)
        self._padding = [0] * len(self._padding)
        self._steps = 0
        return out

    def set_shard(self, shard: ExpertShard) -> None:
        """Serve with `shard` from the next step on (the group's map switch, at a step boundary)."""
        if len(shard.layers) != len(self.shard.layers):
            raise ValueError(f"new shard has {len(shard.layers)} MoE layers, this rank serves {len(self.shard.layers)}")
        self.shard = shard

    def _count(self, layer: int, ids: torch.Tensor) -> None:
        if self._counting and ids.numel():
            self._received[layer].index_add_(0, ids.to(torch.long), torch.ones_like(ids, dtype=torch.int64))

    @torch.inference_mode()
    def serve(self, plan: StepPlan) -> ExpertStepStats:
        t0 = time.perf_counter()
        self._counting = not plan.canary
        self._steps += self._counting
        rows = 0
        compute = 0.0
        rows_before, padding_before = list(self._rows), list(self._padding)
        # overflow exchanges owed, in unit order: split unit u's runs after unit u + m - 1's main exchanges
        # (a2a_protocol: the trunks keep m units in flight and learn of an overflow only when they wait)
        owed: deque[tuple[int, int, list[int], list[int]]] = deque()
        try:
            for u, (layer, lag) in enumerate(plan.units()):
                if lag == 1:
                    while owed:
                        rows, compute = self._add(self._overflow(*owed.popleft()[1:]), rows, compute)
                if plan.mode == FIXED:
                    n, c, extra = self._fixed_layer(layer, plan.capacity)
                    if extra is not None:
                        owed.append((u, layer, *extra))
                else:
                    n, c = self._variable_layer(layer)
                rows, compute = rows + n, compute + c
                while owed and owed[0][0] <= u - lag + 1:
                    rows, compute = self._add(self._overflow(*owed.popleft()[1:]), rows, compute)
            while owed:
                rows, compute = self._add(self._overflow(*owed.popleft()[1:]), rows, compute)
        finally:
            if not self._counting:  # the canary's rows are not load
                self._rows, self._padding = rows_before, padding_before
            self._counting = True
        return ExpertStepStats(rows=rows, compute_s=compute, total_s=time.perf_counter() - t0)

    @staticmethod
    def _add(done: tuple[int, float], rows: int, compute: float) -> tuple[int, float]:
        return rows + done[0], compute + done[1]

    def _compute(self, layer: int, buf: torch.Tensor) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        x, ids = unpack_rows(buf, hidden=self.hidden, dtype=self.dtype)
        self._rows[layer] += x.shape[0]
        self._count(layer, ids)
        y = self.shard.forward(layer, x, ids) if x.shape[0] else x
        return y.contiguous().reshape(-1).view(torch.uint8).view(-1, self.out_bytes), time.perf_counter() - t0

    def _variable_layer(self, layer: int) -> tuple[int, float]:
        d, w = self.shape.trunk_ranks, self.shape.world_size
        recv_counts = exchange_counts(self.group, [0] * w)
        rows = exchange(self.group, self._no_rows_in, send_splits=self._no_splits, recv_splits=recv_counts)
        out, secs = self._compute(layer, rows)
        exchange(self.group, out, send_splits=recv_counts[:d] + [0] * (w - d), recv_splits=self._no_splits)
        return rows.shape[0], secs

    def _fixed_buffers(self, cap: int) -> _FixedBuffers:
        bufs = self._fixed.get(cap)
        if bufs is None:
            bufs = _FixedBuffers(
                self.shape,
                cap,
                dtype=self.dtype,
                in_bytes=self.in_bytes,
                out_bytes=self.out_bytes,
                device=self.group.device,
            )
            self._fixed[cap] = bufs
        return bufs

    def _fixed_layer(self, layer: int, cap: int) -> tuple[int, float, tuple[list[int], list[int]] | None]:
        """One fixed-mode unit's main exchanges; returns rows, compute seconds, and (counts, sent) when the group
        overflowed C, for the overflow exchange (`_overflow`, run at its agreed place)."""
        d = self.shape.trunk_ranks
        bufs = self._fixed_buffers(cap)
        exchange(self.group, self._no_rows_in, send_splits=self._no_splits, recv_splits=bufs.recv_splits, out=bufs.recv)
        counts, flags = read_headers(bufs.headers)
        overflow = any(flags)
        sent = [min(c, cap) for c in counts]
        if d == 1 and bufs.rows is not None and bufs.ids is not None:
            # one trunk rank: its rows are one slice of the receive buffer; answers go straight into place
            t0 = time.perf_counter()
            n = sent[0]
            self._rows[layer] += n
            if n:
                ids = bufs.ids[1 : 1 + n, 0].to(torch.long)
                self._count(layer, ids)
                y = self.shard.forward(layer, bufs.rows[1 : 1 + n].contiguous(), ids)
                bufs.answers[1 : 1 + n].copy_(y)
            secs = time.perf_counter() - t0
        else:
            recv = bufs.recv.view(d, cap + 1, self.in_bytes)
            out, secs = self._compute(layer, torch.cat([recv[t, 1 : 1 + sent[t]] for t in range(d)]))
            back = bufs.back.view(d, cap + 1, self.out_bytes)
            start = 0
            for t in range(d):
                back[t, 1 : 1 + sent[t]] = out[start : start + sent[t]]
                start += sent[t]
        if overflow != bufs.flag:  # combine header: the group-wide overflow flag
            bufs.back_flags.fill_(int(overflow))
            bufs.flag = overflow
        exchange(self.group, bufs.back, send_splits=bufs.send_splits, recv_splits=self._no_splits)
        rows = sum(sent)
        self._padding[layer] += d * cap - rows  # capacity slots that crossed the wire empty
        return rows, secs, (counts, sent) if overflow else None

    def _overflow(self, layer: int, counts: list[int], sent: list[int]) -> tuple[int, float]:
        """The extra exchange of a unit where some pair overflowed C: each trunk's rows past C, and back."""
        x = self.shape.expert_ranks
        extra = [c - s for c, s in zip(counts, sent)]
        rest = exchange(self.group, self._no_rows_in, send_splits=self._no_splits, recv_splits=extra + [0] * x)
        out, secs = self._compute(layer, rest)
        exchange(self.group, out, send_splits=extra + [0] * x, recv_splits=self._no_splits)
        return rest.shape[0], secs
