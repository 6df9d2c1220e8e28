"""The ping-pong micro-batch split and the step plan's exchange units, against answers worked out by hand.

The exchange itself in micro-batches (units in flight, overflow exchanges at their agreed place) runs in
tests/replicas/test_dispatch.py; the whole model with m = 2 against the single process in tests/replicas/test_group.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_shards.batch import SeqChunk, StepBatch
from model_shards.model import LocalModel
from replicas.ep.a2a_protocol import FIXED, StepPlan
from replicas.ep.dispatch import LocalDispatcher
from replicas.ep.micro_batches import max_micro_batch_tokens, split_sequences


@pytest.mark.parametrize(
    "tokens,m,expected",
    [
        ([1] * 32, 2, [(0, 16), (16, 32)]),  # decode: halves
        ([1] * 7, 3, [(0, 2), (2, 5), (5, 7)]),  # thirds at 7/3 and 14/3 tokens: middles 1.5 | 2.5 .. 4.5 | 5.5
        ([1], 2, [(0, 1), (1, 1)]),  # fewer sequences than micro-batches: the last is empty
        ([], 2, [(0, 0), (0, 0)]),
        ([1, 37, 64, 150], 2, [(0, 3), (3, 4)]),  # 252 tokens: the 150-token prefill's middle (177) is past 126
        ([150, 1, 37, 64], 2, [(0, 1), (1, 4)]),  # its middle (75) is before 126
        ([3, 5], 1, [(0, 2)]),  # m = 1: one group, the step as it is
    ],
)
def test_split_sequences_known_answers(tokens: list[int], m: int, expected: list[tuple[int, int]]) -> None:
    assert split_sequences(tokens, m) == expected


def test_max_micro_batch_tokens_and_bad_m() -> None:
    assert max_micro_batch_tokens([1] * 33, 2) == 17
    assert max_micro_batch_tokens([1, 37, 64, 150], 2) == 150
    assert max_micro_batch_tokens([], 2) == 0
    with pytest.raises(ValueError, match="micro-batches must be >= 1, got 0"):
        split_sequences([1], 0)


def test_plan_units_split_layers_then_unsplit() -> None:
    plan = StepPlan((0, 1, 2, 2), FIXED, capacity=4, micro_batches=2, split_layers=2)
    # layer-major micro-batches of the split layers (2 in flight), then the rest one at a time
    assert plan.split
    assert plan.units() == ((0, 2), (0, 2), (1, 2), (1, 2), (2, 1), (2, 1))
    assert StepPlan((0, 1)).units() == ((0, 1), (1, 1))
    assert not StepPlan((0, 1), micro_batches=2).split  # no split layers: nothing to overlap
    assert StepPlan((0, 1), micro_batches=2).units() == ((0, 1), (1, 1))
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        StepPlan((0,), micro_batches=0)
    with pytest.raises(ValueError, match="split_layers 3 outside 0..2"):
        StepPlan((0, 1), micro_batches=2, split_layers=3)


def test_forward_split_equals_forward(hf_checkpoint: Path) -> None:
    """The trunk's ping-pong layer loop (micro-batch j's routed call started, waited on one micro-batch later) gives
    `forward`'s logits and hidden states, with an empty micro-batch included; caches written alike (a decode step
    after the split prefill agrees too). Oracle: the same model's one-batch `forward` on its own pools."""
    model = LocalModel.load(hf_checkpoint, dtype="float32")
    dispatcher = LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
    g = torch.Generator().manual_seed(3)
    lengths = [5, 1, 19]
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    outs = []
    for split in (False, True):
        pools = model.allocate(num_blocks=16, block_size=16, num_slots=4)
        for step in range(2):
            chunks = [
                SeqChunk(tuple(p) if step == 0 else (p[0],), 0 if step == 0 else len(p), i, (2 * i, 2 * i + 1))
                for i, p in enumerate(prompts)
            ]
            batch = StepBatch.build(chunks, block_size=16)
            if not split:
                out = model.trunk.forward(batch, pools=pools, routed=model.routed)
            else:
                groups = [*split_sequences(lengths, 2), (3, 3)]  # [5, 1 | 19] and an empty third
                parts = [StepBatch.build(chunks[a:b], block_size=16) if b > a else None for a, b in groups]
                out = model.trunk.forward_split(batch, parts, pools=pools, routed=dispatcher)
            outs.append(out)
    for plain, split_out in zip(outs[:2], outs[2:]):
        assert torch.allclose(split_out.logits_RV, plain.logits_RV, atol=1e-5, rtol=0)
        assert torch.allclose(split_out.hidden_TD, plain.hidden_TD, atol=1e-5, rtol=0)
        assert torch.equal(split_out.logits_RV.argmax(-1), plain.logits_RV.argmax(-1))
