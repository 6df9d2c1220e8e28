"""A trunk rank's core: owns the trunk weights and cache pools, runs a step, samples.

Plain Python (no Ray): the Ray actor in replicas/actors.py wraps it, and the single-process
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
from replicas.a2a_protocol import StepPlan
from replicas.dispatch import Dispatcher
from replicas.step_types import StepRequest, StepResult, TokenLogprobs


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

    @torch.inference_mode()
    def step(self, req: StepRequest, plan: StepPlan | None = None) -> StepResult:
        """Forward + sample. With a plan (expert ranks elsewhere), the routed seam is framed by it and
        a rank with no sequences still runs every exchange of the plan."""
        t0 = time.perf_counter()
        if plan is not None:
            self.routed.begin(plan)
        if not req.seqs:
            self.routed.run_idle()
            self.routed.finish()
            return StepResult(timings={"forward_s": time.perf_counter() - t0})
        batch = StepBatch.build([s.chunk for s in req.seqs], block_size=self.pools.block_size)
        override = self._vision_rows(req, batch)
        if override is not None:
            batch = replace(batch, embeds_override=override)
        out = self.trunk.forward(batch, pools=self.pools, routed=self.routed)
        self.routed.finish()
        t1 = time.perf_counter()
        # logit rows are the last token of each sequence ("last" chunks); keep those that sample
        sampling = [i for i, s in enumerate(req.seqs) if s.sample]
        tokens: list[int | None] = [None] * len(req.seqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(req.seqs)
        if sampling:
            rows = _logit_row_of(req)
            logits = out.logits_RV[[rows[i] for i in sampling]]
            seqs = [req.seqs[i] for i in sampling]
            res = sample(
                logits, [s.params for s in seqs],
                prompt_ids=[torch.tensor(s.prompt_ids, dtype=torch.long) for s in seqs],
                output_ids=[torch.tensor(s.output_ids, dtype=torch.long) for s in seqs],
                positions=[s.output_index for s in seqs],
                banned=[s.suppress_ids for s in seqs],
                allowed=[s.allowed_mask for s in seqs],
            )
            ids = res.token_ids.tolist()
            for j, i in enumerate(sampling):
                tokens[i] = ids[j]
                n = req.seqs[i].params.logprobs
                if n is not None and res.logprob is not None:
                    top = ()
                    if n > 0 and res.top_ids is not None and res.top_logprobs is not None:
                        top = tuple(zip(res.top_ids[j, :n].tolist(), res.top_logprobs[j, :n].tolist()))
                    logprobs[i] = TokenLogprobs(float(res.logprob[j]), top)
        return StepResult(tuple(tokens), tuple(logprobs),
                          timings={"forward_s": t1 - t0, "sample_s": time.perf_counter() - t1})


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
                parts.append(table[first:first + n])
                rows.extend(batch.starts[i] + r for r in s.chunk.vision_rows)
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long), torch.cat(parts)


def _logit_row_of(req: StepRequest) -> dict[int, int]:
    """Row of the step's logits holding each sampling sequence's last token.

    NOTE: a sequence samples iff its chunk asks for logits of its last token; non-final
    prefill chunks ask for none (no lm_head work for them).
    """
    rows, r = {}, 0
    for i, s in enumerate(req.seqs):
        if s.sample != (s.chunk.logits == "last"):
            raise ValueError("a sequence samples exactly when its chunk asks for logits='last'")
        if s.sample:
            rows[i] = r
            r += 1
    return rows
