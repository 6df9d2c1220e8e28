"""Failure classification that holds under NCCL, emulated on CPU: peers stay silent while one rank fails.

One D=1 x X=2 group on the shared 3-node Ray cluster with a long collective deadline (60 s, as NCCL's peers of a
failed rank stay silent until their watchdog fires) and the test-only fault hook (cluster/rank_progress.py's
`Fault`): the failing rank does not leave its gloo group, so its peers wait in the collective without an error.
Oracle: the single-process model (tests/replicas/test_group.py's `_Reference`) on the same inputs.
- an expert rank raising mid-step is the one replaced: the others keep their processes and their single weight
  load, nothing continues from the failed step's half-updated state, and the group serves the reference's tokens;
- a hung expert rank (alive, sleeping outside any collective) is named within 10 s, not at the 60 s deadline;
- a trunk rank raising mid-step (its step came on the driver's step stream, no Ray call) is the one replaced;
- an out-of-memory error before a trunk rank's first collective fails only that step's request (a 500 that is
  not retriable, so never retried on another group) and the same group keeps serving other requests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cluster.rank_progress import Fault
from model_shards.batch import SeqChunk
from model_shards.sampling import SamplingParams
from replicas.engine.engine_types import GenerateRequest
from replicas.engine.step_types import SeqStep, StepRequest
from tests.replicas.test_group import BLOCK, _group, _prompts, _Reference, _Scenario

pytestmark = pytest.mark.timeout(300)

DEADLINE_S = 60.0  # the collective deadline: far beyond what any detection below may take


@pytest.fixture(scope="module")
def reference(hf_checkpoint: Path) -> _Reference:
    return _Reference(hf_checkpoint)


@pytest.fixture(scope="module")
def group(ray_cluster, hf_checkpoint: Path):  # noqa: ANN001, ANN201
    g = _group(hf_checkpoint, 1, 2, deadline_s=DEADLINE_S)
    yield g
    g.shutdown()


def _pids(group) -> list[int]:  # noqa: ANN001
    import ray

    return ray.get([a.pid.remote() for a in group.trunks + group.experts], timeout=60)


def _loads(group) -> list[int]:  # noqa: ANN001
    import ray

    return ray.get([a.weight_loads.remote() for a in group.trunks + group.experts], timeout=60)


def _arm(actor, fault: Fault) -> None:  # noqa: ANN001
    import ray

    ray.get(actor.arm_fault.remote(fault), timeout=30)


def _serves_like_reference(group, reference: _Reference, seed: int) -> None:  # noqa: ANN001
    sc = _Scenario(group, reference, 1)
    for sid, p in enumerate(_prompts(seed, [23, 9])):
        sc.add(5 + sid, rank=0, prompt=p, slot=sid)  # the reference's blocks: sid x 16 of its 128
    sc.step([5, 6])
    sc.step([5, 6])


def _failed_step(group, reference: _Reference, victim: int, fault: Fault):  # noqa: ANN001, ANN202
    """Prefill a sequence, arm `fault` on expert rank `victim`, run the next step: returns (failure, seconds, the
    sequence's continuation that the rebuilt group must refuse)."""
    from replicas.ep.group import GroupFailure

    sc = _Scenario(group, reference, 1)
    sc.add(0, rank=0, prompt=_prompts(41, [40])[0], slot=0)
    tok = sc.step([0])[0]
    _arm(group.experts[victim], fault)
    t0 = time.monotonic()
    with pytest.raises(GroupFailure) as info:
        sc.step([0])
    return info.value, time.monotonic() - t0, SeqStep(0, sc.seqs[0]["ctx"], (tok,))


def test_oom_before_first_collective_fails_only_its_request(group, reference: _Reference) -> None:  # noqa: ANN001
    """Through the engine: the request of the step whose trunk rank ran out of memory before the step's first
    collective ends with a non-retriable 500; the group is not failed (same epoch, no rank replaced) and the next
    request gets the reference's greedy tokens."""
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.scheduler import SchedulerConfig

    pids, epoch = _pids(group), group.epoch
    prompts = _prompts(43, [30, 12])
    greedy = SamplingParams(temperature=0.0)

    def req(i: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"oom{i}", prompt_ids=tuple(prompts[i]), params=greedy, max_tokens=4, ignore_eos=True
        )

    async def main() -> tuple[list, list]:
        engine = Engine(
            group,
            pools=[BlockPool(num_blocks=128, num_slots=8, block_size=BLOCK)],
            config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256),
            recover=group.rebuild,
        )
        engine.start()
        try:
            _arm(group.trunks[0], Fault("start", "oom"))
            first = [item async for item in engine.generate(req(0))]
            second = [item async for item in engine.generate(req(1))]
            return first, second
        finally:
            await engine.stop()

    first, second = asyncio.run(asyncio.wait_for(main(), 120))
    errors = [o.error for item in first for o in item.outputs if o.error is not None]
    assert len(errors) == 1, first
    assert not errors[0].retriable and errors[0].status == 500, errors[0]
    assert "out of memory" in errors[0].message, errors[0].message
    assert not [t for item in first for o in item.outputs for t in o.token_ids]
    tokens = [t for item in second for o in item.outputs for t in o.token_ids]
    want, ctx, pending = [], 0, list(prompts[1])
    for _ in range(4):  # the reference's greedy continuation, its own cache slot
        lp = reference.logprobs(SeqChunk(tuple(pending), ctx, 7, tuple(range(7 * 16, 7 * 16 + 2))))
        ctx += len(pending)
        pending = [int(lp.argmax())]
        want.append(pending[0])
    assert tokens == want
    assert group.epoch == epoch and _pids(group) == pids


