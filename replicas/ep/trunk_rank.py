"""A trunk rank's core: owns the trunk weights and cache pools, runs a step, samples.

Plain Python (no Ray): the Ray actor in replicas/ep/actors.py wraps it, and the single-process
layout (`--expert-ranks 0`) uses it directly with the local experts. The routed-experts seam is
injected (`routed`), so the same class runs in-process or over an all-to-all.
Tests: tests/replicas/test_trunk_rank.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from model_shards.batch import StepBatch
from model_shards.cache import CachePools
from model_shards.sampling import sample
from model_shards.trunk import Trunk
from model_shards.vision import VisionTower
from replicas.engine.step_types import SeqStep, StepRequest, StepResult, TokenLogprobs
from replicas.ep.a2a_protocol import StepPlan
from replicas.ep.dispatch import Dispatcher
from replicas.ep.mtp_drafter import MtpDrafter
from replicas.ep.speculative import verify


class TrunkRank:
    """Runs steps for the sequences the engine placed on this rank.

    Args:
        trunk: trunk weights and math.
        pools: this rank's KV blocks and DeltaNet state slots.
        routed: the dispatch/combine seam (local experts or the all-to-all).
    """

    def __init__(self, trunk: Trunk, pools: CachePools, routed: Dispatcher, vision: VisionTower | None = None) -> None:
        self.trunk = trunk
        self.pools = pools
        self.routed = routed
        self.vision = vision
        self.vision_cache: dict[int, torch.Tensor] = {}  # state slot -> its sequence's vision embeddings
        self.drafter = MtpDrafter(trunk, pools, routed)

    @torch.inference_mode()
    def step(self, req: StepRequest, plan: StepPlan | None = None) -> StepResult:
        """Forward, sample (verifying drafts where given), draft with the MTP head when the group speculates.
        With a plan (expert ranks elsewhere), the routed seam is framed by it and a rank with no sequences
        still runs every exchange of the plan.

        The rule for errors inside a step: what fails before the forward (the step's first collective) fails
        only its sequences, reported in `StepResult.errors`, and the rank still takes part in every exchange,
        so the group keeps serving; an error after that is a group failure (the caller sees the rank raise).
        """
        t0 = time.perf_counter()
        if plan is not None:
            self.routed.begin(plan)
        refused = {i: why for i, s in enumerate(req.seqs) if (why := self._refusal(s)) is not None}
        if refused:
            keep = [i for i in range(len(req.seqs)) if i not in refused]
            res = self._run(replace(req, seqs=tuple(req.seqs[i] for i in keep)), t0)
            return _spread(res, keep, refused, len(req.seqs))
        return self._run(req, t0)

    def _run(self, req: StepRequest, t0: float) -> StepResult:
        if not req.seqs:
            self.routed.run_idle()
            self.routed.finish()
            return StepResult(timings={"forward_s": time.perf_counter() - t0})
        try:  # before the first collective: a failure here is these sequences', not the group's
            batch = StepBatch.build([s.chunk for s in req.seqs], block_size=self.pools.block_size)
            override = self._vision_rows(req, batch)
        except Exception as exc:  # noqa: BLE001  # reported per sequence; the rank still runs the plan idle
            self.routed.run_idle()
            self.routed.finish()
            why = f"the step could not start for this request ({type(exc).__name__}: {str(exc)[:200]})"
            return StepResult(
                token_ids=(None,) * len(req.seqs),
                logprobs=(None,) * len(req.seqs),
                errors=(why,) * len(req.seqs),
                timings={"forward_s": time.perf_counter() - t0},
            )
        if override is not None:
            batch = replace(batch, embeds_override=override)
        out = self.trunk.forward(batch, pools=self.pools, routed=self.routed)
        t1 = time.perf_counter()
        res = _Results(len(req.seqs))
        rows = _logit_rows(req)
        self._sample(req, out.logits_RV, rows, res)
        self._verify(req, out.logits_RV, rows, res)
        t2 = time.perf_counter()
        if req.mtp_steps:
            self.drafter.draft(req, batch, out.hidden_TD, res, steps=req.mtp_steps)
        self.routed.run_idle()  # MTP exchanges this rank had no rows for, in plan order
        self.routed.finish()
        return res.result(timings={"forward_s": t1 - t0, "sample_s": t2 - t1, "draft_s": time.perf_counter() - t2})

    def _refusal(self, s: SeqStep) -> str | None:
        """Why this sequence could make the step raise after its first collective (ids past the vocabulary,
        more logprobs than tokens, cache addresses past the pools), or None.

        Runs every step for every sequence, so it looks only at what this step brings: the whole prompt and
        output (sent along for penalties) are not rescanned per step; the engine checks the prompt once at
        admission (replicas/engine/step_guard.py) and outputs are sampled from the vocabulary."""
        vocab = self.trunk.cfg.vocab_size
        if s.params.logprobs is not None and not 0 <= s.params.logprobs <= vocab:
            return f"logprobs {s.params.logprobs} is outside [0, {vocab}]"
        for name, ids in (
            ("token ids", s.chunk.token_ids),
            ("drafts", s.drafts),
            ("suppressed ids", s.suppress_ids),
        ):
            if any(not 0 <= t < vocab for t in ids):
                return f"{name} outside the vocabulary [0, {vocab})"
        if not 0 <= s.chunk.state_slot < self.pools.num_slots or any(
            not 0 <= b < self.pools.num_blocks for b in s.chunk.block_table
        ):
            return "cache addresses outside this rank's pools"
        mask = s.allowed_mask
        if mask is not None and (mask.dtype != torch.int32 or mask.dim() != 1):
            return "the structured-output mask is not an int32 vector"
        return None

    def _sample(
        self, req: StepRequest, logits_RV: torch.Tensor, rows: dict[int, tuple[int, int]], res: _Results
    ) -> None:
        """One token per sampling sequence that brings no drafts."""
        sampling = [i for i, s in enumerate(req.seqs) if s.sample and not s.drafts]
        if not sampling:
            return
        seqs = [req.seqs[i] for i in sampling]
        out = sample(
            logits_RV[[rows[i][0] + rows[i][1] - 1 for i in sampling]],
            [s.params for s in seqs],
            prompt_ids=[torch.tensor(s.prompt_ids, dtype=torch.long) for s in seqs],
            output_ids=[torch.tensor(s.output_ids, dtype=torch.long) for s in seqs],
            positions=[s.output_index for s in seqs],
            banned=[s.suppress_ids for s in seqs],
            allowed=[s.allowed_mask for s in seqs],
        )
        ids = out.token_ids.tolist()
        for j, i in enumerate(sampling):
            res.tokens[i] = ids[j]
            n = req.seqs[i].params.logprobs
            if n is not None and out.logprob is not None:
                top: tuple[tuple[int, float], ...] = ()
                if n > 0 and out.top_ids is not None and out.top_logprobs is not None:
                    top = tuple(zip(out.top_ids[j, :n].tolist(), out.top_logprobs[j, :n].tolist()))
                res.logprobs[i] = TokenLogprobs(float(out.logprob[j]), top)

    def _verify(
        self, req: StepRequest, logits_RV: torch.Tensor, rows: dict[int, tuple[int, int]], res: _Results
    ) -> None:
        """Sequences that bring drafts: accept a prefix, add the target's token, roll the DeltaNet states
        back to the last accepted token."""
        for i, s in enumerate(req.seqs):
            if not s.drafts:
                continue
            first, count = rows[i]
            logits = logits_RV[first : first + count]
            slot = s.chunk.state_slot
            q = self.drafter.pending_q.pop(slot, [None] * len(s.drafts))
            a, token = verify(logits, list(s.drafts), s.params, position=s.output_index, q=q)
            self.pools.rollback(slot, keep=a)
            res.tokens[i] = token
            res.accepted[i] = tuple(s.drafts[:a])
            res.verified_rows[i] = a + 1
            res.accepted_logprobs[i] = (None,) * a  # one entry per accepted token, logprobs asked or not
            if s.params.logprobs is not None:
                lps = _token_logprobs(logits[: a + 1], [*s.drafts[:a], token], s.params.logprobs)
                res.accepted_logprobs[i], res.logprobs[i] = tuple(lps[:-1]), lps[-1]

    def _vision_rows(self, req: StepRequest, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Vision embeddings for this step's image/video rows. A sequence's first chunk brings its inputs,
        encoded once here and kept with its state slot for its later chunks (and dropped when the slot
        starts another sequence)."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for i, s in enumerate(req.seqs):
            slot = s.chunk.state_slot
            if s.chunk.context_len == 0:
                self.vision_cache.pop(slot, None)
                if s.vision:
                    if self.vision is None:
                        raise ValueError("this trunk rank has no vision tower (checkpoint without model.visual.*)")
                    pixels = torch.cat([v.pixel_values for v in s.vision])
                    self.vision_cache[slot] = self.vision.encode(pixels, [v.grid_thw for v in s.vision])
            if s.chunk.vision_rows:
                table = self.vision_cache[slot]
                first, n = s.chunk.vision_first, len(s.chunk.vision_rows)
                parts.append(table[first : first + n])
                rows.extend(batch.starts[i] + r for r in s.chunk.vision_rows)
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long), torch.cat(parts)


def _logit_rows(req: StepRequest) -> dict[int, tuple[int, int]]:
    """(first row, row count) of each sequence's logits: its last token ("last"), or all of its tokens
    when it verifies drafts ("all"); non-final prefill chunks ask for none (no lm_head work).
    """
    rows, r = {}, 0
    for i, s in enumerate(req.seqs):
        if s.sample != (s.chunk.logits != "none"):
            raise ValueError("a sequence samples exactly when its chunk asks for logits")
        if s.drafts and s.chunk.logits != "all":
            raise ValueError("a sequence verifying drafts needs the logits of all its tokens")
        n = len(s.chunk.token_ids) if s.chunk.logits == "all" else 1 if s.sample else 0
        if n:
            rows[i] = (r, n)
            r += n
    return rows


def _token_logprobs(logits_JV: torch.Tensor, tokens: list[int], n: int) -> list[TokenLogprobs]:
    """Raw-model logprobs of each emitted token and its top-n alternatives."""
    logp = torch.log_softmax(logits_JV.float(), dim=-1)
    out = []
    for j, t in enumerate(tokens):
        top: tuple[tuple[int, float], ...] = ()
        if n > 0:
            v, ids = logp[j].topk(n)
            top = tuple(zip(ids.tolist(), v.tolist()))
        out.append(TokenLogprobs(float(logp[j, t]), top))
    return out


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
