"""The engine's output stream: token ids, at most one item per request per engine step, and choices the front end
stops (`finish_choice`).

Drives the Engine in process with LocalRunner (replicas/ep/offline.py), as tests/replicas/test_speculative.py
does. Oracles: the engine's step counter (items per request against steps run) and the same requests run without
speculation and without stopping (the tokens must be those).
"""

from __future__ import annotations

import asyncio

import pytest

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest, RequestOutput
from tests.replicas.test_speculative import (  # noqa: F401  # fixtures
    BLOCK,
    GREEDY,
    _Async,
    _prompts,
    peaked_checkpoint,
    peaked_model,
)

pytestmark = pytest.mark.timeout(600)

PROMPTS = _prompts(4, (20, 35, 9, 17), seed=3)
MAX_TOKENS = 20


def _engine(model, *, k: int, slots: int = 8):  # noqa: ANN001, ANN202
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.offline import LocalRunner

    runner = _Async(LocalRunner(model, num_blocks=64, block_size=BLOCK, num_slots=slots, spec_tokens=k))
    return Engine(
        runner,
        pools=[BlockPool(num_blocks=64, num_slots=slots, block_size=BLOCK)],
        config=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=256, lookahead=2 * k),
        max_waiting=16,
        spec_tokens=k,
    )


def _req(i: int, prompt: tuple[int, ...], *, n: int = 1, params: SamplingParams = GREEDY) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"r{i}", prompt_ids=prompt, params=params, max_tokens=MAX_TOKENS, n=n, ignore_eos=True
    )


def _run(model, reqs: list[GenerateRequest], *, k: int, on_item=None):  # noqa: ANN001, ANN202
    """Each request's items, with the engine's step counter when each arrived; and the steps run in all."""

    async def main():  # noqa: ANN202
        engine = _engine(model, k=k)
        engine.start()

        async def one(req: GenerateRequest) -> list[tuple[RequestOutput, int]]:
            items = []
            async for item in engine.generate(req):
                items.append((item, engine.steps))
                if on_item is not None:
                    on_item(engine, req, items)
            return items

        try:
            outs = await asyncio.wait_for(asyncio.gather(*(one(r) for r in reqs)), 300)
            for pool in engine.pool_state():  # every choice's caches returned
                assert pool["free_blocks"] == pool["num_blocks"] and pool["free_slots"] == pool["num_slots"]
            return outs, engine.steps
        finally:
            await engine.stop()

    return asyncio.run(main())


def _tokens(items: list[tuple[RequestOutput, int]], index: int = 0) -> list[int]:
    return [t for item, _ in items for o in item.outputs if o.index == index for t in o.token_ids]


def _check_one_item_per_step(items: list[tuple[RequestOutput, int]], total_steps: int) -> None:
    steps = [item.step for item, _ in items]
    assert all(a < b for a, b in zip(steps, steps[1:])), f"two items in one step: {steps}"
    assert all(item.step == seen for item, seen in items), "an item is made by the step that just ran"
    assert len(items) <= total_steps
    for item, _ in items:
        indices = [o.index for o in item.outputs]
        assert len(indices) == len(set(indices)), "a choice appears once per item"


@pytest.fixture(scope="module")
def plain(peaked_model) -> list[list[int]]:  # noqa: ANN001, F811  # fixture imported above
    """Reference tokens: no speculation."""
    outs, steps = _run(peaked_model, [_req(i, p) for i, p in enumerate(PROMPTS)], k=0)
    for items in outs:
        _check_one_item_per_step(items, steps)
        assert len(items) == MAX_TOKENS, "without drafts: one token per step, one item per step"
        assert all(len(o.token_ids) == 1 for item, _ in items for o in item.outputs)
    return [_tokens(items) for items in outs]


def test_speculation_puts_a_steps_tokens_in_one_item(peaked_model, plain) -> None:  # noqa: ANN001, F811  # fixture imported above
    outs, steps = _run(peaked_model, [_req(i, p) for i, p in enumerate(PROMPTS)], k=2)
    multi = 0
    for i, items in enumerate(outs):
        _check_one_item_per_step(items, steps)
        assert _tokens(items) == plain[i], f"prompt {i}"
        multi += sum(len(o.token_ids) > 1 for item, _ in items for o in item.outputs)
        last = items[-1][0].outputs[-1]
        assert last.finish_reason == "length" and last.completion_tokens == MAX_TOKENS
    assert multi > 0, "no accepted draft in any step: the test would not see several tokens in one item"


def test_n_choices_share_one_item_per_step(peaked_model) -> None:  # noqa: ANN001, F811  # fixture imported above
    params = SamplingParams(temperature=1.0, seed=5)
    ((items,), steps) = _run(peaked_model, [_req(0, PROMPTS[0], n=3, params=params)], k=0)
    _check_one_item_per_step(items, steps)
    assert len(items) == MAX_TOKENS and all(len(item.outputs) == 3 for item, _ in items)
    assert len({tuple(_tokens(items, i)) for i in range(3)}) > 1, "choices sampled independently"


def test_finish_choice_stops_one_choice_and_frees_it(peaked_model, plain) -> None:  # noqa: ANN001, F811  # fixture imported above
    stop_after = 3

    def stop_choice_0(engine, req, items) -> None:  # noqa: ANN001
        if len(items) == stop_after:
            engine.finish_choice(req.request_id, 0)

    ((items,), steps) = _run(peaked_model, [_req(0, PROMPTS[0], n=2)], k=0, on_item=stop_choice_0)
    _check_one_item_per_step(items[:stop_after], steps)
    after = [o for item, _ in items[stop_after:] for o in item.outputs if o.index == 0]
    assert len(after) == 1 and after[0].finish_reason == "stop" and after[0].token_ids == (), after
    assert len(_tokens(items, 0)) == stop_after
    assert _tokens(items, 1) == plain[0], "the other choice runs on to max_tokens unchanged"
