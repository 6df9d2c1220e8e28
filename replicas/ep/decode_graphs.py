"""CUDA graphs for decode steps of the in-process runner: batch-size buckets, static buffers, capture at start.

A decode step (every sequence one token on a cached state) runs the whole trunk forward, experts included, as
one replayed CUDA graph instead of thousands of kernel launches from Python. Buckets are (rows, key tiles):
rows in powers of two up to the runner's sequence slots (and the slot count itself), key tiles
(`paged_attention.key_tile` positions each) in powers of four up to the longest context the pools hold. A
step takes the smallest bucket that fits its sequences and its longest context; everything else runs eager:
prefill chunks, speculative verification, a step with more sequences or a longer context than the largest
bucket, explicit MRoPE positions, vision rows, or the eager attention oracle.

Static buffers, shared by every bucket: a [max rows, 7] int64 block (token id, three position axes, KV slot,
state slot, key count per row) filled from the host once per step (one host-to-device copy), and a
[max rows, max blocks] block table filled from the step's batch on the device. The rows past a step's
sequences (padding) are one token at position 0 on the canary's reserved KV block and state slot
(trunk_rank.py `CANARY_RESERVE`), whose state is zeroed at the start of every replay: padding writes no real
sequence's KV or DeltaNet state (stale block-table entries are only ever read, then masked). The layers see a
`StepBatch` with `FixedDecode` (model_shards/batch.py): attention reads a fixed number of key tiles per row
(`paged_attention.fixed_decode_attention`), DeltaNet gathers and scatters its state slots; no shape depends on
a value and nothing is read on the host inside the step (tests/replicas/test_decode_graphs.py proves it under
FakeTensorMode). Outputs (logits, final hidden states, each MoE layer's routing ids) land in static buffers
shared by all buckets; the expert-load counters count the real rows' routing ids after each replay.
Sampling, penalties, grammar masks and logprobs stay outside the graph (trunk_rank.py `_sample`), as do MTP
drafting and verification.

Capture (a real CUDA device): each bucket is warmed up on a side stream, then captured with
`torch.cuda.CUDAGraph` into one memory pool shared by all buckets, largest first (only one bucket replays at a
time and its outputs are copied to the shared buffers, so their temporaries may overlap). A capture that fails
(e.g. a kernel that syncs with the host) leaves graphs off, with the reason in `disabled`. Without a real CUDA
device (CPU, FakeTensors) the same static-buffer path runs eagerly ("static" mode): "replay" calls the
captured function on the static buffers, which is how CI proves padding and bucketing change no token.

Trunk ranks inside expert-parallel groups do not use this yet. What stands in the way:
- Collectives inside the graph: NCCL all-to-all can be captured only with split sizes fixed at capture, so
  only the fixed-capacity exchange (a2a_protocol FIXED mode, capacity from the bucket's rows) qualifies; the
  variable mode's count exchange hands host ints to `all_to_all_single`.
- The overflow read: after each MoE layer's combine the trunk reads the group-wide overflow flag on the host
  (`a2a_protocol.read_overflow`) to decide whether an extra exchange follows; a graph cannot branch on it.
  Capturing needs either a capacity that never overflows (C = rows x top-k) or the graph cut at each MoE
  layer (attention and experts as separate graphs, the read between them).
- Every rank of the group must replay the same bucket in the same step: the step plan (and the expert
  ranks' step header) would have to carry the bucket, and expert ranks would need graphs of their own
  compute for it, whose row counts come from the exchange.
- Ping-pong micro-batches (`Trunk.forward_split`) overlap exchanges on other streams; capture would need
  those streams forked and joined inside the graph.
- Process-group watchdogs and the collective deadline (cluster/process_groups.py) see a replay as one long
  opaque wait; a rank failure inside it cannot be attributed to a layer.
Tests: tests/replicas/test_decode_graphs.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from model_shards.batch import FixedDecode, SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.experts import local_routed_experts
from model_shards.moe import Routing
from model_shards.paged_attention import key_tile
from model_shards.trunk import Trunk, TrunkOutput
from replicas.ep.dispatch import LocalDispatcher

log = logging.getLogger(__name__)

ROW_GROWTH = 2  # row buckets 1, 2, 4, ... (and the slot count)
TILE_GROWTH = 4  # key-tile buckets 1, 4, 16, ... (and the longest context's)
_TOKEN, _POS, _KV_SLOT, _STATE_SLOT, _KEYS = 0, 1, 4, 5, 6  # columns of the static [rows, 7] block
_COLS = 7


def buckets(limit: int, growth: int) -> tuple[int, ...]:
    """1, growth, growth^2, ... below `limit`, then `limit` itself."""
    if limit < 1:
        raise ValueError(f"a bucket limit must be >= 1, got {limit}")
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= growth
    return (*out, limit)


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@dataclass
class _Bucket:
    rows: int
    tiles: int
    batch: StepBatch  # views of the shared static buffers
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = 0


@dataclass
class GraphStats:
    """Decode steps that replayed a bucket, and those that fell back to eager (by reason)."""

    replays: int = 0
    eager: dict[str, int] = field(default_factory=dict)


class DecodeGraphs:
    """Bucketed decode forwards of one trunk rank with every expert local (the in-process runner).

    Args:
        trunk: the trunk (paged attention).
        pools: the rank's pools, the canary's block and slot included.
        routed: the local experts (their load counters count real rows only).
        max_rows: the most sequences a step may hold (the runner's state slots).
        max_keys: the longest context (keys) a sequence may reach.
        pad_block, pad_slot: the KV block and state slot padding rows use (the canary's reserved ones).
        capture: capture CUDA graphs (a real CUDA device); False runs the same static-buffer path eagerly.
    """

    def __init__(
        self,
        trunk: Trunk,
        pools: CachePools,
        routed: LocalDispatcher,
        *,
        max_rows: int,
        max_keys: int,
        pad_block: int,
        pad_slot: int,
        capture: bool,
    ) -> None:
        if trunk.attention != "paged":
            raise ValueError(f"decode graphs need the paged attention, not {trunk.attention!r}")
        self.trunk, self.pools, self.routed = trunk, pools, routed
        self.pad_block, self.pad_slot = pad_block, pad_slot
        self.capture_graphs = capture
        self.device = pools.k.device
        bs = pools.block_size
        self.key_tile = key_tile(bs)
        self.blocks_per_tile = self.key_tile // bs
        self.row_buckets = buckets(max_rows, ROW_GROWTH)
        self.tile_buckets = buckets(-(-max_keys // self.key_tile), TILE_GROWTH)
        self.max_rows, self.max_tiles = self.row_buckets[-1], self.tile_buckets[-1]
        self.stats = GraphStats()
        self.disabled: str | None = None  # why graphs are off after a failed capture
        cfg, dev = trunk.cfg, self.device
        self._moe_layers = range(cfg.num_layers)  # decoder layer i's MoE is MoE layer i (MTP layers follow)
        self._pad_row = [0, 0, 0, 0, pad_block * bs, pad_slot, 1]
        self._small = torch.tensor([self._pad_row] * self.max_rows, dtype=torch.long, device=dev)
        self._tables = torch.full(
            (self.max_rows, self.max_tiles * self.blocks_per_tile), pad_block, dtype=torch.long, device=dev
        )
        self._logits = torch.zeros(self.max_rows, cfg.vocab_size, dtype=torch.float32, device=dev)
        self._hidden = torch.zeros(self.max_rows, cfg.hidden_size, dtype=trunk.dtype, device=dev)
        self._ids = torch.zeros(cfg.num_layers, self.max_rows, cfg.num_experts_per_tok, dtype=torch.long, device=dev)
        self._arange = torch.arange(self.max_rows, dtype=torch.long, device=dev)
        self._buckets = {(r, t): self._bucket(r, t) for r in self.row_buckets for t in self.tile_buckets}
        self._pool: tuple[int, int] | None = None

    def _bucket(self, rows: int, tiles: int) -> _Bucket:
        s = self._small[:rows]
        batch = StepBatch(
            token_ids_T=s[:, _TOKEN],
            positions_3T=s[:, _POS : _POS + 3].t(),
            query_lens=(1,) * rows,
            context_lens=(1,) * rows,  # placeholders: the key counts live on the device
            state_slots_B=s[:, _STATE_SLOT],
            block_tables_BN=self._tables[:rows, : tiles * self.blocks_per_tile],
            slot_mapping_T=s[:, _KV_SLOT],
            block_size=self.pools.block_size,
            logit_rows=self._arange[:rows],
            fixed_decode=FixedDecode(key_counts_B=s[:, _KEYS], tiles=tiles),
        )
        return _Bucket(rows, tiles, batch)

    # ------------------------------------------------------------------ the captured function
    def _body(self, b: _Bucket) -> None:
        """The bucket's forward on the static buffers, outputs into the shared output buffers."""
        pools = self.pools
        pools.conv[:, self.pad_slot].zero_()  # padding rows start from a zero state every replay (finite values)
        pools.recurrent[:, self.pad_slot].zero_()
        out = self.trunk.forward(b.batch, pools=pools, routed=self._experts)
        self._logits[: b.rows].copy_(out.logits_RV)
        self._hidden[: b.rows].copy_(out.hidden_TD)

    def _experts(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The local experts, with the routing ids kept in a static buffer (counted after the replay, real rows
        only: padding never reaches the expert-load statistics)."""
        self._ids[layer, : x_TD.shape[0]].copy_(routing.topk_ids_Tk)
        return local_routed_experts(self.routed.shard, layer, x_TD, routing)

    # ------------------------------------------------------------------ capture
    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (a real CUDA device only), largest first; a failure leaves graphs off."""
        if not self.capture_graphs or self.disabled is not None:
            return
        try:
            self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            for key in sorted(self._buckets, reverse=True):
                b = self._buckets[key]
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, autotuning, workspaces
                    for _ in range(2):
                        self._body(b)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._body(b)
                b.graph = graph
            torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001  # any capture failure: serve eager rather than not at all
            self.disabled = f"{type(exc).__name__}: {str(exc)[:300]}"
            for b in self._buckets.values():
                b.graph = None
            log.warning("CUDA-graph capture failed, decode runs eager: %s", self.disabled)

    @property
    def graphs(self) -> int:
        """Buckets captured."""
        return sum(b.graph is not None for b in self._buckets.values())

    # ------------------------------------------------------------------ a step
    def bucket_for(self, chunks: list[SeqChunk], batch: StepBatch) -> tuple[int, int] | str:
        """The (rows, tiles) bucket a step replays, or why it runs eager (host-side checks only)."""
        if self.disabled is not None:
            return "disabled"
        if batch.embeds_override is not None:
            return "vision rows"
        longest = 0
        for c in chunks:
            if len(c.token_ids) != 1 or c.context_len == 0 or c.verify or c.logits != "last":
                return "not a decode step"
            if c.positions is not None or c.vision_rows:
                return "explicit positions"
            longest = max(longest, c.context_len + 1)
        n = len(chunks)
        rows = next((r for r in self.row_buckets if r >= n), None)
        tiles = next((t for t in self.tile_buckets if t * self.key_tile >= longest), None)
        if rows is None:
            return "more sequences than the largest bucket"
        if tiles is None:
            return "a context longer than the largest bucket"
        return rows, tiles

    def forward(self, chunks: list[SeqChunk], batch: StepBatch) -> TrunkOutput | None:
        """The step's trunk forward through its bucket, or None (run it eager) when it fits none.

        The step's values go into the static buffers (one host-to-device copy of the per-row ints, the block
        tables copied on the device), then the bucket replays (or, without capture, runs on them)."""
        key = self.bucket_for(chunks, batch)
        if isinstance(key, str):
            self.stats.eager[key] = self.stats.eager.get(key, 0) + 1
            return None
        b = self._buckets[key]
        n, bs = len(chunks), self.pools.block_size
        rows = []
        for c in chunks:
            ctx = c.context_len
            pos = ctx + c.rope_delta
            rows.append(
                [c.token_ids[0], pos, pos, pos, c.block_table[ctx // bs] * bs + ctx % bs, c.state_slot, ctx + 1]
            )
        rows.extend([self._pad_row] * (b.rows - n))
        # transfer point (step inputs in): the rows' ints in one copy
        self._small[: b.rows].copy_(torch.tensor(rows, dtype=torch.long, device=self.device))
        width = min(batch.block_tables_BN.shape[1], self._tables.shape[1])
        self._tables[:n, :width].copy_(batch.block_tables_BN[:, :width])
        if b.rows > n:
            self._tables[n : b.rows, 0].fill_(self.pad_block)  # padding's one key: the pad block's first slot
        if b.graph is not None:
            b.graph.replay()
        else:
            self._body(b)
        b.replays += 1
        self.stats.replays += 1
        load = self.routed.load
        for layer in self._moe_layers:
            load.add(layer, self._ids[layer, :n])
        load.flush()  # counted now: the next replay overwrites the ids
        return TrunkOutput(hidden_TD=self._hidden[:n], logits_RV=self._logits[:n])
