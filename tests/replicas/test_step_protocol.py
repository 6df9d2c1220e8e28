"""The incremental step message between the engine and its trunk ranks (replicas/engine/step_types.py).

- A decode step's message does not grow with the context: what a sequence's step carries is its new token and
  flags; its block table, sampling and history stay on the rank.
- Preemption and recompute through the incremental protocol (the rank forgets the preempted sequence and is
  started again from context 0, chunked prefill over prompt + outputs so far) give the tokens of a
  single-process greedy loop that never preempts (the oracle: LocalModel forward + the sampler's penalty
  function + argmax, no engine, no rank state), with and without penalties (whose history the rank rebuilds
  from the tokens it is fed).
- A rank asked to continue a sequence it does not hold (its state was lost, e.g. the rank restarted) or at a
  context it does not have refuses that sequence alone; the others in the step are served.
"""

from __future__ import annotations

import asyncio
import pickle
import random
from pathlib import Path

import pytest
import torch

from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult

pytestmark = pytest.mark.timeout(300)

BLOCK = 16


# ---------------------------------------------------------------------------- message size
class _InstantRunner:
    """Answers at once (token 7 for each sampling sequence) and keeps the pickled decode-step messages."""

    def __init__(self) -> None:
        self.decode_bytes: list[int] = []

    async def step(self, reqs: list[StepRequest]) -> list[StepResult]:
        if all(len(s.token_ids) == 1 and s.start is None for r in reqs for s in r.seqs):
            self.decode_bytes.append(len(pickle.dumps(reqs[0], protocol=5)))
        # per sequence: the columnar decodes, then `seqs`
        return [
            StepResult((7,) * len(r.decodes) + tuple(7 if s.sample else None for s in r.seqs), (None,) * r.num_seqs)
            for r in reqs
        ]


def _decode_message_bytes(context: int) -> list[int]:
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.engine_types import GenerateRequest
    from replicas.engine.scheduler import SchedulerConfig

    async def main() -> list[int]:
        runner = _InstantRunner()
        engine = Engine(
            runner,
            pools=[BlockPool(num_blocks=512, num_slots=2, block_size=BLOCK)],
            config=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8192),
        )
        engine.start()
        try:
            prompt = tuple(1000 + i % 5000 for i in range(context))
            req = GenerateRequest("r", prompt, SamplingParams(temperature=0.0), max_tokens=6, ignore_eos=True)
            async for _ in engine.generate(req):
                pass
        finally:
            await engine.stop()
        return runner.decode_bytes

    return asyncio.run(main())


def test_decode_message_does_not_grow_with_context() -> None:
    """1k vs 4k tokens of context (neither crossing a KV block in its decode steps): the same bytes per step."""
    short, long = _decode_message_bytes(1001), _decode_message_bytes(4001)
    assert len(short) == len(long) == 5, (short, long)  # 6 tokens: the prefill samples one, 5 decode steps
    assert long == short, f"decode messages grew with the context: {short} -> {long} bytes"
    assert max(long) < 300, f"a one-sequence decode message takes {max(long)} bytes"


# ---------------------------------------------------------------------------- preemption, against an oracle
@pytest.fixture(scope="module")
def model(embedded_model_dir: Path):  # noqa: ANN201  # LocalModel
    from model_shards.model import LocalModel

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as every rank actor runs
    yield LocalModel.load(embedded_model_dir, dtype="float32", with_mtp=False)
    torch.set_num_threads(before)


def _oracle(model, prompt: tuple[int, ...], params: SamplingParams, max_tokens: int) -> tuple[int, ...]:  # noqa: ANN001
    """Greedy decoding in one process, one sequence, no engine: forward, the penalty function, argmax."""
    from model_shards.batch import SeqChunk, StepBatch
    from tests.sampling_reference import penalties

    blocks = -(-(len(prompt) + max_tokens) // BLOCK)
    pools = model.allocate(num_blocks=blocks, block_size=BLOCK, num_slots=1)
    table = tuple(range(blocks))
    out: list[int] = []
    new, context = list(prompt), 0
    while len(out) < max_tokens:
        batch = StepBatch.build([SeqChunk(tuple(new), context, 0, table)], block_size=BLOCK)
        logits = model.forward(batch, pools).logits_RV[-1].float()
        if params.has_penalties:
            logits = penalties(
                logits, params, torch.tensor(prompt, dtype=torch.long), torch.tensor(out, dtype=torch.long)
            )
        context += len(new)
        out.append(int(logits.argmax()))
        new = [out[-1]]
    return tuple(out)


PROMPTS = [tuple(random.Random(i).randrange(1000, 200000) for _ in range(n)) for i, n in enumerate((70, 33, 90, 21))]
MAX_TOKENS = 24


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=0.8)],
    ids=["greedy", "penalties"],
)
def test_preemption_and_recompute_equal_a_run_without_preemption(model, params: SamplingParams) -> None:  # noqa: ANN001
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.engine_types import GenerateRequest
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    num_blocks = 8  # the longest sequence needs all 8 blocks, all four together 22: the newest are preempted
    runner = LocalRunner(model, CacheSizes(num_blocks=num_blocks, block_size=BLOCK, num_slots=len(PROMPTS)))

    async def main() -> tuple[list[tuple[int, ...]], int]:
        engine = Engine(
            runner,
            pools=[BlockPool(num_blocks=num_blocks, num_slots=len(PROMPTS), block_size=BLOCK)],
            config=SchedulerConfig(max_num_seqs=len(PROMPTS), max_num_batched_tokens=64),  # chunked prefill too
            max_waiting=len(PROMPTS),
        )
        engine.start()

        async def one(i: int, prompt: tuple[int, ...]) -> tuple[int, ...]:
            req = GenerateRequest(f"r{i}", prompt, params, max_tokens=MAX_TOKENS, ignore_eos=True)
            toks: list[int] = []
            async for item in engine.generate(req):
                for ev in item.outputs:
                    assert ev.error is None, ev.error
                    toks += ev.token_ids
            return tuple(toks)

        try:
            outs = await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))), 240)
            assert all(p["free_blocks"] == num_blocks for p in engine.pool_state())
            return list(outs), engine.scheduler.num_preemptions
        finally:
            await engine.stop()

    outs, preemptions = asyncio.run(main())
    assert preemptions > 0, "the small pool was meant to preempt"
    for i, (prompt, got) in enumerate(zip(PROMPTS, outs)):
        want = _oracle(model, prompt, params, MAX_TOKENS)
        assert got == want, (
            f"prompt {i}: first difference at {next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)}"
        )


