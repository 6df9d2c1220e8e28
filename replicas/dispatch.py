"""The dispatch/combine seam of a trunk rank: local (the reference) and all-to-all.

Both are `RoutedExperts` callables `(moe_layer, x_TD, routing) -> y_TD` that the trunk calls
once per MoE layer, and both keep expert-load statistics (tokens per expert per MoE layer).
- `LocalDispatcher`: every expert in-process (`--expert-ranks 0`); the oracle.
- `AllToAllDispatcher`: rows go to the expert ranks owning their experts over
  torch.distributed (wire format in replicas/a2a_protocol.py) and come back weighted and
  slot-summed here, exactly as the local path combines them.
Legend: T tokens, k top-k, R = T * k routed rows, X expert ranks, D trunk ranks.
Tests: tests/replicas/test_dispatch.py (all-to-all vs local on the same inputs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle
from cluster.topology import GroupShape
from model_shards.experts import ExpertShard, local_routed_experts
from model_shards.moe import Routing, combine_slots
from replicas.a2a_protocol import (
    FIXED, StepPlan, combine_flags, exchange, exchange_counts, pack_rows, row_bytes, write_headers,
)


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer since the last reset (cheap: one bincount per layer)."""

    def __init__(self, num_moe_layers: int, num_experts: int) -> None:
        self.counts = torch.zeros(num_moe_layers, num_experts, dtype=torch.int64)

    def add(self, layer: int, topk_ids_Tk: torch.Tensor) -> None:
        self.counts[layer] += torch.bincount(topk_ids_Tk.reshape(-1).cpu(), minlength=self.counts.shape[1])

    def take(self) -> torch.Tensor:
        out, self.counts = self.counts, torch.zeros_like(self.counts)
        return out


class Dispatcher(Protocol):
    """What a trunk rank needs of its seam: the per-layer call, step framing, and load counters."""

    load: ExpertLoad

    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor: ...

    def begin(self, plan: StepPlan) -> None: ...

    def finish(self) -> None: ...

    def run_idle(self) -> None: ...


class LocalDispatcher:
    """All experts in this process: repeat rows per slot, expert FFN, weight and slot-sum.

    It has no peers, so step framing is a no-op.
    """

    def __init__(self, shard: ExpertShard, *, num_moe_layers: int) -> None:
        self.shard = shard
        self.load = ExpertLoad(num_moe_layers, shard.num_experts)

    def begin(self, plan: StepPlan) -> None:
        pass

    def finish(self) -> None:
        pass

    def run_idle(self) -> None:
        pass

    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        self.load.add(layer, routing.topk_ids_Tk)
        return local_routed_experts(self.shard, layer, x_TD, routing)


@dataclass(frozen=True)
class DispatchHandle:
    """What `dispatch` sent, so `combine` can bring the rows back into slot order.

    Attributes:
        routing: the layer's routing (weights are applied at combine).
        order_R: send order -> slot row (row t*k + j is token t, slot j).
        counts_X: rows sent to each expert rank (all of them, capacity or not).
        sent_X: rows that went in the main exchange (min(count, C) in fixed mode).
        overflow: fixed mode only: some pair in the group exceeded C (decided by the headers).
        src_R: fixed mode, when this rank overflowed nowhere: slot row -> its row in the [X * (C + 1)]
            exchange buffer (the combine answer comes back in the dispatch layout), so combine is one
            gather; None otherwise.
    """

    routing: Routing
    order_R: torch.Tensor
    counts_X: tuple[int, ...]
    sent_X: tuple[int, ...]
    mode: str
    capacity: int
    src_R: torch.Tensor | None = None


