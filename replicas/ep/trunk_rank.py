"""A trunk rank's core: owns the trunk weights, cache pools and its sequences' state; runs a step, samples.

Plain Python (no Ray): the Ray actor in replicas/ep/actors.py wraps it, and the single-process
layout (`--expert-ranks 0`) uses it directly with the local experts. The routed-experts seam is
injected (`routed`), so the same class runs in-process or over an all-to-all. Steps are incremental
(replicas/engine/step_types.py): the rank keeps each sequence's state (replicas/ep/rank_seqs.py).
The rank owns one device (its pools'): batches, index tables and sampling inputs are made there. Host <->
device transfers happen at named points only: step inputs in (`StepBatch.build` from the step's Python lists,
the step's new tokens into the penalty history and grammar masks in `_sample`), sampled token ids and logprobs out
(`SampleOutput.to_host` in `_sample`, `_to_host` in `_verify`, the draft ids in `MtpDrafter.draft`), and the canary's
one verdict; the expert-load counters leave the device only when read (replicas/ep/dispatch.py).
The readiness canary (`canary`) runs one token through the whole model on a KV block and state slot reserved
for it: the last of each pool, never offered to sequences, never cached, not counted in the expert load.
Prefix cache: a start with `restore` gets the state checkpoint copied into its slot before the forward; a step
with `save_state` has its slot's state copied into that checkpoint after it (device copies, in stream order).
Tests: tests/replicas/test_step_protocol.py, tests/replicas/test_group.py, tests/replicas/test_device_path.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from cluster.rank_progress import RankProgress
from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.sampling import DeviceHistory, sample, upload_list
from model_shards.trunk import Trunk, TrunkOutput
from model_shards.vision import VisionTower
from replicas.engine.step_types import SERVER_ERROR, StepRequest, StepResult, TokenLogprobs
from replicas.ep.a2a_protocol import StepPlan
from replicas.ep.dispatch import Dispatcher
from replicas.ep.micro_batches import split_sequences
from replicas.ep.mtp_drafter import MtpDrafter
from replicas.ep.rank_seqs import LiveSeq, SeqTable
from replicas.ep.speculative import verify_rows

if TYPE_CHECKING:
    from replicas.ep.decode_graphs import DecodeGraphs


class TrunkRank:
    """Runs steps for the sequences the engine placed on this rank.

    Args:
        trunk: trunk weights and math.
        pools: this rank's KV blocks and DeltaNet state slots, plus one block and one slot (the last of each)
            reserved for the canary (allocate them with `CANARY_RESERVE` more than the engine hands out).
        routed: the dispatch/combine seam (local experts or the all-to-all).
    """

    def __init__(
        self,
        trunk: Trunk,
        pools: CachePools,
        routed: Dispatcher,
        vision: VisionTower | None = None,
        *,
        progress: RankProgress | None = None,
    ) -> None:
        self.trunk = trunk
        self.progress = progress or RankProgress()  # the collectives this step entered (the group's handle's)
        self._plan: StepPlan | None = None
        self.pools = pools
        self.routed = routed
        self.vision = vision
        self.device = pools.k.device  # the rank's one device (weights and pools live there)
        if pools.num_blocks < 2 or pools.num_slots < 2:
            raise ValueError("a trunk rank's pools need one KV block and one state slot beyond the canary's")
        self.canary_block, self.canary_slot = pools.num_blocks - 1, pools.num_slots - 1
        self.seqs = SeqTable(  # the canary's block and slot are outside what sequences may address
            vocab_size=trunk.cfg.vocab_size,
            num_slots=pools.num_slots - CANARY_RESERVE,
            num_blocks=pools.num_blocks - CANARY_RESERVE,
            block_size=pools.block_size,
            num_checkpoints=pools.num_checkpoints,
            device=self.device,
        )
        self.drafter = MtpDrafter(trunk, pools, routed)
        # the in-process runner's CUDA-graph decode (replicas/ep/decode_graphs.py); None: every forward eager
        self.decode_graphs: DecodeGraphs | None = None

    def reset(self) -> None:
        """Forget every sequence (the group is being rebuilt: the engine ended them all)."""
        self.seqs.clear()
        self.drafter.pending_q.clear()

    @torch.inference_mode()
    def step(self, req: StepRequest, plan: StepPlan | None = None) -> StepResult:
        """Forward, sample (verifying drafts where given), draft with the MTP head when the group speculates.
        With a plan (expert ranks elsewhere), the routed seam is framed by it and a rank with no sequences
        still runs every exchange of the plan.

        The rule for errors inside a step: what fails before the step's first collective (bad input, the batch or
        layer 0 running out of memory) fails only its sequences, reported in `StepResult.errors`, and the rank
        still takes part in every exchange, so the group keeps serving; an error after that is a group failure
        (the caller sees the rank raise). Which side of the line an error fell on is read from the collectives
        this step entered (`RankProgress.step_collectives`), not guessed from where it was raised.
        Sequence state: `req.released` is dropped first; a refused sequence's state is dropped too (the engine
        ends it).
        """
        t0 = time.perf_counter()
        self._plan = plan
        if plan is not None:
            self.routed.begin(plan)
        self.seqs.release(req.released)
        if req.canary:
            if req.num_seqs:
                raise ValueError("a canary step carries no sequences")
            self.canary()
            self.routed.run_idle()
            self.routed.finish()
            return StepResult(timings={"forward_s": time.perf_counter() - t0})
        steps = self.seqs.decode_steps(req.decodes, req.decode_context) + req.seqs if req.decodes else req.seqs
        refused = {i: why for i, s in enumerate(steps) if (why := self.seqs.refusal(s)) is not None}
        if not refused:
            return self._run([self.seqs.resolve(s) for s in steps], req.mtp_steps, t0)
        keep = [i for i in range(len(steps)) if i not in refused]
        kept_ids = {steps[i].seq_id for i in keep}
        self.seqs.release(tuple(steps[i].seq_id for i in refused if steps[i].seq_id not in kept_ids))
        res = self._run([self.seqs.resolve(steps[i]) for i in keep], req.mtp_steps, t0)
        return _spread(res, keep, refused, len(steps))

    def canary(self) -> None:
        """One token through trunk -> experts -> trunk on the reserved block and slot (a fresh sequence: its state
        starts from zeros, nothing earlier is read); the routed seam does not count it in the expert load.

        Raises:
            RuntimeError: the logits are not finite or not [1, vocab] (a device, layout or weight mistake).
        """
        chunk = SeqChunk((0,), 0, self.canary_slot, (self.canary_block,))
        batch = StepBatch.build([chunk], block_size=self.pools.block_size, device=self.device)
        with self.routed.load.paused():
            out = self.trunk.forward(batch, pools=self.pools, routed=self.routed)
        logits = out.logits_RV
        vocab = self.trunk.cfg.vocab_size
        if tuple(logits.shape) != (1, vocab):
            raise RuntimeError(f"canary: logits of shape {tuple(logits.shape)}, expected [1, {vocab}]")
        if logits.device != self.device:
            raise RuntimeError(f"canary: logits on {logits.device}, this rank runs on {self.device}")
        # transfer point: the canary's verdict (one bool)
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("canary: the one-token forward gave non-finite logits (corrupt or misplaced weights?)")

    def _run(self, live: list[LiveSeq], mtp_steps: int, t0: float) -> StepResult:
        if not live:
            self.routed.run_idle()
            self.routed.finish()
            return StepResult(timings={"forward_s": time.perf_counter() - t0})
        collectives_before = self.progress.step_collectives
        in_forward = False  # before: the step's input did not fit (its requests' fault); after: the server's
        try:
            self.progress.check("start")  # test-only fault hook: where this rank's own work starts
            for s in live:  # prefix-cache hits: the saved state first (the KV is already in the shared blocks)
                if s.step.start is not None and s.step.start.restore is not None:
                    self.pools.restore_state(s.step.start.restore, s.chunk.state_slot)
            # transfer point (step inputs in): the step's index lists become device tensors here
            batch = StepBatch.build([s.chunk for s in live], block_size=self.pools.block_size, device=self.device)
            override = self._vision_rows(live, batch)
            if override is not None:
                batch = replace(batch, embeds_override=override)
            in_forward = True
            out = self._forward(live, batch)
        except Exception as exc:
            if self.progress.step_collectives != collectives_before:
                raise  # past the first collective: the peers saw a part of this step, so the group failed
            return self._failed_alone(live, exc, t0, server=in_forward)
        t1 = time.perf_counter()
        res = _Results(len(live))
        rows = _logit_rows(live)
        self._sample(live, out.logits_RV, rows, res)
        self._verify(live, out.logits_RV, rows, res)
        for i, s in enumerate(live):
            self.seqs.advance(s, res.accepted[i], res.tokens[i])
            if s.step.save_state is not None:  # a non-verifying chunk: the slot holds the state at its end
                self.pools.save_state(s.chunk.state_slot, s.step.save_state)
        t2 = time.perf_counter()
        if mtp_steps:
            self.drafter.draft(live, batch, out.hidden_TD, res, steps=mtp_steps)
        self.routed.run_idle()  # MTP exchanges this rank had no rows for, in plan order
        self.routed.finish()
        return res.result(timings={"forward_s": t1 - t0, "sample_s": t2 - t1, "draft_s": time.perf_counter() - t2})

    def _forward(self, live: list[LiveSeq], batch: StepBatch) -> TrunkOutput:
        """The trunk forward, in the plan's ping-pong micro-batches when it has them (replicas/ep/micro_batches.py)."""
        plan = self._plan
        if plan is None and self.decode_graphs is not None:  # a decode step that fits a bucket replays its graph
            out = self.decode_graphs.forward([s.chunk for s in live], batch)
            if out is not None:
                return out
        if plan is None or not plan.split:
            return self.trunk.forward(batch, pools=self.pools, routed=self.routed)
        groups = split_sequences([len(s.chunk.token_ids) for s in live], plan.micro_batches)
        bs, dev = self.pools.block_size, self.device
        parts = [
            StepBatch.build([s.chunk for s in live[a:b]], block_size=bs, device=dev) if b > a else None
            for a, b in groups
        ]
        return self.trunk.forward_split(batch, parts, pools=self.pools, routed=self.routed)

    def _failed_alone(self, live: list[LiveSeq], exc: Exception, t0: float, *, server: bool) -> StepResult:
        """The step failed before its first collective: its sequences end (their caches may be half-written, so
        their state goes) and the rank runs the plan's exchanges idle from the start, as its peers expect."""
        if self._plan is not None:
            self.routed.begin(self._plan)  # no exchange ran yet: frame the step again, from its first layer
        self.routed.run_idle()
        self.routed.finish()
        for s in live:
            self.seqs.release((s.step.seq_id,))
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            why = f"{SERVER_ERROR}out of memory for this step ({detail})"
        elif server:
            why = f"{SERVER_ERROR}the step failed before its first collective ({detail})"
        else:
            why = f"the step could not start for this request ({detail})"
        return StepResult(
            token_ids=(None,) * len(live),
            logprobs=(None,) * len(live),
            errors=(why,) * len(live),
            timings={"forward_s": time.perf_counter() - t0},
        )

    def _sample(
        self, live: list[LiveSeq], logits_RV: torch.Tensor, rows: dict[int, tuple[int, int]], res: _Results
    ) -> None:
        """One token per sampling sequence that brings no drafts."""
        # transfer point (step inputs in): the tokens fed since the last flush into the device penalty history (a
        # decode step that feeds back the token the rank sampled has none); grammar masks go in the sampler
        self.seqs.history.flush()
        sampling = [i for i, s in enumerate(live) if s.sample and not s.drafts]
        if not sampling:
            return
        seqs = [live[i] for i in sampling]
        out = sample(
            logits_RV,
            [s.params for s in seqs],
            rows=[rows[i][0] + rows[i][1] - 1 for i in sampling],
            history=_history(seqs),
            positions=[s.output_index for s in seqs],
            banned=[s.step.suppress_ids for s in seqs],
            allowed=[s.allowed for s in seqs],
        )
        host = out.to_host()  # sampled ids and logprobs out: the sampler's one device-to-host transfer
        for j, i in enumerate(sampling):
            res.tokens[i] = host.token_ids[j]
            if live[i].state.history is not None:  # the sampler wrote it into the history, on the device
                live[i].state.sampled = host.token_ids[j]
            n = live[i].params.logprobs
            if n is not None and host.logprob is not None:
                top: tuple[tuple[int, float], ...] = ()
                if n > 0 and host.top_ids is not None and host.top_logprobs is not None:
                    top = tuple(zip(host.top_ids[j][:n], host.top_logprobs[j][:n]))
                res.logprobs[i] = TokenLogprobs(host.logprob[j], top)

    def _verify(
        self, live: list[LiveSeq], logits_RV: torch.Tensor, rows: dict[int, tuple[int, int]], res: _Results
    ) -> None:
        """Sequences that bring drafts, all at once: accept a prefix, add the target's token, roll the DeltaNet
        states back to the last accepted token. A fixed number of tensor ops for any number of sequences
        (replicas/ep/speculative.py `verify_rows`), and one transfer of the results out."""
        verifying = [i for i, s in enumerate(live) if s.drafts]
        if not verifying:
            return
        seqs = [live[i] for i in verifying]
        counts = [len(s.drafts) for s in seqs]
        n = max(counts)
        # step inputs in (one transfer): each sequence's logit rows (past its drafts: its last row again), its
        # drafts padded with -1 (never a match), its state slot
        flat = [rows[i][0] + min(j, c) for i, c in zip(verifying, counts) for j in range(n + 1)]
        flat += [d for s in seqs for d in (*s.drafts, *(-1,) * (n - len(s.drafts)))]
        flat += [s.chunk.state_slot for s in seqs]
        ints = upload_list(flat, torch.long, logits_RV.device)
        rows_SJ, drafts_SN, slots = ints.split([len(seqs) * (n + 1), len(seqs) * n, len(seqs)])
        rows_SJ, drafts_SN = rows_SJ.view(len(seqs), n + 1), drafts_SN.view(len(seqs), n)
        sampled = [s.chunk.state_slot for s in seqs if not s.params.greedy]
        out = verify_rows(
            logits_RV,
            rows_SJ,
            drafts_SN,
            counts,
            [s.params for s in seqs],
            [s.output_index for s in seqs],
            self.drafter.take_q(sampled, n) if sampled else None,
        )
        self.pools.rollback_many(slots, out.accepted)
        want = [j for j, s in enumerate(seqs) if s.params.logprobs is not None]
        chosen = top_ids = top_vals = None
        if want:  # raw-model logprobs of every emitted token (columns past the accepted ones are dropped below)
            idx = upload_list(want, torch.long, logits_RV.device) if len(want) < len(seqs) else None
            sel_rows = rows_SJ if idx is None else rows_SJ.index_select(0, idx)
            emitted = out.emitted if idx is None else out.emitted.index_select(0, idx)
            logp = torch.log_softmax(logits_RV.index_select(0, sel_rows.reshape(-1)).float(), dim=-1)
            chosen = logp.gather(1, emitted.reshape(-1, 1)).view(len(want), n + 1)
            top_n = max(seqs[j].params.logprobs or 0 for j in want)
            if top_n > 0:
                top = logp.topk(top_n, dim=-1)
                top_ids, top_vals = top.indices.view(len(want), n + 1, top_n), top.values.view(len(want), n + 1, -1)
        accepted, token, chosen_h, ids_h, vals_h = _to_host(out.accepted, out.token, chosen, top_ids, top_vals)
        assert accepted is not None and token is not None
        at = {j: w for w, j in enumerate(want)}
        for j, i in enumerate(verifying):
            s, a = seqs[j], accepted[j]
            res.tokens[i] = token[j]
            res.accepted[i] = tuple(s.drafts[:a])
            res.verified_rows[i] = a + 1
            res.accepted_logprobs[i] = (None,) * a  # one entry per accepted token, logprobs asked or not
            w = at.get(j)
            if w is not None:
                assert chosen_h is not None
                k = s.params.logprobs or 0
                tops = [tuple(zip(ids_h[w][c][:k], vals_h[w][c][:k])) for c in range(a + 1)] if ids_h and vals_h else []
                lps = [TokenLogprobs(float(chosen_h[w][c]), tops[c] if tops else ()) for c in range(a + 1)]
                res.accepted_logprobs[i], res.logprobs[i] = tuple(lps[:-1]), lps[-1]

    def _vision_rows(self, live: list[LiveSeq], batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Vision embeddings for this step's image/video rows. A sequence's start brings its inputs, encoded
        once, with its first chunk on this rank (which starts past 0 on a prefix-cache hit: then only if a vision
        row lies past the cached part), and kept in its state for its later chunks."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for i, s in enumerate(live):
            st = s.state.start
            vision = st.vision
            first_here = s.step.start is not None and (not st.vision_rows or st.vision_rows[-1] >= s.chunk.context_len)
            if first_here and vision:
                if self.vision is None:
                    raise ValueError("this trunk rank has no vision tower (checkpoint without model.visual.*)")
                pixels = torch.cat([v.pixel_values for v in vision])
                s.state.embeds = self.vision.encode(pixels, [v.grid_thw for v in vision])
            if s.chunk.vision_rows:
                table = s.state.embeds
                if table is None:
                    raise ValueError("vision rows without the sequence's images")
                first, n = s.chunk.vision_first, len(s.chunk.vision_rows)
                parts.append(table[first : first + n])
                rows.extend(batch.starts[i] + r for r in s.chunk.vision_rows)
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long, device=self.device), torch.cat(parts).to(self.device)