def test_raising_expert_is_replaced_alone_while_peers_stay_silent(group, reference: _Reference) -> None:  # noqa: ANN001
    import ray

    victim = group.shape.expert_rank(1)
    pids, loads, created = _pids(group), _loads(group), list(group.actors_created)
    failure, took, continuation = _failed_step(group, reference, 1, Fault("collective:2", "raise"))
    # the peers were waiting in collective 2 (no error of their own: gloo left open, as NCCL would)
    assert failure.raised.keys() == {victim} and "injected fault" in failure.raised[victim], str(failure)
    assert failure.collateral == (group.shape.trunk_rank(0), group.shape.expert_rank(0)), str(failure)
    assert failure.failed_ranks == (victim,) and not failure.dead and not failure.hung
    assert took < 10.0, f"the failure took {took:.1f} s to classify (deadline {DEADLINE_S} s)"
    group.rebuild()
    assert group.last_recovery["replaced"] == [victim], group.last_recovery
    new_pids = _pids(group)
    assert new_pids[victim] != pids[victim]
    assert [p for r, p in enumerate(new_pids) if r != victim] == [p for r, p in enumerate(pids) if r != victim]
    # the kept ranks loaded no weights; only the replaced rank's slot loaded again
    assert [n for r, n in enumerate(_loads(group)) if r != victim] == [n for r, n in enumerate(loads) if r != victim]
    assert group.actors_created == [n + (r == victim) for r, n in enumerate(created)]
    # the sequence whose step failed does not continue from its half-updated state: the trunk rank forgot it
    res = asyncio.run(group.step([StepRequest((continuation,))]))[0]
    assert "not held" in (res.errors[0] or ""), res
    _serves_like_reference(group, reference, seed=44)
    assert ray.get(group.trunks[0].weight_loads.remote()) == 1


def test_hung_expert_is_named_within_10_s(group, reference: _Reference) -> None:  # noqa: ANN001
    victim = group.shape.expert_rank(0)
    pids = _pids(group)
    failure, took, _ = _failed_step(group, reference, 0, Fault("collective:2", "hang"))
    assert failure.hung == (victim,) and failure.failed_ranks == (victim,), str(failure)
    assert "hung: expert rank 0" in str(failure)
    assert took < 10.0, f"the hung rank was named after {took:.1f} s"
    group.rebuild()
    assert group.last_recovery["replaced"] == [victim]
    assert [p for r, p in enumerate(_pids(group)) if r != victim] == [p for r, p in enumerate(pids) if r != victim]
    _serves_like_reference(group, reference, seed=45)


def test_raising_trunk_rank_on_its_step_stream_is_replaced_alone(group, reference: _Reference) -> None:  # noqa: ANN001
    """The trunk rank gets its steps on the driver's step stream (no Ray call per step): raising mid-step ends its
    loop with the error, which names it failed; the expert ranks (silent in the collective) are collateral and keep
    their processes and weights; the rebuilt group opens a new stream and serves the reference's tokens."""
    from replicas.ep.group import GroupFailure

    trunk = group.shape.trunk_rank(0)
    assert group.config.trunk_loop and len(group._streams) == 1  # the path under test
    pids, loads = _pids(group), _loads(group)
    sc = _Scenario(group, reference, 1)
    sc.add(0, rank=0, prompt=_prompts(48, [30])[0], slot=0)
    sc.step([0])
    _arm(group.trunks[0], Fault("collective:2", "raise"))
    t0 = time.monotonic()
    with pytest.raises(GroupFailure) as info:
        sc.step([0])
    failure, took = info.value, time.monotonic() - t0
    assert failure.raised.keys() == {trunk} and "injected fault" in failure.raised[trunk], str(failure)
    assert failure.failed_ranks == (trunk,) and not failure.dead and not failure.hung, str(failure)
    assert set(failure.collateral) == {group.shape.expert_rank(0), group.shape.expert_rank(1)}, str(failure)
    assert took < 10.0, f"the failure took {took:.1f} s to classify (deadline {DEADLINE_S} s)"
    group.rebuild()
    assert group.last_recovery["replaced"] == [trunk], group.last_recovery
    new_pids = _pids(group)
    assert new_pids[trunk] != pids[trunk] and new_pids[1:] == pids[1:]
    assert _loads(group)[1:] == loads[1:]
    _serves_like_reference(group, reference, seed=49)