class AllToAllDispatcher:
    """Trunk side of the expert all-to-all.

    Args:
        group: this rank's process-group handle.
        shape: D and X of the group.
        expert_map: which expert rank owns which expert, per MoE layer.
        hidden: model width; dtype: compute dtype of the rows on the wire.
    """

    def __init__(self, group: GroupHandle, shape: GroupShape, expert_map: ExpertMap, *, hidden: int,
                 dtype: torch.dtype, num_experts: int) -> None:
        self.group, self.shape, self.map = group, shape, expert_map
        self.hidden, self.dtype = hidden, dtype
        self.load = ExpertLoad(expert_map.num_moe_layers, num_experts)
        self._tables = [expert_map.route_table(layer) for layer in range(expert_map.num_moe_layers)]
        # without redundant copies an expert's rank depends on the expert alone: one lookup per layer
        self._direct = [table[:, 0].clone() if bool((copies == 1).all()) else None for table, copies in self._tables]
        # fixed mode: per-capacity exchange buffers and split lists, reused across layers and steps
        # (padding rows keep stale bytes; receivers read only the header and the counted rows)
        self._fixed: dict[int, tuple[torch.Tensor, torch.Tensor, list[int], list[int], torch.Tensor]] = {}
        self._plan: StepPlan | None = None
        self._cursor = 0
        self.in_bytes = row_bytes(hidden, dtype) + 4
        self.out_bytes = row_bytes(hidden, dtype)
        # Always-on timing (two perf_counter calls per MoE layer): seconds inside dispatch + combine
        # (waiting for the expert ranks included) and the number of MoE layer calls, since `take_timings`.
        self.timings: dict[str, float] = {"exchange_s": 0.0, "layers": 0}

    def take_timings(self) -> dict[str, float]:
        """Accumulated dispatch + combine seconds and MoE layer calls since the last call; resets them."""
        out, self.timings = self.timings, {"exchange_s": 0.0, "layers": 0}
        return out

    # ----------------------------------------------------------------- step framing
    def begin(self, plan: StepPlan) -> None:
        self._plan, self._cursor = plan, 0

    def finish(self) -> None:
        plan = self._plan
        assert plan is not None
        if self._cursor != len(plan.moe_layers):
            raise RuntimeError(f"step ran {self._cursor} MoE layers, the plan has {len(plan.moe_layers)}")
        self._plan = None

    def run_idle(self) -> None:
        """A trunk rank with no tokens still takes part in every exchange of the plan, with empty rows."""
        plan = self._plan
        assert plan is not None
        dev = self.group.device
        empty = Routing(torch.empty(0, 1, dtype=torch.long, device=dev), torch.empty(0, 1, dtype=self.dtype, device=dev))
        while self._cursor < len(plan.moe_layers):
            self(plan.moe_layers[self._cursor], torch.empty(0, self.hidden, dtype=self.dtype, device=dev), empty)

    # ----------------------------------------------------------------- the seam
    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        plan = self._plan
        if plan is None or self._cursor >= len(plan.moe_layers) or plan.moe_layers[self._cursor] != layer:
            raise RuntimeError(f"MoE layer {layer} called out of the step plan's order (lock-step broken)")
        self._cursor += 1
        if routing.num_tokens:
            self.load.add(layer, routing.topk_ids_Tk)
        t0 = time.perf_counter()
        handle, payload = self.dispatch(layer, x_TD, routing, plan)
        y = self.combine(handle, payload)
        self.timings["exchange_s"] += time.perf_counter() - t0
        self.timings["layers"] += 1
        return y

    def _destinations(self, layer: int, routing: Routing) -> torch.Tensor:
        """Expert rank of every slot row; a redundant expert's copies share tokens by token index."""
        table, copies = self._tables[layer]
        ids = routing.topk_ids_Tk.reshape(-1).cpu()
        direct = self._direct[layer]
        if direct is not None:
            return direct[ids]
        token = torch.arange(ids.shape[0]) // routing.top_k
        return table[ids, token % copies[ids]]

    def dispatch(self, layer: int, x_TD: torch.Tensor, routing: Routing, plan: StepPlan
                 ) -> tuple[DispatchHandle, torch.Tensor]:
        """Send every (token, slot) row to its expert rank; returns the handle and this rank's packed rows."""
        x = self.shape.expert_ranks
        dest = self._destinations(layer, routing)
        order = torch.argsort(dest, stable=True)
        counts = torch.bincount(dest, minlength=x).tolist() if dest.numel() else [0] * x
        k = max(routing.top_k, 1)
        order = order.to(x_TD.device)
        payload = pack_rows(x_TD[order // k], routing.topk_ids_Tk.reshape(-1)[order])
        src = None
        if plan.mode == FIXED:
            sent = [min(c, plan.capacity) for c in counts]
            src = self._send_fixed(payload, counts, sent, plan.capacity, order)
        else:
            sent = counts
            exchange_counts(self.group, [0] * self.shape.trunk_ranks + counts)
            exchange(self.group, payload, send_splits=[0] * self.shape.trunk_ranks + counts,
                     recv_splits=[0] * self.shape.world_size)
        handle = DispatchHandle(routing, order, tuple(counts), tuple(sent), plan.mode, plan.capacity, src)
        return handle, payload

    def _fixed_buffers(self, cap: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], torch.Tensor]:
        """(send [X * (C + 1), in_bytes], recv [X * (C + 1), out_bytes], send splits, recv splits,
        [X] first-row index of each expert rank's block) for capacity C, made once per C."""
        bufs = self._fixed.get(cap)
        if bufs is None:
            d, x, dev = self.shape.trunk_ranks, self.shape.expert_ranks, self.group.device
            rows = x * (cap + 1)
            bufs = (torch.zeros(rows, self.in_bytes, dtype=torch.uint8, device=dev),
                    torch.zeros(rows, self.out_bytes, dtype=torch.uint8, device=dev),
                    [0] * d + [cap + 1] * x, [0] * d + [cap + 1] * x, torch.arange(x) * (cap + 1) + 1)
            self._fixed[cap] = bufs
        return bufs

    def _send_fixed(self, payload: torch.Tensor, counts: list[int], sent: list[int], cap: int,
                    order: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fill the send buffer (header row + up to C rows per expert rank) and run the dispatch exchange.

        Returns slot row -> buffer row (see `DispatchHandle.src_R`) when nothing overflowed and `order` is
        given, else None.
        """
        x = self.shape.expert_ranks
        send, _, splits, _, first_row = self._fixed_buffers(cap)
        buf = send.view(x, cap + 1, self.in_bytes)
        overflowed = any(c > cap for c in counts)
        write_headers(buf[:, 0], counts=torch.tensor(counts, dtype=torch.int64), flag=overflowed)
        src = None
        if not overflowed:
            # sorted row i of expert rank j (rows grouped by rank) goes to buffer row first_row[j] + i - start[j]
            counts_t = torch.tensor(counts, dtype=torch.int64)
            pos = torch.arange(payload.shape[0]) + (first_row - (torch.cumsum(counts_t, 0) - counts_t)).repeat_interleave(counts_t)
            pos = pos.to(send.device)
            send.index_copy_(0, pos, payload)
            if order is not None:
                src = torch.empty_like(pos)
                src[order] = pos
        else:
            start = 0
            for j in range(x):
                buf[j, 1:1 + sent[j]] = payload[start:start + sent[j]]
                start += counts[j]
        exchange(self.group, send, send_splits=splits, recv_splits=[0] * self.shape.world_size)
        return src

    def combine(self, handle: DispatchHandle, payload: torch.Tensor) -> torch.Tensor:
        """Receive the expert outputs, restore slot order, weight and sum each token's slots."""
        d, x = self.shape.trunk_ranks, self.shape.expert_ranks
        r = len(handle.order_R)
        nothing = payload.new_empty((0, self.out_bytes))
        if handle.mode == FIXED:
            cap = handle.capacity
            _, recv_buf, _, recv_splits, _ = self._fixed_buffers(cap)
            exchange(self.group, nothing, send_splits=[0] * self.shape.world_size, recv_splits=recv_splits,
                     out=recv_buf)
            recv = recv_buf.view(x, cap + 1, self.out_bytes)
            flags = combine_flags(recv[:, 0])
            if handle.src_R is not None and not any(flags):
                if r == 0:
                    return recv_buf.view(self.dtype).new_zeros((handle.routing.num_tokens, self.hidden))
                # one gather: the answers sit in the dispatch layout, src_R maps slot rows to buffer rows
                y_slots = recv_buf.view(self.dtype).index_select(0, handle.src_R)
                return combine_slots(y_slots, routing=handle.routing)
            parts = [recv[j, 1:1 + handle.sent_X[j]] for j in range(x)]
            if any(flags):
                extra = [c - s for c, s in zip(handle.counts_X, handle.sent_X)]
                starts = [sum(handle.counts_X[:j]) + handle.sent_X[j] for j in range(x)]
                rest = torch.cat([payload[starts[j]:starts[j] + extra[j]] for j in range(x)])
                exchange(self.group, rest, send_splits=[0] * d + extra, recv_splits=[0] * self.shape.world_size)
                back = exchange(self.group, nothing, send_splits=[0] * self.shape.world_size, recv_splits=[0] * d + extra)
                offs = [sum(extra[:j]) for j in range(x)]
                parts = [torch.cat([parts[j], back[offs[j]:offs[j] + extra[j]]]) for j in range(x)]
            out_bytes = torch.cat(parts) if parts else nothing
        else:
            out_bytes = exchange(self.group, nothing, send_splits=[0] * self.shape.world_size, recv_splits=[0] * d + list(handle.counts_X))
        y_sorted = out_bytes.reshape(-1).view(self.dtype).view(r, self.hidden)
        if r == 0:
            return y_sorted.new_zeros((handle.routing.num_tokens, self.hidden))
        y_slots = torch.empty_like(y_sorted)
        y_slots[handle.order_R] = y_sorted
        return combine_slots(y_slots, routing=handle.routing)
