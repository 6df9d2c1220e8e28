"""The rank side of the prefix cache (replicas/ep/trunk_rank.py, replicas/ep/rank_seqs.py, model_shards/cache.py).

Driven by hand with step messages on a LocalRunner (fp32 embedded model):
- A prompt prefilled in chunks saves its DeltaNet state at 128 (`save_state`); a second sequence sharing the first
  128 tokens restores that checkpoint with the shared KV blocks and starts at 128: its greedy tokens and logprobs
  equal a one-shot prefill of its whole prompt (the oracle: LocalModel forward on fresh pools, no rank, no cache).
- Neither the checkpoint nor the shared blocks change while the second sequence runs (bit-identical).
- With MTP, the drafts of a restored sequence equal those of the same prompt prefilled from 0 on a fresh rank.
- A vision prompt resuming at 128, inside an image's pad rows: its first chunk on the rank encodes the images and
  takes the right rows (oracle: the same prompt prefilled from 0 on a fresh rank, itself checked against
  transformers in tests/model_shards/test_vision.py).
- Bad restores and saves are refused for that sequence alone, naming the problem.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult

pytestmark = pytest.mark.timeout(300)

BLOCK = 16
P = 128  # the cached length (two grid steps)
GREEDY = SamplingParams(temperature=0.0, logprobs=0)
SHARED = tuple(random.Random(0).randrange(1000, 200000) for _ in range(P + 1))
PROMPT_A = (*SHARED, *(random.Random(1).randrange(1000, 200000) for _ in range(21)))
PROMPT_B = (*SHARED, *(random.Random(2).randrange(1000, 200000) for _ in range(36)))
DECODE = 4


@pytest.fixture(scope="module")
def model(one_thread_mtp_model):  # noqa: ANN001, ANN201  # LocalModel (tests/conftest.py)
    return one_thread_mtp_model


def _oracle(model, prompt: tuple[int, ...], n: int) -> list[tuple[int, float]]:  # noqa: ANN001
    """Greedy (token, logprob) pairs: one-shot prefill of the whole prompt on fresh pools, then decode."""
    from model_shards.batch import SeqChunk, StepBatch

    blocks = -(-(len(prompt) + n) // BLOCK)
    pools = model.allocate(num_blocks=blocks, block_size=BLOCK, num_slots=1)
    table = tuple(range(blocks))
    out: list[tuple[int, float]] = []
    new, context = list(prompt), 0
    while len(out) < n:
        batch = StepBatch.build([SeqChunk(tuple(new), context, 0, table)], block_size=BLOCK)
        logp = torch.log_softmax(model.forward(batch, pools).logits_RV[-1].float(), dim=-1)
        context += len(new)
        tok = int(logp.argmax())
        out.append((tok, float(logp[tok])))
        new = [tok]
    return out


def _runner(model, *, checkpoints: int = 2, spec_tokens: int = 0):  # noqa: ANN001, ANN202  # LocalRunner
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    sizes = CacheSizes(
        num_blocks=40, block_size=BLOCK, num_slots=3, spec_tokens=spec_tokens, state_checkpoints=checkpoints
    )
    return LocalRunner(model, sizes)


def _one(runner, step: SeqStep, mtp_steps: int = 0) -> StepResult:  # noqa: ANN001
    return runner.run_step([StepRequest((step,), mtp_steps=mtp_steps)])[0]


def _blocks(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi))


def _prefill_a(runner, *, mtp: bool = False, mtp_steps: int = 0) -> None:  # noqa: ANN001
    """Sequence 1: prompt A in chunks [0, 64), [64, 128) saving checkpoint 1, [128, end) sampling."""
    start = SeqStart(0, GREEDY, len(PROMPT_A), mtp=mtp)
    shared = _blocks(0, P // BLOCK)
    steps = [
        SeqStep(1, 0, PROMPT_A[:64], shared[:4], start=start, sample=False, mtp_next=PROMPT_A[64] if mtp else None),
        SeqStep(1, 64, PROMPT_A[64:P], shared[4:], sample=False, save_state=1, mtp_next=PROMPT_A[P] if mtp else None),
        SeqStep(1, P, PROMPT_A[P:], _blocks(8, 11)),
    ]
    for s in steps:
        res = _one(runner, s, mtp_steps)
        assert res.errors in ((), (None,)), res.errors


def _run_b(runner, first: SeqStep, n: int, mtp_steps: int = 0) -> tuple[list[tuple[int, float]], list[tuple]]:  # noqa: ANN001
    """Sequence 2 from `first`, then greedy decode to n tokens: (token, logprob) pairs and each step's drafts."""
    out, drafts = [], []
    step, context = first, first.context_len + len(first.token_ids)
    while True:
        res = _one(runner, step, mtp_steps)
        assert res.errors in ((), (None,)), res.errors
        tok, lp = res.token_ids[0], res.logprobs[0]
        assert tok is not None and lp is not None
        out.append((tok, lp.logprob))
        drafts.append(res.drafts[0] if res.drafts else ())
        if len(out) == n:
            return out, drafts
        step = SeqStep(2, context, (tok,), (), output_index=len(out))  # the prefill's blocks hold these few tokens
        context += 1


