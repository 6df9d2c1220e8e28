"""The engine's output stream: token ids, at most one item per request per engine step (n choices share it), and
choices the front end stops (`finish_choice`).

Drives the Engine in process with LocalRunner (replicas/ep/local_runner.py). Oracles: the engine's step counter (items
per request against steps run) and the same request run alone without stopping (the tokens must be those). With
speculation (several tokens of a choice in one item): tests/replicas/test_speculative.py checks every engine run.
"""

from __future__ import annotations

import asyncio

import pytest

from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest, RequestOutput
from tests.replicas.test_speculative import BLOCK, GREEDY, _local, _prompts

pytestmark = pytest.mark.timeout(600)

PROMPTS = _prompts(3, (20, 35, 9), seed=3)
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_model(embedded_model_dir):  # noqa: ANN001, ANN201  # LocalModel
    from model_shards.model import LocalModel

    return LocalModel.load(embedded_model_dir, dtype="float32")


def _engine(model, *, k: int, slots: int = 8):  # noqa: ANN001, ANN202
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig

    runner = _local(model, k=k, num_blocks=64, slots=slots)
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
            await _assert_all_freed(engine)
            return outs, engine.steps
        finally:
            await engine.stop()

    return asyncio.run(main())


async def _assert_all_freed(engine) -> None:  # noqa: ANN001
    """Every choice's caches are returned (a stopped or aborted one's before the step after the one in flight)."""
    for _ in range(1000):
        if engine.stats()["running"] == 0 and not engine.stats()["waiting"]:
            break
        await asyncio.sleep(0.01)
    for pool in engine.pool_state():
        assert pool["free_blocks"] == pool["num_blocks"] and pool["free_slots"] == pool["num_slots"]


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
def plain(tiny_model) -> list[list[int]]:  # noqa: ANN001
    """Reference tokens: each prompt alone, greedy."""
    outs = []
    for i, p in enumerate(PROMPTS):
        ((items,), steps) = _run(tiny_model, [_req(i, p)], k=0)
        _check_one_item_per_step(items, steps)
        assert len(items) == MAX_TOKENS, "one token per step, one item per step"
        outs.append(_tokens(items))
    return outs


def test_concurrent_requests_get_one_item_per_step(tiny_model, plain) -> None:  # noqa: ANN001
    outs, steps = _run(tiny_model, [_req(i, p) for i, p in enumerate(PROMPTS)], k=0)
    for i, items in enumerate(outs):
        _check_one_item_per_step(items, steps)
        assert _tokens(items) == plain[i], f"prompt {i}"
        last = items[-1][0].outputs[-1]
        assert last.finish_reason == "length" and last.completion_tokens == MAX_TOKENS


def test_n_choices_share_one_item_per_step(tiny_model) -> None:  # noqa: ANN001
    params = SamplingParams(temperature=1.0, seed=5)
    ((items,), steps) = _run(tiny_model, [_req(0, PROMPTS[0], n=3, params=params)], k=0)
    _check_one_item_per_step(items, steps)
    assert len(items) == MAX_TOKENS and all(len(item.outputs) == 3 for item, _ in items)
    assert len({tuple(_tokens(items, i)) for i in range(3)}) > 1, "choices sampled independently"


def test_finish_choice_stops_one_choice_and_frees_it(tiny_model, plain) -> None:  # noqa: ANN001
    stop_after = 3

    def stop_choice_0(engine, req, items) -> None:  # noqa: ANN001
        if len(items) == stop_after:
            engine.finish_choice(req.request_id, 0)

    ((items,), steps) = _run(tiny_model, [_req(0, PROMPTS[0], n=2)], k=0, on_item=stop_choice_0)
    _check_one_item_per_step(items[:stop_after], steps)
    after = [o for item, _ in items[stop_after:] for o in item.outputs if o.index == 0]
    assert len(after) == 1 and after[0].finish_reason == "stop" and after[0].token_ids == (), after
    assert len(_tokens(items, 0)) == stop_after
    assert _tokens(items, 1) == plain[0], "the other choice runs on to max_tokens unchanged"


def test_finish_choice_reaches_a_reader_waiting_on_the_shared_delivery(tiny_model, plain) -> None:  # noqa: ANN001
    """n = 1: while a choice decodes its reader waits on the engine's one future of the next delivery, not its own;
    a `finish_choice` from elsewhere (the call below runs once that reader waits) must still end its stream with
    the acknowledgement, alone and beside a request that runs on."""
    stop_after = 3

    def stop_r0_later(engine, req, items) -> None:  # noqa: ANN001
        if req.request_id == "r0" and len(items) == stop_after:
            asyncio.get_running_loop().call_soon(engine.finish_choice, "r0", 0)

    def stop_r0_from_r1(engine, req, items) -> None:  # noqa: ANN001
        if req.request_id == "r1" and len(items) == stop_after:
            engine.finish_choice("r0", 0)

    for reqs, on_item in (
        ([_req(0, PROMPTS[0])], stop_r0_later),
        ([_req(0, PROMPTS[0]), _req(1, PROMPTS[1])], stop_r0_from_r1),
    ):
        outs, _ = _run(tiny_model, reqs, k=0, on_item=on_item)
        last = outs[0][-1][0].outputs[-1]
        assert last.finish_reason == "stop" and last.token_ids == (), outs[0]
        assert stop_after <= len(_tokens(outs[0])) < MAX_TOKENS
        assert _tokens(outs[0]) == plain[0][: len(_tokens(outs[0]))]
        if len(reqs) == 2:
            assert _tokens(outs[1]) == plain[1], "the other request runs on to max_tokens unchanged"