# ---------------------------------------------------------------------------- unknown sequences
def test_unknown_sequence_is_refused_alone(model) -> None:  # noqa: ANN001
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    prompt = PROMPTS[1]
    want = _oracle(model, prompt, SamplingParams(temperature=0.0), 3)
    runner = LocalRunner(model, CacheSizes(num_blocks=16, block_size=BLOCK, num_slots=2))
    greedy = SamplingParams(temperature=0.0)
    res = runner.run_step([StepRequest((SeqStep(4, 0, prompt, (0, 1, 2), start=SeqStart(0, greedy, len(prompt))),))])[0]
    assert res.errors in ((), (None,)) and res.token_ids[0] == want[0]
    first = res.token_ids[0]
    assert first is not None
    res = runner.run_step(
        [
            StepRequest(
                (
                    SeqStep(8, 40, (5,)),  # never started here
                    SeqStep(4, len(prompt), (first,)),
                    SeqStep(4, 3, (5,)),  # a context this rank does not hold (a duplicate, out of step)
                )
            )
        ]
    )[0]
    assert "not held" in (res.errors[0] or ""), res.errors
    assert res.errors[1] is None and res.token_ids[1] == want[1]
    assert "continues at 3" in (res.errors[2] or ""), res.errors
    assert res.token_ids[0] is None and res.token_ids[2] is None
    # a fresh rank (restarted: its state is gone) refuses to continue sequence 4 instead of failing the step
    fresh = LocalRunner(model, CacheSizes(num_blocks=16, block_size=BLOCK, num_slots=2))
    res = fresh.run_step([StepRequest((SeqStep(4, len(prompt) + 1, (want[1],)),))])[0]
    assert res.token_ids == (None,) and "not held" in (res.errors[0] or "")
    # columnar decodes (StepRequest.decodes): the rank feeds back the token it sampled (the oracle's next token
    # follows), before `seqs` in the result; one it does not hold, or holds at another context, is refused alone
    res = runner.run_step([StepRequest(decodes=(9, 4), decode_context=(40, len(prompt) + 1))])[0]
    assert "not held" in (res.errors[0] or ""), res.errors
    assert res.errors[1] is None and res.token_ids[1] == want[2], (res.token_ids, want)
    res = runner.run_step([StepRequest(decodes=(4,), decode_context=(3,))])[0]
    assert res.token_ids == (None,) and "continues at 3" in (res.errors[0] or ""), res.errors


# ---------------------------------------------------------------------------- restores with penalties
def test_a_restore_with_a_repetition_penalty_needs_its_cached_prompt_ids() -> None:
    """A prefix-cache hit of a request with a repetition penalty brings the cached prompt's ids (its penalty reads
    the whole prompt), exactly as many as the cached length; the rank's history then starts with them."""
    from replicas.engine.step_types import SeqStart, SeqStep
    from replicas.ep.rank_seqs import SeqTable

    table = SeqTable(vocab_size=1000, num_slots=2, num_blocks=16, block_size=16, num_checkpoints=2)
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    prefix = tuple(range(10, 74))

    def start(params: SamplingParams, ids: tuple[int, ...], context: int = 64, restore: int | None = 0) -> SeqStep:
        st = SeqStart(slot=0, params=params, prompt_len=100, restore=restore, prefix_ids=ids)
        return SeqStep(1, context, (5,) * (100 - context), tuple(range(7)), start=st)

    assert "needs its cached prompt ids" in (table.refusal(start(rep, ())) or "")
    assert "brings 63 cached prompt ids" in (table.refusal(start(rep, prefix[:63])) or "")
    assert "outside the vocabulary" in (table.refusal(start(rep, (1000,) * 64)) or "")
    assert "only with a restore" in (table.refusal(start(rep, prefix, context=0, restore=None)) or "")
    assert table.refusal(start(SamplingParams(temperature=0.0, presence_penalty=0.5), ())) is None
    ok = start(rep, prefix)
    assert table.refusal(ok) is None
    live = table.resolve(ok)
    table.history.flush()
    assert live.state.history_len == 100
    assert table.history.ids[live.state.row, :100].tolist() == [*prefix, *(5,) * 36]
    table.release((1,))
    assert table.history.ids.shape[0] == 4, "the row went back (the pool shrank to its first size)"