def test_every_expert_rank_dying_at_once_replaces_them_and_keeps_the_trunk(group, reference: _Reference) -> None:  # noqa: ANN001
    """What the group sees of a lost node holding all expert ranks: each process exits in the step's first
    collective. Both are failed (dead) and replaced; the trunk rank is collateral and keeps its process and weights.
    (Ray reschedules a lost node's placement-group bundles on the remaining nodes; not exercised here.)"""
    from replicas.ep.group import GroupFailure

    trunk, experts = group.shape.trunk_rank(0), (group.shape.expert_rank(0), group.shape.expert_rank(1))
    pids = _pids(group)
    for e in group.experts:
        _arm(e, Fault("collective:1", "exit"))
    with pytest.raises(GroupFailure) as info:
        _serves_like_reference(group, reference, seed=46)
    failure = info.value
    assert failure.dead == experts and failure.failed_ranks == experts, str(failure)
    group.rebuild()
    assert group.last_recovery["replaced"] == list(experts) and group.last_recovery["kept"] == [trunk]
    assert _pids(group)[trunk] == pids[trunk] and _loads(group)[trunk] == 1
    _serves_like_reference(group, reference, seed=47)


# ----------------------------------------------------------------- fast unit tests (no Ray)
def test_nccl_settings_are_explicit_and_an_operators_value_wins() -> None:
    from cluster.process_groups import NCCL_SETTINGS, apply_nccl_settings

    env = {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "30"}
    got = apply_nccl_settings(env)
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"  # abort the communicator, keep the process (and weights)
    assert got["TORCH_NCCL_BLOCKING_WAIT"] == "0" and got["TORCH_NCCL_ABORT_IN_DESTROY_PG"] == "1"
    assert got["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"] == "30"
    assert set(got) == set(NCCL_SETTINGS) and env == got


def test_progress_counts_collectives_and_tells_collateral_errors_apart() -> None:
    from cluster.rank_progress import CollectiveError, RankProgress

    p = RankProgress()
    p.begin_step()
    with p.collective():
        assert p.snapshot() == (1, 1, True, True)
    with pytest.raises(CollectiveError, match="collective 2 of the step failed: Connection closed by peer"):
        with p.collective():
            raise RuntimeError("Connection closed by peer")
    p.fault = Fault("collective:3", "raise")
    with pytest.raises(RuntimeError, match="injected fault at collective:3") as info:
        with p.collective():
            pass
    assert not isinstance(info.value, CollectiveError)  # this rank's own failure, not a peer's
    p.end_step()
    assert p.snapshot() == (1, 3, False, False) and p.fault is None
    with pytest.raises(ValueError, match="fault kind"):
        Fault("start", "explode")
    with pytest.raises(ValueError, match="fault point"):
        Fault("collective:0", "raise")


def test_hang_watch_names_the_rank_its_peers_wait_for() -> None:
    from replicas.ep.group import _HangWatch

    w = _HangWatch(3, hang_s=2.0)
    t = time.monotonic()
    w.record(0, (5, 10, True, True), t)  # in collective 10, waiting
    w.record(1, (5, 9, False, True), t)  # busy outside a collective: the one being waited for
    w.record(2, (5, 10, True, True), t)
    assert w.hung({0, 1, 2}, t + 1.0) == []  # not yet hang_s
    w.record(0, (5, 10, True, True), t + 2.5)
    w.record(2, (5, 10, True, True), t + 2.5)
    w.record(1, (5, 9, False, True), t + 2.5)
    assert w.hung({0, 1, 2}, t + 2.5) == [1]
    # NCCL: a collective returns once enqueued, so the peers wait outside it; they are past the stuck rank's count
    w3 = _HangWatch(2, hang_s=2.0)
    w3.record(0, (5, 4, False, True), t)
    w3.record(1, (5, 3, False, True), t)
    w3.record(0, (5, 4, False, True), t + 2.5)
    w3.record(1, (5, 3, False, True), t + 2.5)
    assert w3.hung({0, 1}, t + 2.5) == [1]
    # a rank that stops answering the poll at all (a frozen process) is hung too; one computing alone is not
    w2 = _HangWatch(2, hang_s=2.0)
    w2.record(0, (1, 0, False, True), t)
    w2.record(1, (1, 0, False, True), t)
    assert w2.hung({0, 1}, t + 0.5) == []
    w2.record(0, (1, 0, False, True), t + 3.0)
    assert w2.hung({0, 1}, t + 3.0) == [1]  # silent for more than hang_s / 2