def test_cancelled_reader_leaves_the_other_streams_running(tiny_model, plain) -> None:  # noqa: ANN001
    """Cancelling one decoding request's reader cancels the future it awaits, shared by every decoding reader: the
    others must run on to their own (reference) tokens, and the cancelled request's caches are freed."""

    async def main():  # noqa: ANN202
        engine = _engine(tiny_model, k=0)
        engine.start()
        got: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
        third = asyncio.Event()

        async def one(i: int) -> None:
            async for item in engine.generate(_req(i, PROMPTS[i])):
                got[i].extend(t for o in item.outputs for t in o.token_ids)
                if i == 0 and len(got[0]) == 3:
                    third.set()

        try:
            tasks = [asyncio.create_task(one(i)) for i in range(len(PROMPTS))]
            await asyncio.wait_for(third.wait(), 300)
            await asyncio.sleep(0)  # the readers are back waiting for the next step
            tasks[0].cancel()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
            assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [None] * (len(PROMPTS) - 1)
            await _assert_all_freed(engine)
            return got
        finally:
            await engine.stop()

    got = asyncio.run(main())
    assert got[0] == plain[0][: len(got[0])] and len(got[0]) < MAX_TOKENS
    for i in range(1, len(PROMPTS)):
        assert got[i] == plain[i], f"prompt {i}"


def test_a_group_answer_short_of_tokens_fails_its_requests_retriably() -> None:
    """A result without a token per sequence (a broken runner) fails the step like a group failure: every request
    ends with a retriable error naming the counts, instead of the update raising in the loop and every stream
    waiting forever."""
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.engine.step_types import StepResult

    class Short:
        async def step(self, requests):  # noqa: ANN001, ANN202
            return [StepResult((7,) * (r.num_seqs - 1), (None,) * (r.num_seqs - 1)) for r in requests]

    async def main() -> list:
        engine = Engine(Short(), pools=[BlockPool(num_blocks=16, num_slots=2, block_size=16)], config=SchedulerConfig())
        engine.start()
        try:
            req = GenerateRequest("r", (1, 2, 3), GREEDY, max_tokens=4)
            return [o for item in [i async for i in engine.generate(req)] for o in item.outputs]
        finally:
            await engine.stop()

    outs = asyncio.run(asyncio.wait_for(main(), 60))
    assert len(outs) == 1 and outs[0].error is not None and outs[0].error.retriable, outs
    assert "answered [0] tokens for [1] sequences" in outs[0].error.message, outs[0].error


def test_engine_start_raises_the_young_gc_threshold_and_never_lowers_it() -> None:
    """At hundreds running, each step allocates thousands of short-lived objects: the engine raises the first GC
    threshold (default 700) so no young collection promotes the step's items in flight (~0.5 ms per step at 512),
    and leaves a higher one the process chose alone."""
    import gc

    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import GC_YOUNG_THRESHOLD, Engine
    from replicas.engine.scheduler import SchedulerConfig

    class Idle:
        async def step(self, requests):  # noqa: ANN001, ANN202  # never called: no request
            raise AssertionError("no step expected")

    saved = gc.get_threshold()

    async def started(first: int) -> tuple[int, int, int]:
        gc.set_threshold(first, saved[1], saved[2])
        engine = Engine(Idle(), pools=[BlockPool(num_blocks=4, num_slots=1, block_size=16)], config=SchedulerConfig())
        engine.start()
        try:
            return gc.get_threshold()
        finally:
            await engine.stop()

    try:
        assert asyncio.run(started(700)) == (GC_YOUNG_THRESHOLD, saved[1], saved[2])
        assert asyncio.run(started(10 * GC_YOUNG_THRESHOLD)) == (10 * GC_YOUNG_THRESHOLD, saved[1], saved[2])
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def test_shared_delivery_wakes_its_readers_once_in_order_and_later_callbacks_too() -> None:
    """The delivery every decoding reader awaits records readers through a plain future (not a Python override):
    delivering wakes each waiting task once, in the order they began to wait; a callback removed before delivery
    is never called; one added after delivery is called with the delivery (the Future's own path)."""
    from replicas.engine.engine import _Delivery

    async def main() -> None:
        loop = asyncio.get_running_loop()
        d = _Delivery(loop=loop)
        woke: list[int] = []

        async def reader(i: int) -> None:
            await d
            woke.append(i)

        tasks = [asyncio.create_task(reader(i)) for i in range(3)]
        await asyncio.sleep(0)  # all three wait on d
        removed: list[object] = []

        def gone(f: object) -> None:
            removed.append(f)

        d.add_done_callback(gone)
        assert d.remove_done_callback(gone) == 1
        d.deliver()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert woke == [0, 1, 2]
        later: asyncio.Future[object] = loop.create_future()
        d.add_done_callback(later.set_result)
        assert await asyncio.wait_for(later, 10) is d
        assert removed == []

    asyncio.run(main())