def _restored_b(mtp: bool = False) -> SeqStep:
    own = _blocks(20, 20 + -(-(len(PROMPT_B) + DECODE - P) // BLOCK))
    start = SeqStart(1, GREEDY, len(PROMPT_B), mtp=mtp, restore=1)
    return SeqStep(2, P, PROMPT_B[P:], (*_blocks(0, P // BLOCK), *own), start=start)


def test_restored_sequence_equals_a_one_shot_prefill(model) -> None:  # noqa: ANN001
    runner = _runner(model)
    _prefill_a(runner)
    pools = runner.pools
    ckpt = (pools.ckpt_conv.clone(), pools.ckpt_recurrent.clone())  # type: ignore[union-attr]  # allocated above
    kv = (pools.k[:, : P // BLOCK].clone(), pools.v[:, : P // BLOCK].clone())
    assert bool(ckpt[1][:, 1].abs().sum() > 0), "the saved state is still zeros"
    first = _restored_b()
    got, _ = _run_b(runner, first, DECODE)
    want = _oracle(model, PROMPT_B, DECODE)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) < 1e-4, (got, want)
    assert torch.equal(pools.ckpt_conv, ckpt[0]) and torch.equal(pools.ckpt_recurrent, ckpt[1])  # type: ignore[arg-type]  # allocated
    assert torch.equal(pools.k[:, : P // BLOCK], kv[0]) and torch.equal(pools.v[:, : P // BLOCK], kv[1])


def test_mtp_drafts_of_a_restored_sequence_equal_a_fresh_prefill(model) -> None:  # noqa: ANN001
    """The MTP layer's KV rows of the cached prefix live in the shared blocks (written by sequence 1 with the same
    token at 128): drafting from 128 on reads them as a prefill from 0 would have written them."""
    cached = _runner(model)
    _prefill_a(cached, mtp=True, mtp_steps=2)
    got = _run_b(cached, _restored_b(mtp=True), DECODE, mtp_steps=2)
    fresh = _runner(model)
    own = _blocks(20, 20 + -(-(len(PROMPT_B) + DECODE) // BLOCK))
    first = SeqStep(2, 0, PROMPT_B, own, start=SeqStart(1, GREEDY, len(PROMPT_B), mtp=True))
    want = _run_b(fresh, first, DECODE, mtp_steps=2)
    assert [t for t, _ in got[0]] == [t for t, _ in want[0]]
    assert got[1] == want[1] and any(got[1]), (got[1], want[1])


def test_bad_restores_and_saves_are_refused_naming_the_problem(model) -> None:  # noqa: ANN001
    runner = _runner(model)
    ok = _restored_b()
    start = ok.start
    assert start is not None
    cases = {
        "outside this rank's state checkpoints": ok._replace(start=replace(start, restore=5)),
        "64-token grid, got 100": ok._replace(context_len=100, token_ids=PROMPT_B[100:]),
        "cannot hold the 128 cached tokens": ok._replace(new_blocks=_blocks(0, 4)),
        "repetition penalty needs its cached prompt ids": ok._replace(
            start=replace(start, params=SamplingParams(repetition_penalty=1.2))
        ),
        "resumes inside its prompt": ok._replace(start=replace(start, prompt_len=P), token_ids=(5,)),
    }
    for why, step in cases.items():
        res = _one(runner, step)
        assert res.token_ids == (None,) and why in (res.errors[0] or ""), (why, res.errors)
    fresh = SeqStart(0, GREEDY, len(PROMPT_A))
    save = SeqStep(1, 0, PROMPT_A[:100], _blocks(0, 7), start=fresh, sample=False, save_state=0)
    res = _one(runner, save)
    assert "not on the 64-token grid" in (res.errors[0] or ""), res.errors
    res = _one(runner, save._replace(token_ids=PROMPT_A[:64], save_state=2))
    assert "save_state 2 outside" in (res.errors[0] or ""), res.errors
    # a fresh start still begins at 0 without a restore
    res = _one(runner, save._replace(context_len=64, token_ids=PROMPT_A[64:P], save_state=None))
    assert "context 0" in (res.errors[0] or ""), res.errors


def test_vision_prompt_resuming_inside_an_image(model, embedded_model_dir: Path) -> None:  # noqa: ANN001
    """An image before the cached length and one whose pad rows straddle it (120..135): the restored sequence's
    first chunk (at 128) encodes the images on this rank and takes the right embedding rows; its tokens and
    logprobs equal a one-shot prefill of the same prompt on a fresh rank."""
    import numpy as np
    from PIL import Image

    from model_shards.checkpoint_files import CheckpointReader
    from model_shards.config import from_hf_config
    from model_shards.image_processing import PreprocessConfig, preprocess_image
    from model_shards.mm_positions import TEXT, VisionItem, VisionTokenIds, mrope_positions, token_types
    from model_shards.vision import VisionTower, load_vision
    from replicas.ep.dispatch import LocalDispatcher
    from replicas.ep.trunk_rank import TrunkRank

    cfg = from_hf_config(embedded_model_dir)
    assert cfg.vision is not None
    tok, merge = VisionTokenIds.from_config(cfg), cfg.vision.spatial_merge_size
    weights = load_vision(CheckpointReader(embedded_model_dir), cfg, dtype=torch.float32)
    tower = VisionTower(weights, cfg.vision, dtype=torch.float32)
    small = PreprocessConfig.for_vision(cfg.vision)
    small = replace(small, min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 16)
    rng = np.random.default_rng(0)
    images = [
        preprocess_image(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), cfg=small)
        for h, w in ((64, 96), (128, 128))
    ]
    pads = [v.grid_thw[0] * v.grid_thw[1] * v.grid_thw[2] // merge**2 for v in images]
    text = list(PROMPT_B)
    first_img = [tok.vision_start, *[tok.image] * pads[0], tok.vision_end]
    lead = 120 - len(first_img) - 11  # the second image's pads start at 120
    ids = [*text[:10], *first_img, *text[10 : 10 + lead], tok.vision_start]
    ids += [*[tok.image] * pads[1], tok.vision_end, *text[40:70]]
    assert ids.index(tok.image, 10 + len(first_img)) == 120 and 120 + pads[1] > P, pads
    types = token_types(ids, tokens=tok)
    items = [VisionItem("image", v.grid_thw) for v in images]
    positions, delta = mrope_positions(types, items, merge_size=merge)
    rows = tuple(i for i, t in enumerate(types) if t != TEXT)
    prompt = tuple(ids)

    def rank() -> TrunkRank:
        pools = model.allocate(num_blocks=40, block_size=BLOCK, num_slots=3, num_checkpoints=2)
        routed = LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
        return TrunkRank(model.trunk, pools, routed, vision=tower)

    def start(slot: int, restore: int | None = None) -> SeqStart:
        return SeqStart(
            slot, GREEDY, len(prompt), rope_delta=delta, mm_positions=positions, vision_rows=rows,
            vision=tuple(images), restore=restore,
        )  # fmt: skip

    def decode(r: TrunkRank, first: SeqStep) -> list[tuple[int, float]]:
        out, step, context = [], first, len(prompt)
        while len(out) < DECODE:
            res = r.step(StepRequest((step,)))
            assert res.errors in ((), (None,)), res.errors
            tok_, lp = res.token_ids[0], res.logprobs[0]
            assert tok_ is not None and lp is not None
            out.append((tok_, lp.logprob))
            step, context = SeqStep(2, context, (tok_,), (), output_index=len(out)), context + 1
        return out

    need = -(-(len(prompt) + DECODE) // BLOCK)
    cached = rank()
    for s in (
        SeqStep(1, 0, prompt[:64], _blocks(0, 4), start=start(0), sample=False),
        SeqStep(1, 64, prompt[64:P], _blocks(4, 8), sample=False, save_state=1),
    ):
        res = cached.step(StepRequest((s,)))
        assert res.errors in ((), (None,)), res.errors
    own = _blocks(20, 20 + need - P // BLOCK)
    got = decode(cached, SeqStep(2, P, prompt[P:], (*_blocks(0, P // BLOCK), *own), start=start(1, restore=1)))
    want = decode(rank(), SeqStep(2, 0, prompt, _blocks(20, 20 + need), start=start(1)))
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert abs(a - b) < 1e-4, (got, want)