def _logit_rows(live: list[LiveSeq]) -> dict[int, tuple[int, int]]:
    """(first row, row count) of each sequence's logits: its last token ("last"), or all of its tokens
    when it verifies drafts ("all"); non-final prefill chunks ask for none (no lm_head work).
    """
    rows, r = {}, 0
    for i, s in enumerate(live):
        if s.sample != (s.chunk.logits != "none"):
            raise ValueError("a sequence samples exactly when its chunk asks for logits")
        if s.drafts and s.chunk.logits != "all":
            raise ValueError("a sequence verifying drafts needs the logits of all its tokens")
        n = len(s.chunk.token_ids) if s.chunk.logits == "all" else 1 if s.sample else 0
        if n:
            rows[i] = (r, n)
            r += n
    return rows


def _spread(res: StepResult, keep: list[int], refused: dict[int, str], n: int) -> StepResult:
    """The result of the kept sequences laid out over all `n`, with the refused ones' reasons in `errors`."""

    def out(values: tuple, empty: object) -> tuple:
        full = [empty] * n
        for j, i in enumerate(keep):
            full[i] = values[j] if j < len(values) else empty
        return tuple(full)

    errors = out(res.errors, None) if res.errors else (None,) * n
    return replace(
        res,
        token_ids=out(res.token_ids, None),
        logprobs=out(res.logprobs, None),
        accepted=out(res.accepted, ()),
        accepted_logprobs=out(res.accepted_logprobs, ()),
        drafts=out(res.drafts, ()),
        errors=tuple(refused.get(i, e) for i, e in enumerate(errors)),
    )


