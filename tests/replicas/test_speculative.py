"""MTP speculative decoding: exact verification, DeltaNet rollback, and greedy outputs unchanged.

Oracles: known answers for the verification rule; the target distribution for the rejection rule
(sampled statistically); decoding without speculation for everything else (single process and
expert-parallel, with chunked prefill and preemption). A random model's MTP head is nearly never
right, so the engine tests use a copy of the tiny checkpoint whose lm_head is rank 2 plus noise:
the greedy token is one of a handful, and the MTP head (which shares lm_head) sometimes agrees
(about 7% of k=1 drafts), so drafts are both accepted and rejected. Acceptance on a trained
checkpoint is measured by benchmarks/bench_spec.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest
from replicas.ep.speculative import Distribution, draft, verify

pytestmark = pytest.mark.timeout(900)

GREEDY = SamplingParams(temperature=0.0)
BLOCK = 16


# ---------------------------------------------------------------------------- the verification rule
def _rows(argmaxes: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(0))
    for j, t in enumerate(argmaxes):
        logits[j, t] = 10.0
    return logits


@pytest.mark.parametrize(
    "drafts,target,accepted,token",
    [
        ([3, 4, 5], [3, 4, 5, 6], 3, 6),  # all right: the bonus token
        ([3, 4, 5], [3, 7, 5, 6], 1, 7),  # second wrong: the target's token replaces it
        ([2, 4, 5], [3, 4, 5, 6], 0, 3),  # first wrong
        ([3], [3, 9], 1, 9),
    ],
)
def test_greedy_verification_known_answers(drafts: list[int], target: list[int], accepted: int, token: int) -> None:
    a, t = verify(_rows(target), drafts, GREEDY, position=0, q=[None] * len(drafts))
    assert (a, t) == (accepted, token)


def _first_token_histogram(p_logits: torch.Tensor, q_logits: torch.Tensor, k: int, trials: int) -> torch.Tensor:
    """How often each token is emitted first, drafting k tokens from q (fixed per position) and
    verifying against p (fixed per position); each trial has its own seed."""
    v = p_logits.shape[-1]
    counts = torch.zeros(v)
    for seed in range(trials):
        params = SamplingParams(temperature=1.0, seed=seed)
        drafts, qs = [], []
        for j in range(k):
            d, q = draft(q_logits, params, position=j)
            drafts.append(d)
            qs.append(q)
        a, token = verify(p_logits.expand(k + 1, v), drafts, params, position=0, q=qs)
        counts[drafts[0] if a > 0 else token] += 1
    return counts / trials


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_rule_keeps_the_target_distribution(k: int) -> None:
    gen = torch.Generator().manual_seed(1)
    p_logits, q_logits = torch.randn(8, generator=gen) * 1.5, torch.randn(8, generator=gen) * 1.5
    p, q = torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)
    assert 0.5 * float((p - q).abs().sum()) > 0.25  # far apart: emitting the drafts as-is would fail below
    freq = _first_token_histogram(p_logits, q_logits, k, trials=4000)
    tv = 0.5 * float((freq - p).abs().sum())
    assert tv < 0.035, f"emitted distribution is {tv:.3f} (total variation) from the target"


def test_acceptance_probability_is_the_overlap() -> None:
    """Known answer: a draft from q is accepted with probability sum_v min(p_v, q_v)."""
    gen = torch.Generator().manual_seed(2)
    p_logits, q_logits = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    overlap = float(torch.minimum(torch.softmax(p_logits, -1), torch.softmax(q_logits, -1)).sum())
    accepted = 0
    trials = 4000
    for seed in range(trials):
        params = SamplingParams(temperature=1.0, seed=seed)
        d, q = draft(q_logits, params, position=0)
        a, _ = verify(p_logits.expand(2, 6), [d], params, position=0, q=[q])
        accepted += a
    assert abs(accepted / trials - overlap) < 0.03


def test_filtered_distributions_match_the_sampler() -> None:
    """p and q use the sampler's filters: top-k 2 leaves exactly the two largest logits."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    dist = Distribution.of(logits, SamplingParams(temperature=1.0, top_k=2))
    assert sorted(dist.ids.tolist()) == [1, 3]
    # renormalised over the two: e^3 / (e^3 + e^2.5) and e^2.5 / (e^3 + e^2.5)
    probs = dict(zip(dist.ids.tolist(), dist.probs.tolist()))
    want = (1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5)))
    assert abs(probs[1] - want[0]) < 1e-6 and abs(probs[3] - want[1]) < 1e-6, probs


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def peaked_checkpoint(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with lm_head = rank 2 + noise (see the module docstring)."""
    out = tmp_path_factory.mktemp("peaked") / "ckpt"
    shutil.copytree(embedded_model_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(shard))
    w = tensors["lm_head.weight"]
    gen = torch.Generator().manual_seed(7)
    c = torch.randn(w.shape[0], 2, generator=gen)
    u = torch.randn(2, w.shape[1], generator=gen) / w.shape[1] ** 0.5
    tensors["lm_head.weight"] = (4.0 * c @ u + 0.02 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def peaked_model(peaked_checkpoint: Path):  # noqa: ANN201  # LocalModel
    from model_shards.model import LocalModel

    return LocalModel.load(peaked_checkpoint, dtype="float32")


def _prompts(n: int, lengths: tuple[int, ...], seed: int = 0) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 200_000, (lengths[i % len(lengths)],), generator=g).tolist()) for i in range(n)]


# ---------------------------------------------------------------------------- rollback with known drafts
def test_known_drafts_accepted_and_rolled_back_at_every_depth(peaked_model) -> None:  # noqa: ANN001
    """Drafts taken from the plain run's own continuation with a wrong token after j right ones:
    the trunk must accept exactly j, emit the plain run's token, and continue exactly (DeltaNet
    conv and recurrent states rolled back to the accepted position)."""
    from replicas.engine.engine_types import GenerateRequest
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner
    from replicas.ep.offline_generate import offline_generate

    k, n = 3, 30
    prompt = list(_prompts(1, (37,))[0])
    plain = offline_generate(
        LocalRunner(peaked_model, CacheSizes(num_blocks=8, block_size=BLOCK, num_slots=1)),
        GenerateRequest("plain", tuple(prompt), GREEDY, max_tokens=n + k + 1, ignore_eos=True),
    ).token_ids
    runner = LocalRunner(peaked_model, CacheSizes(num_blocks=8, block_size=BLOCK, num_slots=1, spec_tokens=k))
    table = tuple(range(8))
    out: list[int] = []
    new, context, depth = prompt, 0, 0
    drafts: tuple[int, ...] = ()
    seen = set()
    while len(out) < n:
        first = context == 0
        seq = SeqStep(
            0,
            context,
            tuple(new),
            table if first else (),
            output_index=len(out),
            start=SeqStart(0, GREEDY, len(prompt)) if first else None,
            drafts=drafts,
        )
        res = runner.run_step([StepRequest((seq,))])[0]
        accepted = res.accepted[0]
        if drafts:
            right = next((j for j, (d, t) in enumerate(zip(drafts, plain[len(out) :])) if d != t), len(drafts))
            assert len(accepted) == right, (drafts, plain[len(out) : len(out) + k + 1])
            seen.add(right)
        context += len(new) + len(accepted)
        out += [*accepted, res.token_ids[0]]
        assert tuple(out) == plain[: len(out)], f"diverged at {len(out)}"
        new = [res.token_ids[0]]
        # next drafts: `depth` right tokens, then a wrong one (cycling depth 0..k)
        depth = (depth + 1) % (k + 1)
        nxt = list(plain[len(out) : len(out) + k])
        if len(nxt) == k:
            if depth < k:
                nxt[depth] = (nxt[depth] + 1) % 1000
            drafts = tuple(nxt)
        else:
            drafts = ()
    assert seen == {0, 1, 2, 3}


# ---------------------------------------------------------------------------- the engine
def _run_engine(
    runner,  # noqa: ANN001
    prompts,  # noqa: ANN001
    *,
    k: int,
    num_blocks: int,
    slots: int,
    params: SamplingParams,
    max_tokens: int,
    trunk_ranks: int = 1,
) -> tuple[list[tuple[int, ...]], dict[str, float]]:
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.engine_types import GenerateRequest
    from replicas.engine.scheduler import SchedulerConfig

    async def main():  # noqa: ANN202
        engine = Engine(
            runner,
            pools=[BlockPool(num_blocks=num_blocks, num_slots=slots, block_size=BLOCK) for _ in range(trunk_ranks)],
            config=SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=128, lookahead=2 * k),
            max_waiting=len(prompts),
            spec_tokens=k,
        )
        engine.start()
        several = 0  # stream items holding several tokens of a choice (accepted drafts)

        async def one(i: int, p: tuple[int, ...]) -> tuple[int, ...]:
            nonlocal several
            toks: list[int] = []
            req = GenerateRequest(
                request_id=f"r{i}", prompt_ids=p, params=params, max_tokens=max_tokens, ignore_eos=True
            )
            steps: list[int] = []
            async for item in engine.generate(req):
                # at most one item per request per engine step, made by the step that just ran
                assert item.step == engine.steps and (not steps or item.step > steps[-1]), (steps, item.step)
                steps.append(item.step)
                for ev in item.outputs:
                    assert ev.error is None, ev.error
                    toks += ev.token_ids
                    several += len(ev.token_ids) > 1
            return tuple(toks)

        try:
            try:  # a scheduling deadlock fails here instead of hanging the run
                outs = await asyncio.wait_for(asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))), 180)
            except TimeoutError:
                s = engine.scheduler
                raise AssertionError(
                    "engine stalled: waiting "
                    + str([(q.num_tokens, q.num_computed) for q in s.waiting.values()])
                    + " running "
                    + str(
                        [
                            [(q.num_tokens, q.num_computed, len(q.addr.blocks), len(q.drafts)) for q in run]
                            for run in (r.values() for r in s.running)
                        ]
                    )
                    + " free blocks "
                    + str([p.free_blocks for p in s.pools])
                ) from None
            for pool in engine.pool_state():  # everything returned
                assert pool["free_blocks"] == pool["num_blocks"] and pool["free_slots"] == slots
            engine._record_gauges()
            counters = {name: v for (name, _), v in engine.metrics.snapshot().counters.items()}
            counters["items_with_several_tokens"] = several
            return list(outs), counters
        finally:
            await engine.stop()

    return asyncio.run(main())


def _local(model, *, k: int, num_blocks: int, slots: int):  # noqa: ANN001, ANN202  # LocalRunner
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    return LocalRunner(model, CacheSizes(num_blocks=num_blocks, block_size=BLOCK, num_slots=slots, spec_tokens=k))


# Prompts longer than the 64-token step budget: prefill is chunked. Blocks for about half the
# sequences at full length: the newest are preempted and recomputed.
PROMPTS = _prompts(6, (90, 40, 130, 17, 70, 55), seed=3)
MAX_TOKENS = 28
SMALL_POOL = 20


@pytest.fixture(scope="module")
def plain_outputs(peaked_model) -> list[tuple[int, ...]]:  # noqa: ANN001
    """Reference: no speculation, a pool large enough that nothing is preempted."""
    outs, counters = _run_engine(
        _local(peaked_model, k=0, num_blocks=128, slots=6),
        PROMPTS,
        k=0,
        num_blocks=128,
        slots=6,
        params=GREEDY,
        max_tokens=MAX_TOKENS,
    )
    assert counters.get("num_preemptions", 0) == 0
    return outs


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_equals_plain_single_process(k: int, peaked_model, plain_outputs) -> None:  # noqa: ANN001
    outs, c = _run_engine(
        _local(peaked_model, k=k, num_blocks=SMALL_POOL, slots=6),
        PROMPTS,
        k=k,
        num_blocks=SMALL_POOL,
        slots=6,
        params=GREEDY,
        max_tokens=MAX_TOKENS,
    )
    for i, (got, want) in enumerate(zip(outs, plain_outputs)):
        assert got == want, (
            f"k={k}, prompt {i}: first difference at {next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)}"
        )
    drafted, accepted = c.get("spec_decode_num_draft_tokens", 0), c.get("spec_decode_num_accepted_tokens", 0)
    assert c.get("num_preemptions", 0) > 0, "the small pool was meant to preempt"
    assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
    assert c["items_with_several_tokens"] > 0, "a step's accepted drafts and its token come in one stream item"
    print(
        f"\nk={k}: acceptance {accepted / drafted:.2f} ({accepted}/{drafted}), preemptions {int(c['num_preemptions'])}"
    )


@pytest.mark.slow  # ~60 s on 2 cores (two full engine runs); the rejection rule's own tests stay in the default run
def test_sampled_speculation_is_seeded_and_completes(peaked_model) -> None:  # noqa: ANN001
    """Sampled requests with speculation, run twice: same seed, same tokens; every choice runs to
    max_tokens and the pools are returned.

    NOTE: only the same run repeated: the rejection rule's output depends on the drafts, and a draft
    drawn after a preemption's recompute (slightly different fp32 hidden states) may differ, so
    seeded output across different preemption histories has the same distribution, not the same tokens.
    """
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5)
    a, c = _run_engine(
        _local(peaked_model, k=2, num_blocks=SMALL_POOL, slots=6),
        PROMPTS,
        k=2,
        num_blocks=SMALL_POOL,
        slots=6,
        params=params,
        max_tokens=MAX_TOKENS,
    )
    b, _ = _run_engine(
        _local(peaked_model, k=2, num_blocks=SMALL_POOL, slots=6),
        PROMPTS,
        k=2,
        num_blocks=SMALL_POOL,
        slots=6,
        params=params,
        max_tokens=MAX_TOKENS,
    )
    assert a == b
    assert all(len(t) == MAX_TOKENS for t in a)
    assert c["spec_decode_num_accepted_tokens"] > 0


# ---------------------------------------------------------------------------- expert parallel
# m = 2: ping-pong micro-batches in the target forward (the verify rows split by sequence), MTP passes unsplit
@pytest.mark.parametrize(
    "d,x,m",
    [(1, 2, 1), pytest.param(2, 2, 1, marks=pytest.mark.slow), pytest.param(1, 2, 2, marks=pytest.mark.slow)],
    ids=lambda v: str(v),
)
def test_greedy_speculation_equals_plain_expert_parallel(
    d: int,
    x: int,
    m: int,
    ray_cluster,  # noqa: ANN001
    peaked_checkpoint: Path,
    plain_outputs,  # noqa: ANN001
) -> None:
    from cluster.topology import GroupShape
    from replicas.ep.actors import CacheSizes
    from replicas.ep.group import ExpertParallelGroup, GroupConfig

    k = 2
    pool = SMALL_POOL if d == 1 else 12  # per trunk rank: the longest sequence (11 blocks) still fits
    group = ExpertParallelGroup(
        GroupConfig(
            model_dir=str(peaked_checkpoint),
            shape=GroupShape(d, x),
            dtype="float32",
            deadline_s=60.0,
            caches=CacheSizes(num_blocks=pool, block_size=BLOCK, num_slots=6, spec_tokens=k),
            micro_batches=m,
        )
    )
    group.start()
    try:
        outs, c = _run_engine(
            group,  # the group is the engine's runner, as in serving
            PROMPTS,
            k=k,
            num_blocks=pool,
            slots=6,
            params=GREEDY,
            max_tokens=MAX_TOKENS,
            trunk_ranks=d,
        )
    finally:
        group.shutdown()
    assert outs == plain_outputs
    assert c["spec_decode_num_accepted_tokens"] > 0 and c.get("num_preemptions", 0) > 0


# ---------------------------------------------------------------------------- served
def _counter(metrics_text: str, name: str) -> float:
    """Sum of a Prometheus counter's samples (every label set)."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(f"epserve:{name}_total")
    )


