"""An expert rank's core: holds its expert shard and serves the MoE exchanges of each step.

Plain Python (no Ray; the actor in replicas/actors.py wraps it). Per step it walks the plan's
MoE layers in order, receives the rows the trunk ranks send (replicas/a2a_protocol.py), runs
its experts, and sends the outputs back; a step in which no row arrives still takes part in
every exchange. Must not hold model math (that is model_shards.experts.ExpertShard).
Tests: tests/replicas/test_dispatch.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.process_groups import GroupHandle
from cluster.topology import GroupShape
from model_shards.experts import ExpertShard
from replicas.a2a_protocol import FIXED, StepPlan, exchange, exchange_counts, read_headers, row_bytes, unpack_rows


@dataclass(frozen=True)
class ExpertStepStats:
    rows: int  # routed rows computed this step, all layers
    compute_s: float
    total_s: float


class ExpertRank:
    """Serves steps for one expert shard.

    Args:
        shard: the experts this rank holds (every MoE layer).
        group: process-group handle; shape: D and X of the group.
    """

    def __init__(self, shard: ExpertShard, group: GroupHandle, shape: GroupShape, *, hidden: int,
                 dtype: torch.dtype) -> None:
        self.shard, self.group, self.shape = shard, group, shape
        self.hidden, self.dtype = hidden, dtype
        self.in_bytes = row_bytes(hidden, dtype) + 4
        self.out_bytes = row_bytes(hidden, dtype)
        self.rows_per_layer = torch.zeros(len(shard.layers), dtype=torch.int64)
        # fixed mode: per-capacity receive / send buffers and split lists, reused across layers and steps
        self._fixed: dict[int, tuple[torch.Tensor, torch.Tensor, list[int], list[int]]] = {}
        dev = group.device
        self._no_rows_in = torch.empty(0, self.in_bytes, dtype=torch.uint8, device=dev)

    @torch.inference_mode()
    def serve(self, plan: StepPlan) -> ExpertStepStats:
        t0 = time.perf_counter()
        rows = 0
        compute = 0.0
        for layer in plan.moe_layers:
            n, c = self._fixed_layer(layer, plan.capacity) if plan.mode == FIXED else self._variable_layer(layer)
            rows += n
            compute += c
        return ExpertStepStats(rows=rows, compute_s=compute, total_s=time.perf_counter() - t0)

    def _compute(self, layer: int, buf: torch.Tensor) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        x, ids = unpack_rows(buf, hidden=self.hidden, dtype=self.dtype)
        self.rows_per_layer[layer] += x.shape[0]
        y = self.shard.forward(layer, x, ids) if x.shape[0] else x
        return y.contiguous().reshape(-1).view(torch.uint8).view(-1, self.out_bytes), time.perf_counter() - t0

    def _variable_layer(self, layer: int) -> tuple[int, float]:
        d, w = self.shape.trunk_ranks, self.shape.world_size
        recv_counts = exchange_counts(self.group, [0] * w)
        dev = self.group.device
        rows = exchange(self.group, torch.empty(0, self.in_bytes, dtype=torch.uint8, device=dev),
                        send_splits=[0] * w, recv_splits=recv_counts)
        out, secs = self._compute(layer, rows)
        exchange(self.group, out, send_splits=recv_counts[:d] + [0] * (w - d), recv_splits=[0] * w)
        return rows.shape[0], secs

    def _fixed_buffers(self, cap: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """(recv [D * (C + 1), in_bytes], send [D * (C + 1), out_bytes], recv splits, send splits) for capacity C.

        The send buffer's header rows stay zero but for byte 0 (the flag); padding rows keep stale bytes
        (the trunk reads only the counted rows).
        """
        bufs = self._fixed.get(cap)
        if bufs is None:
            d, x, dev = self.shape.trunk_ranks, self.shape.expert_ranks, self.group.device
            rows = d * (cap + 1)
            bufs = (torch.zeros(rows, self.in_bytes, dtype=torch.uint8, device=dev),
                    torch.zeros(rows, self.out_bytes, dtype=torch.uint8, device=dev),
                    [cap + 1] * d + [0] * x, [cap + 1] * d + [0] * x)
            self._fixed[cap] = bufs
        return bufs

    def _fixed_layer(self, layer: int, cap: int) -> tuple[int, float]:
        d, x, w = self.shape.trunk_ranks, self.shape.expert_ranks, self.shape.world_size
        dev = self.group.device
        recv_buf, back_buf, recv_splits, send_splits = self._fixed_buffers(cap)
        exchange(self.group, self._no_rows_in, send_splits=[0] * w, recv_splits=recv_splits, out=recv_buf)
        recv = recv_buf.view(d, cap + 1, self.in_bytes)
        counts, flags = read_headers(recv[:, 0])
        overflow = any(flags)
        sent = [min(c, cap) for c in counts]
        rows_in = recv[0, 1:1 + sent[0]] if d == 1 else torch.cat([recv[t, 1:1 + sent[t]] for t in range(d)])
        out, secs = self._compute(layer, rows_in)
        back = back_buf.view(d, cap + 1, self.out_bytes)
        back[:, 0, 0] = int(overflow)  # combine header: the group-wide overflow flag
        start = 0
        for t in range(d):
            back[t, 1:1 + sent[t]] = out[start:start + sent[t]]
            start += sent[t]
        exchange(self.group, back_buf, send_splits=send_splits, recv_splits=[0] * w)
        rows = sum(sent)
        if overflow:
            extra = [c - s for c, s in zip(counts, sent)]
            rest = exchange(self.group, torch.empty(0, self.in_bytes, dtype=torch.uint8, device=dev),
                            send_splits=[0] * w, recv_splits=extra + [0] * x)
            out2, secs2 = self._compute(layer, rest)
            exchange(self.group, out2, send_splits=extra + [0] * x, recv_splits=[0] * w)
            rows += rest.shape[0]
            secs += secs2
        return rows, secs