CANARY_RESERVE = 1  # KV blocks and state slots each trunk rank holds beyond the engine's, for the canary


def _history(seqs: list[LiveSeq]) -> DeviceHistory | None:
    """The sampling sequences' penalty histories, on the device (their rows of the rank's `PenaltyHistory`, with
    room for the token the sampler appends), or None when none has a penalty."""
    pen = [s.state for s in seqs if s.state.history is not None]
    if not pen:
        return None
    h = pen[0].history
    assert h is not None
    h.reserve(max(st.history_len for st in pen) + 1)
    return DeviceHistory(
        h.ids,
        rows=[s.state.row for s in seqs],
        lens=[s.state.history_len for s in seqs],
        prompt_lens=[s.state.start.prompt_len for s in seqs],
    )


def _to_host(*tensors: torch.Tensor | None) -> list[list | None]:
    """Transfer point (results out): the sampled ids and logprobs leave the device here, one copy per tensor."""
    return [t.cpu().tolist() if t is not None else None for t in tensors]


class _Results:
    """Per-sequence outputs of a step, filled by sampling, verification and drafting."""

    def __init__(self, n: int) -> None:
        self.tokens: list[int | None] = [None] * n
        self.logprobs: list[TokenLogprobs | None] = [None] * n
        self.accepted: list[tuple[int, ...]] = [()] * n
        self.accepted_logprobs: list[tuple[TokenLogprobs | None, ...]] = [()] * n
        self.drafts: list[tuple[int, ...]] = [()] * n
        self.verified_rows: dict[int, int] = {}  # seq -> chunk rows now valid in the caches

    def result(self, *, timings: dict[str, float]) -> StepResult:
        return StepResult(
            tuple(self.tokens),
            tuple(self.logprobs),
            timings=timings,
            accepted=tuple(self.accepted),
            accepted_logprobs=tuple(self.accepted_logprobs),
            drafts=tuple(self.drafts),
        )
