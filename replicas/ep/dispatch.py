"""The dispatch/combine seam of a trunk rank: local (the reference) and all-to-all.

Both are `RoutedExperts` callables `(moe_layer, x_TD, routing) -> y_TD` that the trunk calls
once per MoE layer, and both keep expert-load statistics (tokens per expert per MoE layer).
- `LocalDispatcher`: every expert in-process (`--expert-ranks 0`); the oracle.
- `AllToAllDispatcher`: rows go to the expert ranks owning their experts over
  torch.distributed (wire format in replicas/ep/a2a_protocol.py) and come back weighted and
  slot-summed here, exactly as the local path combines them. Its collectives are issued asynchronously:
  `start` sends a layer's rows and posts the combine's receive, returning an exchange unit; `wait()` on it waits
  only when the result is needed. With ping-pong micro-batches (StepPlan.micro_batches = m) up to m units are in
  flight, each with its own fixed-mode buffers, so the trunk computes micro-batch i + 1 while the expert ranks
  compute micro-batch i (Trunk.forward_split); `__call__` is `start(...).wait()`.
Legend: T tokens, k top-k, R = T * k routed rows, X expert ranks, D trunk ranks.

Host reads (device values the host must see): the routing, destinations, counts and the fixed mode's rows
stay on the device. What remains, per MoE layer: the variable mode (prefill) reads the X row counts
(`all_to_all_single` takes its split sizes as host ints); the fixed mode (decode) reads only the combine
header's group-wide overflow flag (`a2a_protocol.read_overflow`: whether an extra exchange follows is a
host decision every rank must agree on), and only when it is set, this rank's counts. Expert-load counters
are read every N steps (`ExpertLoad.take`).
Tests: tests/replicas/test_dispatch.py (all-to-all vs local on the same inputs).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle
from cluster.topology import GroupShape
from model_shards.experts import ExpertShard, local_routed_experts
from model_shards.moe import Routing, combine_slots
from model_shards.trunk import PendingRouted
from replicas.ep.a2a_protocol import (
    FIXED,
    ID_BYTES,
    StepPlan,
    exchange,
    exchange_start,
    pack_rows,
    read_overflow,
    row_bytes,
    wait_exchange,
    write_headers,
)


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer since the last reset.

    `add` only keeps a reference to the layer's routing ids; `flush` (run by the dispatchers at the end of
    each step, off the per-layer exchange path, and by every read) counts them all with one index_add into
    a counter kept on the ids' device: counting never reads device data back. `counts` and `take` are the
    named host reads (the rank reads them every N steps for load statistics). Inside `paused()` nothing is
    counted (the readiness canary).
    """

    def __init__(self, num_moe_layers: int, num_experts: int) -> None:
        self._shape = (num_moe_layers, num_experts)
        self._counts = torch.zeros(num_moe_layers * num_experts, dtype=torch.int64)  # moves to the ids' device
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing while inside (the canary's forward)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def add(self, layer: int, topk_ids_Tk: torch.Tensor) -> None:
        if self._paused:
            return
        if not 0 <= layer < self._shape[0]:
            raise IndexError(f"MoE layer {layer} outside the {self._shape[0]} counted layers")
        self._pending.append((layer, topk_ids_Tk))
        if len(self._pending) >= 4096:  # a caller that never flushes still holds a bounded list
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        num_experts = self._shape[1]
        keys = torch.cat([ids.reshape(-1) + layer * num_experts for layer, ids in self._pending])
        self._pending = []
        if self._counts.device != keys.device:
            self._counts = self._counts.to(keys.device)
        self._counts.index_add_(0, keys, torch.ones_like(keys))

    @property
    def counts(self) -> torch.Tensor:
        """[layers, experts] int64 on the host (a named host read)."""
        self.flush()
        return self._counts.view(self._shape).cpu()  # transfer point: expert-load counters out, when read

    def take(self) -> torch.Tensor:
        """`counts`, then reset them."""
        self.flush()
        out, self._counts = self._counts, torch.zeros_like(self._counts)
        return out.view(self._shape).cpu()  # transfer point: expert-load counters out, when read


class Dispatcher(Protocol):
    """What a trunk rank needs of its seam: the per-layer call, step framing, and load counters."""

    load: ExpertLoad

    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...

    def start(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> PendingRouted: ...

    def begin(self, plan: StepPlan) -> None: ...

    def finish(self) -> None: ...

    def run_idle(self) -> None: ...


class LocalDispatcher:
    """All experts in this process: repeat rows per slot, expert FFN, weight and slot-sum.

    It has no peers, so step framing only settles the expert-load counters.
    """

    def __init__(self, shard: ExpertShard, *, num_moe_layers: int) -> None:
        self.shard = shard
        self.load = ExpertLoad(num_moe_layers, shard.num_experts)

    def begin(self, plan: StepPlan) -> None:
        pass

    def finish(self) -> None:
        self.load.flush()

    def run_idle(self) -> None:
        pass

    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        self.load.add(layer, routing.topk_ids_Tk)
        return local_routed_experts(self.shard, layer, x_TD, routing)

    def start(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> PendingRouted:
        """No peers to overlap with: computed now (an empty micro-batch routes nothing)."""
        if not routing.num_tokens:
            return _Done(x_TD.new_zeros(x_TD.shape))
        return _Done(self(layer, x_TD, routing))


@dataclass(frozen=True)
class _Done:
    y: torch.Tensor

    def wait(self) -> torch.Tensor:
        return self.y


@dataclass(frozen=True)
class DispatchHandle:
    """What `dispatch` sent, so `combine` can bring the rows back into slot order.

    Attributes:
        routing: the layer's routing (weights are applied at combine).
        order_R: send order -> slot row (row t*k + j is token t, slot j); None on the fixed fast path.
        counts_X: rows sent to each expert rank (all of them, capacity or not).
        sent_X: rows that went in the main exchange (min(count, C) in fixed mode).
        src_R: fixed mode with typed buffer views: slot row -> its row in the [X * (C + 1)] exchange buffer
            (the combine answer comes back in the dispatch layout, so combine is one gather); rows past C
            point at the sink row after the buffer. None otherwise.
        counts_t, rows_TD, dest_R: on the src_R path, the device counts, the layer's tokens and each slot
            row's expert rank, read only if some pair overflowed C (to send this rank's rows past C in the
            extra exchange).
    """

    routing: Routing
    order_R: torch.Tensor | None
    counts_X: tuple[int, ...]
    sent_X: tuple[int, ...]
    mode: str
    capacity: int
    src_R: torch.Tensor | None = None
    counts_t: torch.Tensor | None = None
    rows_TD: torch.Tensor | None = None
    dest_R: torch.Tensor | None = None


@dataclass(eq=False)
class _Unit:
    """One exchange unit in flight (a MoE layer's dispatch + combine for one micro-batch): `wait()` gives the
    routed output once the combine arrived (and any overflow exchange ran at its agreed place)."""

    owner: AllToAllDispatcher
    index: int  # in the step's unit order (StepPlan.units)
    lag: int  # units in flight for this unit (m for split layers, else 1)
    slot: int  # which fixed-mode buffers it uses
    handle: DispatchHandle
    payload: torch.Tensor
    works: list[dist.Work]
    recv: torch.Tensor
    y: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        return self.owner._wait(self)


class _FixedBuffers:
    """A trunk rank's fixed-mode exchange buffers for one capacity C, made once and reused every layer.

    send: [X * (C + 1), in_bytes] (a header row, then C row slots, per expert rank; one more sink row after
    it takes the rows past C, never sent); recv: [X * (C + 1),
    out_bytes] (the combine answer, same layout). Padding slots keep stale bytes from earlier layers:
    receivers read only the header and the counted rows. `rows`, `ids`, `counts`, `flags` are typed views
    into `send` (None where the row width does not allow a typed view); `answers` into `recv`.
    """

    def __init__(
        self,
        shape: GroupShape,
        cap: int,
        *,
        hidden: int,
        dtype: torch.dtype,
        in_bytes: int,
        out_bytes: int,
        device: torch.device,
    ) -> None:
        d, x = shape.trunk_ranks, shape.expert_ranks
        n = x * (cap + 1)
        self.sink = n
        with_sink = torch.zeros(n + 1, in_bytes, dtype=torch.uint8, device=device)
        self.send = with_sink[:n]
        self.recv = torch.zeros(n, out_bytes, dtype=torch.uint8, device=device)
        self.send_splits = [0] * d + [cap + 1] * x
        self.recv_splits = [0] * d + [cap + 1] * x
        header = self.send.view(x, cap + 1, in_bytes)[:, 0]
        self.counts, self.flags = header[:, :8], header[:, 8]
        self.answer_flags = self.recv.view(x, cap + 1, out_bytes)[:, 0, 0]
        self.answers = self.recv.view(dtype)  # [n, hidden]
        self.owed = self.send[:0]  # the fast path's payload: no rows left for an overflow exchange
        self.block = torch.arange(x, device=device) * (cap + 1)  # first row (the header) of each expert rank's block
        nb = in_bytes - ID_BYTES
        try:
            self.rows: torch.Tensor | None = with_sink[:, :nb].view(dtype)  # [n + 1, hidden], row stride in_bytes
            self.ids: torch.Tensor | None = with_sink[:, nb:].view(torch.int32)  # [n + 1, 1]
        except RuntimeError:  # a row width the typed views cannot stride over (e.g. odd hidden in bf16)
            self.rows = self.ids = None


class AllToAllDispatcher:
    """Trunk side of the expert all-to-all.

    Args:
        group: this rank's process-group handle.
        shape: D and X of the group.
        expert_map: which expert rank owns which expert, per MoE layer.
        hidden: model width; dtype: compute dtype of the rows on the wire.
    """

    def __init__(
        self,
        group: GroupHandle,
        shape: GroupShape,
        expert_map: ExpertMap,
        *,
        hidden: int,
        dtype: torch.dtype,
        num_experts: int,
    ) -> None:
        self.group, self.shape, self.map = group, shape, expert_map
        self.hidden, self.dtype = hidden, dtype
        self.load = ExpertLoad(expert_map.num_moe_layers, num_experts)
        self.set_map(expert_map)
        self._fixed: dict[tuple[int, int], _FixedBuffers] = {}
        self._no_splits = [0] * shape.world_size
        self._plan: StepPlan | None = None
        self._cursor = 0
        self._units: tuple[tuple[int, int], ...] = ()
        self._split_units = 0
        self._open: deque[_Unit] = deque()  # units issued, not yet finished, in issue order
        self.in_bytes = row_bytes(hidden, dtype) + ID_BYTES
        self.out_bytes = row_bytes(hidden, dtype)
        self._nothing_out = torch.empty(0, self.out_bytes, dtype=torch.uint8, device=group.device)
        # Always-on timing (two perf_counter calls per MoE layer): seconds inside dispatch + combine
        # (waiting for the expert ranks included) and the number of MoE layer calls, since `take_timings`.
        self.timings: dict[str, float] = {"exchange_s": 0.0, "layers": 0}

    def set_map(self, expert_map: ExpertMap) -> None:
        """Route by `expert_map` from the next MoE layer call on (called between steps only)."""
        if expert_map.num_expert_ranks != self.shape.expert_ranks:
            raise ValueError(
                f"map for {expert_map.num_expert_ranks} expert ranks, the group has {self.shape.expert_ranks}"
            )
        self.map = expert_map
        dev = self.group.device
        # built on the routing's device straight from the map's host lists (no copy, no read back); without
        # redundant copies an expert's rank depends on the expert alone: one lookup per layer
        self._direct = [
            torch.tensor([owners[0] for owners in layer], dtype=torch.long, device=dev)
            if all(len(owners) == 1 for owners in layer)
            else None
            for layer in expert_map.owners
        ]
        self._tables = []
        for layer in expert_map.owners:
            width = max(len(owners) for owners in layer)
            rows = [list(owners) + [owners[0]] * (width - len(owners)) for owners in layer]  # as ExpertMap.route_table
            copies = [len(owners) for owners in layer]
            self._tables.append((torch.tensor(rows, device=dev), torch.tensor(copies, device=dev)))

    def take_timings(self) -> dict[str, float]:
        """Accumulated dispatch + combine seconds and MoE layer calls since the last call; resets them."""
        out, self.timings = self.timings, {"exchange_s": 0.0, "layers": 0}
        return out

    # ----------------------------------------------------------------- step framing
    def begin(self, plan: StepPlan) -> None:
        self._plan, self._cursor = plan, 0
        self._units = plan.units()
        self._split_units = sum(1 for _, lag in self._units if lag > 1)
        self._open = deque()

    def finish(self) -> None:
        plan = self._plan
        assert plan is not None
        if self._cursor != len(self._units):
            raise RuntimeError(f"step ran {self._cursor} MoE layers, the plan has {len(self._units)}")
        self._settle(len(self._units))
        self._plan = None
        self.load.flush()

    def run_idle(self) -> None:
        """A trunk rank with no tokens still takes part in every exchange of the plan, with empty rows (issued
        ahead as the plan allows; `finish` waits for the last ones)."""
        plan = self._plan
        assert plan is not None
        dev = self.group.device
        empty = Routing(
            torch.empty(0, 1, dtype=torch.long, device=dev), torch.empty(0, 1, dtype=self.dtype, device=dev)
        )
        x = torch.empty(0, self.hidden, dtype=self.dtype, device=dev)
        while self._cursor < len(self._units):
            self.start(self._units[self._cursor][0], x, empty)

    # ----------------------------------------------------------------- the seam
    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return self.start(layer, x_TD, routing).wait()

    def start(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> _Unit:
        """Issue one exchange unit (dispatch, and the combine's receive) without waiting for it; `wait()` on the
        result gives the routed output. Units of the split layers stay in flight up to m at a time."""
        plan = self._plan
        if plan is None or self._cursor >= len(self._units) or self._units[self._cursor][0] != layer:
            raise RuntimeError(f"MoE layer {layer} called out of the step plan's order (lock-step broken)")
        u, lag = self._cursor, self._units[self._cursor][1]
        # the agreed place of an overflow exchange (a2a_protocol): unit u - lag's, before unit u's main exchanges
        self._settle(u - lag + 1 if lag > 1 else u)
        self._cursor += 1
        if routing.num_tokens:
            self.load.add(layer, routing.topk_ids_Tk)
        t0 = time.perf_counter()
        slot = u % lag
        handle, payload, works = self.dispatch(layer, x_TD, routing, plan, slot=slot)
        recv, work = self._combine_start(handle, slot)
        unit = _Unit(self, u, lag, slot, handle, payload, [*works, work], recv)
        self._open.append(unit)
        self.timings["exchange_s"] += time.perf_counter() - t0
        self.timings["layers"] += 1
        return unit

    def _settle(self, before: int) -> None:
        """Finish (wait, then any overflow exchange) every unit in flight whose index is below `before`, in order."""
        while self._open and self._open[0].index < before:
            self._finalize(self._open.popleft())

    def _wait(self, unit: _Unit) -> torch.Tensor:
        if unit.y is None:
            # its overflow exchange may run only once unit index + lag - 1 is issued (or no split unit is left)
            if unit.lag > 1 and self._cursor < min(unit.index + unit.lag, self._split_units):
                raise RuntimeError(
                    f"exchange unit {unit.index} waited on before unit {unit.index + unit.lag - 1} was issued "
                    "(ping-pong order broken)"
                )
            self._settle(unit.index + 1)
        assert unit.y is not None
        return unit.y

    def _finalize(self, unit: _Unit) -> None:
        t0 = time.perf_counter()
        for work in unit.works:
            wait_exchange(self.group, work)
        unit.y = self.combine(unit.handle, unit.payload, unit.recv, slot=unit.slot)
        unit.payload = unit.recv = self._nothing_out  # the buffers may be reused from here on
        unit.works = []
        self.timings["exchange_s"] += time.perf_counter() - t0

    def _destinations(self, layer: int, routing: Routing) -> torch.Tensor:
        """Expert rank of every slot row; a redundant expert's copies share tokens by token index."""
        table, copies = self._tables[layer]
        ids = routing.topk_ids_Tk.reshape(-1)
        direct = self._direct[layer]
        if direct is not None:
            return direct.index_select(0, ids)
        token = torch.arange(ids.shape[0], device=ids.device) // routing.top_k
        return table.index_select(0, ids).gather(1, (token % copies.index_select(0, ids)).unsqueeze(1)).squeeze(1)

    def _fixed_buffers(self, cap: int, slot: int) -> _FixedBuffers:
        """The buffers of capacity `cap` for the `slot`-th unit in flight (ping-pong keeps up to m in flight)."""
        bufs = self._fixed.get((cap, slot))
        if bufs is None:
            bufs = _FixedBuffers(
                self.shape,
                cap,
                hidden=self.hidden,
                dtype=self.dtype,
                in_bytes=self.in_bytes,
                out_bytes=self.out_bytes,
                device=self.group.device,
            )
            self._fixed[cap, slot] = bufs
        return bufs

    def dispatch(
        self, layer: int, x_TD: torch.Tensor, routing: Routing, plan: StepPlan, *, slot: int = 0
    ) -> tuple[DispatchHandle, torch.Tensor, list[dist.Work]]:
        """Send every (token, slot) row to its expert rank, asynchronously.

        Returns the handle, the packed rows (send order) that may still have to go in the fixed mode's
        overflow exchange (on the fixed fast path, where this rank is within C everywhere, nothing is owed and
        the payload is empty), and the work handles of the sends (their buffers stay untouched until waited on).
        `slot`: which of the units in flight (its own fixed-mode buffers).
        """
        x = self.shape.expert_ranks
        dest = self._destinations(layer, routing)
        # counted on the device (bincount's output size would need max(dest) on the host)
        counts_t = dest.new_zeros(x).index_add_(0, dest, torch.ones_like(dest))
        if plan.mode == FIXED:
            bufs = self._fixed_buffers(plan.capacity, slot)
            if bufs.rows is not None:
                return self._dispatch_fixed_fast(x_TD, routing, dest, counts_t, plan.capacity, bufs)
        counts = counts_t.tolist()  # the variable mode's host read: all_to_all_single's split sizes
        order = torch.argsort(dest, stable=True)
        k = max(routing.top_k, 1)
        order = order.to(x_TD.device)
        payload = pack_rows(x_TD[order // k], routing.topk_ids_Tk.reshape(-1)[order])
        if plan.mode == FIXED:
            sent = [min(c, plan.capacity) for c in counts]
            works = [self._send_fixed(payload, counts, sent, plan.capacity, slot)]
        else:
            sent = counts
            w = self.shape.world_size
            # the counts exchange, issued without waiting: this rank needs nothing from it (it only sends)
            sizes = torch.tensor([0] * self.shape.trunk_ranks + counts, dtype=torch.int64, device=self.group.device)
            _, counts_work = exchange_start(self.group, sizes, send_splits=[1] * w, recv_splits=[1] * w)
            _, rows_work = exchange_start(
                self.group, payload, send_splits=[0] * self.shape.trunk_ranks + counts, recv_splits=self._no_splits
            )
            works = [counts_work, rows_work]
        handle = DispatchHandle(routing, order, tuple(counts), tuple(sent), plan.mode, plan.capacity)
        return handle, payload, works

    def _dispatch_fixed_fast(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        dest: torch.Tensor,
        counts_t: torch.Tensor,
        cap: int,
        bufs: _FixedBuffers,
    ) -> tuple[DispatchHandle, torch.Tensor, list[dist.Work]]:
        """Fixed mode: rows go straight from the tokens into their buffer slots (no sort, no packed copy,
        no host read). Same bytes in the header and counted rows as `_send_fixed`; rows past C go to the
        sink row and wait for the extra exchange (`combine`)."""
        x = self.shape.expert_ranks
        # slot row r goes to row dest[r] * (C + 1) + (1-based running count of dest[r] up to r): its
        # expert rank's block, after the header, in slot order (= the stable sort order of `dispatch`)
        running = torch.nn.functional.one_hot(dest, x).cumsum(0).gather(1, dest.unsqueeze(1)).squeeze(1)
        src = torch.where(running <= cap, bufs.block[dest] + running, bufs.sink)
        assert bufs.rows is not None and bufs.ids is not None
        bufs.rows.index_copy_(0, src, x_TD.repeat_interleave(max(routing.top_k, 1), dim=0))
        bufs.ids.index_copy_(0, src, routing.topk_ids_Tk.reshape(-1, 1).to(torch.int32))
        bufs.counts.copy_(counts_t.view(torch.uint8).view(x, 8))
        bufs.flags.copy_((counts_t > cap).any().to(torch.uint8).expand(x))  # this rank overflowed somewhere
        _, work = exchange_start(self.group, bufs.send, send_splits=bufs.send_splits, recv_splits=self._no_splits)
        handle = DispatchHandle(routing, None, (), (), FIXED, cap, src, counts_t, x_TD, dest)
        return handle, bufs.owed, [work]

    def _send_fixed(self, payload: torch.Tensor, counts: list[int], sent: list[int], cap: int, slot: int) -> dist.Work:
        x = self.shape.expert_ranks
        bufs = self._fixed_buffers(cap, slot)
        buf = bufs.send.view(x, cap + 1, self.in_bytes)
        overflowed = any(c > cap for c in counts)
        write_headers(buf[:, 0], counts=torch.tensor(counts, dtype=torch.int64), flag=overflowed)
        start = 0
        for j in range(x):
            buf[j, 1 : 1 + sent[j]] = payload[start : start + sent[j]]
            start += counts[j]
        _, work = exchange_start(self.group, bufs.send, send_splits=bufs.send_splits, recv_splits=self._no_splits)
        return work

    def _combine_start(self, handle: DispatchHandle, slot: int) -> tuple[torch.Tensor, dist.Work]:
        """Issue the combine's main receive: the fixed buffers' answer rows, or the variable mode's counted rows."""
        if handle.mode == FIXED:
            bufs = self._fixed_buffers(handle.capacity, slot)
            return exchange_start(
                self.group, self._nothing_out, send_splits=self._no_splits, recv_splits=bufs.recv_splits, out=bufs.recv
            )
        d = self.shape.trunk_ranks
        return exchange_start(
            self.group, self._nothing_out, send_splits=self._no_splits, recv_splits=[0] * d + list(handle.counts_X)
        )

    def combine(self, handle: DispatchHandle, payload: torch.Tensor, recv: torch.Tensor, *, slot: int) -> torch.Tensor:
        """After the main receive (`_combine_start`, waited on): the overflow exchange if any pair needs it,
        then restore slot order, weight and sum each token's slots."""
        d, x = self.shape.trunk_ranks, self.shape.expert_ranks
        r = handle.routing.topk_ids_Tk.numel()
        nothing = self._nothing_out
        if handle.mode == FIXED:
            cap = handle.capacity
            bufs = self._fixed_buffers(cap, slot)
            overflow = read_overflow(bufs.answer_flags)  # the decode step's one host read per MoE layer
            if handle.src_R is not None:
                if overflow:
                    return self._combine_overflow(handle, bufs)
                if r == 0:
                    return bufs.answers.new_zeros((handle.routing.num_tokens, self.hidden))
                # one gather: the answers sit in the dispatch layout, src_R maps slot rows to buffer rows
                return combine_slots(bufs.answers.index_select(0, handle.src_R), routing=handle.routing)
            recv = bufs.recv.view(x, cap + 1, self.out_bytes)
            parts = [recv[j, 1 : 1 + handle.sent_X[j]] for j in range(x)]
            if overflow:
                extra = [c - s for c, s in zip(handle.counts_X, handle.sent_X)]
                starts = [sum(handle.counts_X[:j]) + handle.sent_X[j] for j in range(x)]
                rest = torch.cat([payload[starts[j] : starts[j] + extra[j]] for j in range(x)])
                exchange(self.group, rest, send_splits=[0] * d + extra, recv_splits=self._no_splits)
                back = exchange(self.group, nothing, send_splits=self._no_splits, recv_splits=[0] * d + extra)
                offs = [sum(extra[:j]) for j in range(x)]
                parts = [torch.cat([parts[j], back[offs[j] : offs[j] + extra[j]]]) for j in range(x)]
            out_bytes = torch.cat(parts) if parts else nothing
        else:
            out_bytes = recv
        y_sorted = out_bytes.reshape(-1).view(self.dtype).view(r, self.hidden)
        if r == 0:
            return y_sorted.new_zeros((handle.routing.num_tokens, self.hidden))
        assert handle.order_R is not None
        y_slots = torch.empty_like(y_sorted)
        y_slots[handle.order_R] = y_sorted
        return combine_slots(y_slots, routing=handle.routing)

    def _combine_overflow(self, handle: DispatchHandle, bufs: _FixedBuffers) -> torch.Tensor:
        """Fixed mode after a dispatch with typed views, when some pair of the group overflowed C: now (and
        only now) this rank's counts are read on the host. A rank within C everywhere takes part in the
        extra exchanges owing nothing; one past C sends its rows past C (slot order per expert rank, as
        `_send_fixed` leaves them) and takes their answers back."""
        d, x = self.shape.trunk_ranks, self.shape.expert_ranks
        cap, routing, nothing = handle.capacity, handle.routing, self._nothing_out
        assert handle.counts_t is not None and handle.rows_TD is not None and handle.src_R is not None
        counts = handle.counts_t.tolist()
        if max(counts, default=0) <= cap:
            zeros = [0] * self.shape.world_size
            exchange(self.group, bufs.owed, send_splits=zeros, recv_splits=zeros)
            exchange(self.group, nothing, send_splits=zeros, recv_splits=zeros)
            if routing.topk_ids_Tk.numel() == 0:
                return bufs.answers.new_zeros((routing.num_tokens, self.hidden))
            return combine_slots(bufs.answers.index_select(0, handle.src_R), routing=routing)
        assert handle.dest_R is not None
        sent = [min(c, cap) for c in counts]
        extra = [c - n for c, n in zip(counts, sent)]
        order = torch.argsort(handle.dest_R, stable=True)  # by expert rank, slot order within (as `dispatch`)
        k = max(routing.top_k, 1)
        payload = pack_rows(handle.rows_TD[order // k], routing.topk_ids_Tk.reshape(-1)[order])
        starts = [sum(counts[:j]) + sent[j] for j in range(x)]
        rest = torch.cat([payload[starts[j] : starts[j] + extra[j]] for j in range(x)])
        exchange(self.group, rest, send_splits=[0] * d + extra, recv_splits=self._no_splits)
        back = exchange(self.group, nothing, send_splits=self._no_splits, recv_splits=[0] * d + extra)
        recv = bufs.recv.view(x, cap + 1, self.out_bytes)
        offs = [sum(extra[:j]) for j in range(x)]
        parts = [torch.cat([recv[j, 1 : 1 + sent[j]], back[offs[j] : offs[j] + extra[j]]]) for j in range(x)]
        y_sorted = torch.cat(parts).reshape(-1).view(self.dtype).view(-1, self.hidden)
        y_slots = torch.empty_like(y_sorted)
        y_slots[order] = y_sorted
        return combine_slots(y_slots, routing=routing)