def test_served_speculation_equals_plain_and_counts(
    serve_ports,  # noqa: ANN001
    peaked_checkpoint: Path,
    plain_outputs,  # noqa: ANN001
) -> None:
    """The real app with `speculative_tokens` 2 (gRPC ingress, token ids in and out): greedy tokens equal
    decoding without speculation, and the acceptance counters reach /metrics."""
    import time

    import requests
    from ray import serve

    from replicas.api.grpc_client import EpserveClient
    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    args = AppArgs(
        model=str(peaked_checkpoint),
        served_model_name="spec-peaked",
        dtype="float32",
        trunk_ranks=1,
        expert_ranks=0,
        num_kv_blocks=64,
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        max_model_len=256,
        speculative_tokens=2,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name="spec", route_prefix="/spec")
    http, grpc_target = serve_ports
    try:
        with EpserveClient(grpc_target, application="spec", timeout_s=120) as client:
            for i, p in enumerate(PROMPTS[:3]):
                got = client.complete(token_ids=list(p), max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                assert tuple(got.token_ids) == plain_outputs[i], f"prompt {i}"
        deadline = time.monotonic() + 30  # the engine pushes its metrics every second
        while True:
            text = requests.get(f"{http}/spec/metrics", timeout=10).text
            drafted = _counter(text, "spec_decode_num_draft_tokens")
            if drafted > 0 or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        accepted = _counter(text, "spec_decode_num_accepted_tokens")
        assert drafted > 0 and 0 < accepted < drafted, (drafted, accepted)
    finally:
        serve.delete("spec")
