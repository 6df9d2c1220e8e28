"""Drafting with the MTP head on a trunk rank, right after the target forward of a step.

One MTP pass covers every position the step made valid in the caches (a prefill chunk, or the
accepted prefix of a verified draft run): at position t its inputs are the target's final-normed
hidden h_t and the next token x_{t+1} (model_spec §3.2), which also keeps the MTP layer's own KV
cache complete. Sequences that sampled a token then take k - 1 recursive steps (the MTP's normed
output is the next step's h). Each pass is one MoE call of the MTP layer, in the group's plan order.
Tests: tests/replicas/test_speculative.py.
"""

from __future__ import annotations

import torch

from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.mtp import mtp_forward
from model_shards.trunk import Trunk
from replicas.ep.dispatch import Dispatcher
from replicas.ep.rank_seqs import LiveSeq
from replicas.ep.speculative import Distribution, draft


class MtpDrafter:
    """Holds the draft distributions of sampled requests until the next step verifies them."""

    def __init__(self, trunk: Trunk, pools: CachePools, routed: Dispatcher) -> None:
        self.trunk, self.pools, self.routed = trunk, pools, routed
        self.pending_q: dict[int, list[Distribution | None]] = {}  # state slot -> q of its drafts

    def draft(self, seqs: list[LiveSeq], batch: StepBatch, hidden_TD: torch.Tensor, res: object, *, steps: int) -> None:
        """Run the MTP pass and the recursive steps; writes `res.drafts` (res is trunk_rank._Results)."""
        if self.trunk.w.mtp is None:
            raise ValueError("speculative decoding needs an MTP head: the checkpoint has no mtp.* tensors")
        chunks, rows, samplers = [], [], []
        for i, s in enumerate(seqs):
            if s.step.start is not None:  # a new sequence in this slot (at p > 0 on a prefix-cache hit)
                self.pending_q.pop(s.chunk.state_slot, None)
            if not s.mtp:
                continue
            valid = res.verified_rows.get(i, len(s.chunk.token_ids))  # type: ignore[attr-defined]  # res: trunk_rank._Results
            nxt = res.tokens[i] if s.sample else s.mtp_next  # type: ignore[attr-defined]  # res: trunk_rank._Results
            if nxt is None:
                continue
            c = s.chunk
            chunks.append(
                SeqChunk(
                    (*c.token_ids[1:valid], nxt),
                    c.context_len,
                    c.state_slot,
                    c.block_table,
                    positions=c.positions[:, :valid] if c.positions is not None else None,
                    rope_delta=c.rope_delta,
                    logits="last" if s.sample else "none",
                )
            )
            rows.append(torch.arange(batch.starts[i], batch.starts[i] + valid))
            if s.sample:
                samplers.append((i, c.context_len + valid))
        if not chunks:
            return
        dev = hidden_TD.device  # the rank's device: batches and row indices are made there
        mtp_batch = StepBatch.build(chunks, block_size=self.pools.block_size, device=dev)
        out = mtp_forward(
            self.trunk,
            hidden_TD[torch.cat(rows).to(dev)],
            batch=mtp_batch,
            pools=self.pools,
            routed=self.routed,
            step=0,
        )
        if not samplers:
            return
        drafts: dict[int, list[int]] = {i: [] for i, _ in samplers}
        qs: dict[int, list[Distribution | None]] = {i: [] for i, _ in samplers}
        logits, hidden = out.logits_RV, out.hidden_TD[mtp_batch.logit_rows]
        greedy = [seqs[i].params.greedy for i, _ in samplers]
        for step in range(steps):
            # transfer point (drafts out): one host sync per step for every greedy row, not one per sequence
            argmax = logits.argmax(dim=-1).tolist() if any(greedy) else []
            for j, (i, _) in enumerate(samplers):
                s = seqs[i]
                if greedy[j]:
                    drafts[i].append(argmax[j])
                    qs[i].append(None)
                    continue
                position = s.output_index + len(res.accepted[i]) + 1 + step  # type: ignore[attr-defined]  # res: trunk_rank._Results
                token, q = draft(logits[j], s.params, position=position)
                drafts[i].append(token)
                qs[i].append(q)
            if step + 1 == steps:
                break
            # recursive step: MTP at the position after the last one, input (its own normed output, the draft)
            rec = [
                SeqChunk(
                    (drafts[i][-1],),
                    end + step,
                    seqs[i].chunk.state_slot,
                    seqs[i].chunk.block_table,
                    rope_delta=seqs[i].chunk.rope_delta,
                )
                for i, end in samplers
            ]
            out = mtp_forward(
                self.trunk,
                hidden,
                batch=StepBatch.build(rec, block_size=self.pools.block_size, device=dev),
                pools=self.pools,
                routed=self.routed,
                step=step + 1,
            )
            logits, hidden = out.logits_RV, out.hidden_TD
        for i, _ in samplers:
            res.drafts[i] = tuple(drafts[i])  # type: ignore[attr-defined]  # res: trunk_rank._Results
            if not seqs[i].params.greedy:
                self.pending_q[seqs[i].chunk.state_slot] = qs[i]
