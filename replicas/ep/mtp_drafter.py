"""Drafting with the MTP head on a trunk rank, right after the target forward of a step.

One MTP pass covers every position the step made valid in the caches (a prefill chunk, or the
accepted prefix of a verified draft run): at position t its inputs are the target's final-normed
hidden h_t and the next token x_{t+1} (model_spec §3.2), which also keeps the MTP layer's own KV
cache complete. Sequences that sampled a token then take k - 1 recursive steps (the MTP's normed
output is the next step's h). Each pass is one MoE call of the MTP layer, in the group's plan order.
Batched: every pass covers all drafting sequences, drafts are drawn for all of them at once
(replicas/ep/speculative.py `draft_rows`) and stay on the device as the next pass's input tokens; the
k drafts of every sequence leave the device in one transfer after the last pass. The draft
distributions of sampled requests stay on the device until the next step verifies them.
Tests: tests/replicas/test_speculative.py, tests/replicas/test_spec_batched.py.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.mtp import mtp_forward
from model_shards.sampling import upload_list
from model_shards.trunk import Trunk
from replicas.ep.dispatch import Dispatcher
from replicas.ep.rank_seqs import LiveSeq
from replicas.ep.speculative import draft_rows


class MtpDrafter:
    """Holds the draft distributions of sampled requests until the next step verifies them."""

    def __init__(self, trunk: Trunk, pools: CachePools, routed: Dispatcher) -> None:
        self.trunk, self.pools, self.routed = trunk, pools, routed
        # state slot -> (q [S, k, V] of the step that drafted it, its row there): one tensor per drafting step
        self.pending_q: dict[int, tuple[torch.Tensor, int]] = {}

    def take_q(self, slots: list[int], n: int) -> torch.Tensor:
        """The first n draft distributions of each slot's pending drafts, [len(slots), n, V] (and forget them).
        One gather per drafting step they came from (normally one: the previous step)."""
        try:
            held = [self.pending_q.pop(s) for s in slots]
        except KeyError as exc:
            raise ValueError(f"sampled drafts of state slot {exc.args[0]} without their draft distributions") from None
        if any(q.shape[1] < n for q, _ in held):
            raise ValueError(f"{n} drafts to verify, fewer draft distributions held")
        sources: dict[int, tuple[torch.Tensor, list[int], list[int]]] = {}  # id(q) -> (q, rows there, our rows)
        for j, (q, row) in enumerate(held):
            src = sources.setdefault(id(q), (q, [], []))
            src[1].append(row)
            src[2].append(j)
        dev = held[0][0].device
        parts = [
            q.narrow(1, 0, n).index_select(0, upload_list(rows, torch.long, dev)) for q, rows, _ in sources.values()
        ]
        if len(parts) == 1:
            return parts[0]
        order = [j for _, _, ours in sources.values() for j in ours]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return torch.cat(parts).index_select(0, upload_list(inverse, torch.long, dev))

    def draft(self, seqs: list[LiveSeq], batch: StepBatch, hidden_TD: torch.Tensor, res: object, *, steps: int) -> None:
        """Run the MTP pass and the recursive steps; writes `res.drafts` (res is trunk_rank._Results)."""
        if self.trunk.w.mtp is None:
            raise ValueError("speculative decoding needs an MTP head: the checkpoint has no mtp.* tensors")
        chunks: list[SeqChunk] = []
        rows: list[int] = []
        samplers: list[tuple[int, int]] = []  # (sequence, position after its valid rows)
        for i, s in enumerate(seqs):  # host lists only: the pass's inputs go in as one batch
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
            rows.extend(range(batch.starts[i], batch.starts[i] + valid))
            if s.sample:
                samplers.append((i, c.context_len + valid))
        if not chunks:
            return
        dev = hidden_TD.device  # the rank's device: batches and row indices are made there
        mtp_batch = StepBatch.build(chunks, block_size=self.pools.block_size, device=dev)
        out = mtp_forward(
            self.trunk,
            hidden_TD.index_select(0, upload_list(rows, torch.long, dev)),
            batch=mtp_batch,
            pools=self.pools,
            routed=self.routed,
            step=0,
        )
        if not samplers:
            return
        params = [seqs[i].params for i, _ in samplers]
        first = [seqs[i].output_index + len(res.accepted[i]) + 1 for i, _ in samplers]  # type: ignore[attr-defined]  # res: trunk_rank._Results
        logits, hidden = out.logits_RV, out.hidden_TD.index_select(0, mtp_batch.logit_rows)
        tokens: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        for step in range(steps):  # k draft steps, each over every drafting sequence (a fixed bound, not per row)
            drafted, q = draft_rows(logits, params, [p + step for p in first])
            tokens.append(drafted)
            if q is not None:
                qs.append(q)
            if step + 1 == steps:
                break
            # recursive step: MTP at the position after the last one, input (its own normed output, the draft);
            # the drafts stay on the device as the batch's token ids (the placeholder ids are never read)
            rec = [
                SeqChunk(
                    (0,),
                    end + step,
                    seqs[i].chunk.state_slot,
                    seqs[i].chunk.block_table,
                    rope_delta=seqs[i].chunk.rope_delta,
                )
                for i, end in samplers
            ]
            rec_batch = replace(StepBatch.build(rec, block_size=self.pools.block_size, device=dev), token_ids_T=drafted)
            out = mtp_forward(self.trunk, hidden, batch=rec_batch, pools=self.pools, routed=self.routed, step=step + 1)
            logits, hidden = out.logits_RV, out.hidden_TD
        # transfer point (drafts out): every sequence's k drafts in one device-to-host copy
        drafts = torch.stack(tokens, dim=1).cpu().tolist()
        for j, (i, _) in enumerate(samplers):
            res.drafts[i] = tuple(drafts[j])  # type: ignore[attr-defined]  # res: trunk_rank._Results
        if qs:  # sampled rows, in row order: q of every draft step, kept for the next step's verification
            q_all = torch.stack(qs, dim=1)  # [S_sampled, k, V]
            slots = [seqs[i].chunk.state_slot for (i, _), p in zip(samplers, params) if not p.greedy]
            for row, slot in enumerate(slots):
                self.pending_q[slot] = (q_all, row)
