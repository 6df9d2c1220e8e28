"""The device path of whole ranks, proven without a GPU: every tensor a rank builds lives on "cuda".

Under `torch._subclasses.fake_tensor.FakeTensorMode` tensors can be made on device "cuda" on this CPU-only
machine (no data, only metadata); an op mixing a cuda tensor with a CPU tensor raises
`FakeTensorDeviceMismatchError`. Copies to the host (`.cpu()`, `.to("cpu")`) pass silently there, so a
`TorchDispatchMode` and a `TorchFunctionMode` record every op's device, every device-to-host copy and every
host sync (`.item()`, `.tolist()`, `int()` / `bool()` of a device tensor, data-dependent output shapes such
as `nonzero` / `bincount` / boolean-mask indexing), with where in our code it happened. A sync is answered
with a stand-in value (0, or True for a bool) so the step goes on: the run checks placement, not numbers.

What cannot run under fake mode, so the reference kernels are forced: fla / Triton kernels, scaled GEMMs
(`scaled_mm`), pinned memory, CUDA streams and graphs, and CUDA generators (torch.Generator("cuda") needs the
CUDA library). This CPU-only torch also sets a CUDA device guard in a few Python bindings (indexing, `.to`,
`int()`): those calls run with the fake tensors relabelled cpu for the call only (`_Placement`), after
checking their tensor arguments are all on the device. Host-to-device copies (the step's inputs) cannot be
faked either: they are recorded and answered with an empty device tensor of the same shape.

Scenarios (the embedded tiny model's shapes, bf16, weights made by the loader from the expected-tensor table
straight on the device): the LocalRunner's construction (its canary); a prefill resumed at a 64-token boundary
with MTP drafting; decode with a repetition penalty, a grammar mask and logprobs; an MTP verify step of a greedy
and a sampled sequence together (the batched greedy match and rejection rule, the draft distributions kept on the
device); seeded sampling (the batched sampler's counter-based draws, no CUDA generator); an expert rank's compute over a
subset of experts; a TrunkRank over the AllToAllDispatcher (1 trunk, 2 expert ranks) with only
`a2a_protocol`'s `dist.all_to_all_single` replaced (it echoes: the receive buffer stands for the expert ranks'
answer), a prefill (VARIABLE mode) and a decode (FIXED mode) step, whose layers may read back only the seam's
named reads (`A2A_LAYER_READS`: the row counts on prefill, `read_overflow` per MoE layer on decode).
Asserted: no CPU tensor inside a step; no upload of penalty history in a decode step; outside the decoder layers,
host transfers only at the named points (`NAMED_POINTS`, with why); inside the prefill and decode steps' decoder
layers and the expert rank's compute, no host sync at all. Layer-level checks:
tests/model_shards/test_host_syncs.py.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle, GroupSpec
from cluster.topology import GroupShape
from model_shards.cache import CachePools
from model_shards.config import ModelConfig, from_hf_config
from model_shards.device import resolve_device
from model_shards.model import LocalModel
from model_shards.sampling import SamplingParams
from model_shards.trunk import Trunk
from model_shards.weights import CheckpointLayout, TensorSpec, load_experts, load_trunk
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult
from replicas.ep import a2a_protocol
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan, fixed_capacity
from replicas.ep.actors import CacheSizes
from replicas.ep.dispatch import AllToAllDispatcher
from replicas.ep.local_runner import LocalRunner
from replicas.ep.trunk_rank import TrunkRank

pytestmark = pytest.mark.timeout(300)

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
PROMPT = tuple(range(1, 97))  # 96 tokens: a 64-token chunk, then the rest resumed at 64

# Where a rank may move data to the host, outside its decoder layers (file, function) -> why.
NAMED_POINTS = {
    ("trunk_rank.py", "_to_host"): "results out: sampled token ids and logprobs",
    ("sampling.py", "to_host"): "results out: the sampler's ids and logprobs, one transfer",
    ("trunk_rank.py", "canary"): "readiness: the canary's one verdict",
    ("mtp_drafter.py", "draft"): "drafts out: every sequence's k MTP draft ids, one transfer after the last pass",
    ("dispatch.py", "take"): "expert-load counters out, when the group reads them",
}
# The layer-stack files (made sync-free inside the layers; whatever sync remains must be in them).
SYNCS_FILES = ("gated_deltanet.py", "delta_rule.py", "experts.py", "moe.py", "paged_attention.py",
               "gated_attention.py", "fp8_experts.py", "dispatch.py")  # fmt: skip


@dataclass(frozen=True)
class Event:
    kind: str  # "sync", "d2h", "h2d", "cpu-tensor"
    op: str
    frames: tuple[tuple[str, str, int], ...]  # our frames (file, function, line), innermost last
    in_layers: bool

    @property
    def site(self) -> tuple[str, str]:
        file, func, _ = self.frames[-1] if self.frames else ("?", "?", 0)
        return file, func

    def __str__(self) -> str:
        where = " <- ".join(f"{f}:{ln} {fn}" for f, fn, ln in reversed(self.frames[-3:]))
        return f"{self.kind} {self.op} at {where}"


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)
    in_layers: bool = False
    bool_answer: bool = True  # what a synced bool reads as (True: "all finite", "any left"; the steps go on)
    # (file, function) of the innermost frame of ours -> the value a scalar read there gives (a callable is called
    # with how many scalars that site read before): fake tensors hold no values, the host decisions need some
    answers: dict[tuple[str, str], Any] = field(default_factory=dict)
    _reads: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, kind: str, op: str) -> None:
        self.events.append(Event(kind, op, _our_frames(), self.in_layers))

    def answer(self, t: torch.Tensor) -> Any:  # noqa: ANN401  # a bool, int or float, as the read's dtype
        """The stand-in value a scalar read of `t` gives."""
        frames = _our_frames()
        site = frames[-1][:2] if frames else ("?", "?")
        if site in self.answers:
            value = self.answers[site]
            if callable(value):
                n = self._reads.get(site, 0)
                self._reads[site] = n + 1
                return value(n)
            return value
        return self.bool_answer if t.dtype == torch.bool else 0.0 if t.dtype.is_floating_point else 0

    def take(self) -> list[Event]:
        out, self.events = self.events, []
        return out


def _our_frames() -> tuple[tuple[str, str, int], ...]:
    return tuple(
        (Path(f.filename).name, f.name, f.lineno or 0)
        for f in traceback.extract_stack()
        if ("/model_shards/" in f.filename or "/replicas/" in f.filename) and "/tests/" not in f.filename
    )


_SCALAR_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
}
_SYNC_METHODS = {
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.tolist,
}


def _to_target(func: Any, args: tuple, kwargs: dict) -> torch.device | None:  # noqa: ANN401  # an aten overload
    """The device an aten `to` / `_to_copy` moves to, or None (not a move)."""
    if func.overloadpacket not in (torch.ops.aten._to_copy, torch.ops.aten.to):
        return None
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            dev = a
        elif isinstance(a, torch.Tensor):
            dev = a.device
    return torch.device(dev) if dev is not None else None


class _Ops(TorchDispatchMode):
    """Records every aten op's device story; answers syncs with stand-ins and fakes host-to-device copies."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204  # torch's protocol
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _SCALAR_OPS:
            t = args[0]
            if t.device.type == "cuda":
                self.rec.add("sync", str(func))
            return self.rec.answer(t)
        dst = _to_target(func, args, kwargs)
        if dst is not None and dst.type == "cuda" and args[0].device.type == "cpu":
            self.rec.add("h2d", str(func))
            x = args[0]
            return torch.empty(x.shape, dtype=kwargs.get("dtype") or x.dtype, device=CUDA)
        if dst is not None and dst.type == "cpu" and args[0].device.type == "cuda":
            self.rec.add("d2h", str(func))
        if func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.rec.add("d2h" if args[0].device.type == "cpu" else "h2d", str(func))
        if any(t.device.type == "cuda" for t in tensors) and any(
            t.device.type == "cpu" and t.dim() > 0 for t in tensors
        ):
            self.rec.add("cpu-tensor", str(func))  # a fake run raises for most such ops; this names the rest
        try:
            return func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            # the output's size depends on the data: on a GPU the host waits for the device here
            self.rec.add("sync", str(func))
            return _stand_in(func, args, kwargs)


def _stand_in(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:  # noqa: ANN401  # an aten overload
    x = args[0]
    if func is torch.ops.aten.bincount.default:
        return torch.zeros(kwargs.get("minlength", args[2] if len(args) > 2 else 1), dtype=torch.long, device=x.device)
    if func is torch.ops.aten.nonzero.default:
        return torch.zeros((1, x.dim()), dtype=torch.long, device=x.device)
    if func is torch.ops.aten.index.Tensor:
        idx = [i for i in args[1] if i is not None]
        if len(idx) == 1 and idx[0].dtype == torch.bool:
            return torch.zeros((1, *x.shape[idx[0].dim() :]), dtype=x.dtype, device=x.device)
    raise NotImplementedError(f"no stand-in for the data-dependent op {func}")


class _Placement(TorchFunctionMode):
    """Python-level calls: host syncs and host copies by method, and (CPU-only torch) the bindings that set a
    CUDA device guard, run with the fake tensors relabelled cpu for that call only."""

    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204  # torch's protocol
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        name = getattr(func, "__name__", str(func))
        if on_cuda and func in _SYNC_METHODS:
            self.rec.add("sync", name)
        target = _method_target(name, args, kwargs)
        if target is not None and target.type == "cpu" and on_cuda and args[0].device.type == "cuda":
            self.rec.add("d2h", name)
        try:
            return func(*args, **kwargs)
        except RuntimeError as exc:
            if "not linked with support for cuda" not in str(exc):
                raise
        if on_cuda and any(t.device.type != "cuda" and t.dim() > 0 for t in tensors):
            self.rec.add("cpu-tensor", name)
        moved = [t for t in tensors if isinstance(t, FakeTensor) and t.fake_device.type == "cuda"]
        for t in moved:
            t.fake_device = CPU
        try:
            out = func(*args, **kwargs)
        finally:
            for t in moved:
                t.fake_device = CUDA
        if (target or CUDA).type == "cuda":
            for o in tree_flatten(out)[0]:
                if isinstance(o, FakeTensor) and o.fake_device.type == "cpu":
                    o.fake_device = CUDA
        return out


def _method_target(name: str, args: tuple, kwargs: dict) -> torch.device | None:
    if name == "cpu":
        return CPU
    if name != "to":
        return None
    for a in [*args[1:], kwargs.get("device")]:
        if isinstance(a, torch.device) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda")):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class _SpecReader:
    """Stands in for the checkpoint reader at its boundary: each tensor the loader asks for is made on the
    device from the expected-tensor table (shape only: a fake run has no data)."""

    def __init__(self, specs: dict[str, TensorSpec]) -> None:
        self.specs = specs

    def read(self, name: str) -> torch.Tensor:
        return torch.empty(self.specs[name].shape, dtype=torch.bfloat16, device=CUDA)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        return torch.empty((len(rows), *self.specs[name].shape[1:]), dtype=torch.bfloat16, device=CUDA)


@dataclass
class FakeRun:
    cfg: ModelConfig
    runner: LocalRunner
    steps: dict[str, tuple[StepResult | None, list[Event]]]
    expert_events: list[Event]
    setup_events: list[Event]


def _watch_layers(trunk: Trunk, rec: Recorder) -> None:
    """Mark ops inside the decoder layers (trunk and MTP layers alike)."""
    inner = trunk.decoder_layer

    def wrapped(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401  # passes through
        rec.in_layers = True
        try:
            return inner(*args, **kwargs)
        finally:
            rec.in_layers = False

    trunk.decoder_layer = wrapped  # type: ignore[method-assign]  # instrumentation of this test's instance


def _step(rec: Recorder, runner: LocalRunner, req: StepRequest) -> tuple[StepResult | None, list[Event]]:
    res = runner.run_step([req])[0]
    assert not any(res.errors), f"the step refused or failed its sequences: {res.errors}"
    return res, rec.take()


@pytest.fixture(scope="module")
def fake_run(tiny_fused: Path) -> FakeRun:
    cfg = from_hf_config(tiny_fused)
    layout = CheckpointLayout(
        prefix="model.language_model.", layout="fused", mtp_layout="fused" if cfg.has_mtp else None, has_vision=False
    )
    rec = Recorder()
    steps: dict[str, tuple[StepResult | None, list[Event]]] = {}
    with FakeTensorMode(), _Ops(rec), _Placement(rec):
        reader = _SpecReader(layout.expected(cfg))
        kw: dict[str, Any] = dict(dtype=torch.bfloat16, layout=layout, device=CUDA)
        trunk_w = load_trunk(reader, cfg, **kw)  # type: ignore[arg-type]  # the reader's boundary, see _SpecReader
        experts = load_experts(reader, cfg, expert_ids=range(cfg.num_experts), **kw)  # type: ignore[arg-type]  # idem
        model = LocalModel(Trunk(trunk_w, cfg, dtype=torch.bfloat16), experts)
        _watch_layers(model.trunk, rec)
        runner = LocalRunner(model, CacheSizes(num_blocks=16, block_size=16, num_slots=2, spec_tokens=2))
        setup = rec.take()
        greedy = SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=2)
        start = SeqStart(slot=0, params=greedy, prompt_len=len(PROMPT), mtp=True)
        blocks = tuple(range(8))
        mask = torch.full((cfg.vocab_size // 32 + 1,), -1, dtype=torch.int32)  # the grammar's bitmask (host side)
        steps["prefill 0-64"] = _step(
            rec,
            runner,
            StepRequest(
                seqs=(SeqStep(1, 0, PROMPT[:64], blocks, sample=False, start=start, mtp_next=PROMPT[64]),), mtp_steps=2
            ),
        )
        steps["prefill resumed at 64"] = _step(
            rec, runner, StepRequest(seqs=(SeqStep(1, 64, PROMPT[64:], allowed_mask=mask),), mtp_steps=2)
        )
        sampled = steps["prefill resumed at 64"][0]
        assert sampled is not None and sampled.token_ids[0] is not None
        # the decode feeds back the token the rank sampled (a fake run's stand-in value): already in its history
        steps["decode: penalty, grammar mask, logprobs"] = _step(
            rec,
            runner,
            StepRequest(seqs=(SeqStep(1, 96, (sampled.token_ids[0],), output_index=1, allowed_mask=mask),)),
        )
        # a sampled speculating sequence beside the greedy one: its drafts and their distributions (kept on the
        # device) come from its prompt's step, then both verify in one batch (greedy match and the rejection rule)
        drafting = SeqStart(slot=1, params=SamplingParams(temperature=0.8, top_p=0.9, seed=3), prompt_len=3, mtp=True)
        steps["prefill: sampled MTP drafts"] = _step(
            rec, runner, StepRequest(seqs=(SeqStep(3, 0, (1, 2, 3), (9,), start=drafting),), mtp_steps=2)
        )
        steps["MTP verify"] = _step(
            rec,
            runner,
            StepRequest(
                seqs=(
                    SeqStep(1, 97, (6,), output_index=2, drafts=(7, 8)),
                    SeqStep(3, 3, (4,), output_index=1, drafts=(5, 6)),
                ),
                mtp_steps=2,
            ),
        )
        seeded = SeqStart(slot=1, params=SamplingParams(temperature=0.8, seed=7), prompt_len=3)
        try:
            steps["seeded sampling"] = _step(
                rec, runner, StepRequest(seqs=(SeqStep(2, 0, (1, 2, 3), (8,), start=seeded),), released=(3,))
            )
        except RuntimeError as exc:  # a CUDA generator cannot be made by CPU-only torch (see test_seeded_sampling)
            steps["seeded sampling"] = (None, [Event("error", str(exc)[:120], (), False)])
            rec.take()
        # an expert rank's compute: a subset of the experts, rows and global ids as the exchange delivers them
        half = list(range(0, cfg.num_experts, 2))
        shard = load_experts(reader, cfg, expert_ids=half, **kw)  # type: ignore[arg-type]  # the reader's boundary
        rec.take()
        x = torch.empty(6, cfg.hidden_size, dtype=torch.bfloat16, device=CUDA)
        ids = torch.tensor(half[:3] * 2, dtype=torch.long).to(CUDA)  # arrives on the device in the receive buffer
        rec.take()
        rec.in_layers, rec.bool_answer = True, False  # the expert rank's compute is its layer stack; ids all held
        y = shard.forward(0, x, ids)
        rec.in_layers, rec.bool_answer = False, True
        assert y.device == CUDA
        expert_events = rec.take()
    return FakeRun(cfg, runner, steps, expert_events, setup)


def _all_tensors(obj: Any, seen: set[int] | None = None) -> list[torch.Tensor]:  # noqa: ANN401  # any weights object
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _all_tensors(o, seen)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _all_tensors(o, seen)]
    if hasattr(obj, "__dict__"):
        return [t for o in vars(obj).values() for t in _all_tensors(o, seen)]
    return []


def test_resolve_device_names_bad_choices() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (CUDA if torch.cuda.is_available() else CPU)
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device("cuda:0")


def test_everything_the_rank_holds_is_on_the_device(fake_run: FakeRun) -> None:
    rank = fake_run.runner.rank
    held = _all_tensors(rank.trunk.w) + _all_tensors(rank.pools) + [rank.trunk.inv_freq]
    held += _all_tensors(rank.routed.shard)  # type: ignore[attr-defined]  # LocalDispatcher
    assert held and all(t.device == CUDA for t in held), {str(t.device) for t in held}
    assert fake_run.runner.device == CUDA and rank.device == CUDA


def test_no_cpu_tensor_inside_a_step(fake_run: FakeRun) -> None:
    """Every scenario ran to its result on the device (a mixed-device op raises in fake mode), and no op the
    recorder saw mixed a CPU tensor in."""
    bad = [f"{name}: {e}" for name, (_, evs) in fake_run.steps.items() for e in evs if e.kind == "cpu-tensor"]
    bad += [f"canary: {e}" for e in fake_run.setup_events if e.kind == "cpu-tensor"]
    bad += [f"expert rank: {e}" for e in fake_run.expert_events if e.kind == "cpu-tensor"]
    assert not bad, "\n".join(bad)
    for name in ("prefill resumed at 64", "decode: penalty, grammar mask, logprobs", "MTP verify"):
        res = fake_run.steps[name][0]
        assert res is not None and res.token_ids[0] is not None, name


def _outside(events: list[Event]) -> list[Event]:
    return [e for e in events if not e.in_layers and e.kind in ("sync", "d2h")]


def test_host_transfers_outside_the_layers_are_the_named_points(fake_run: FakeRun) -> None:
    """Outside the decoder layers a step moves data to the host only at NAMED_POINTS (printed with why)."""
    seen: dict[tuple[str, str], list[str]] = {}
    unnamed = []
    for name, (_, evs) in fake_run.steps.items():
        for e in _outside(evs):
            point = next(((f, fn) for f, fn, _ in reversed(e.frames) if (f, fn) in NAMED_POINTS), None)
            if point is not None:
                seen.setdefault(point, []).append(name)
            else:
                unnamed.append(f"{name}: {e}")
    for point, names in sorted(seen.items()):
        print(f"transfer point {point[0]}:{point[1]} ({NAMED_POINTS[point]}): {len(names)} in {sorted(set(names))}")
    assert not unnamed, "host transfers outside the named points:\n" + "\n".join(unnamed)
    assert ("trunk_rank.py", "_to_host") in seen  # the recorder does see the transfers it must


def test_decode_uploads_no_penalty_history(fake_run: FakeRun) -> None:
    """The penalty history lives on the device (model_shards/penalty_history.py): a prefill writes its tokens
    there (one upload of the step's new tokens), a decode that feeds back the sampled token (the sampler appended
    it on the device) uploads nothing for it, and no step builds a history on the host."""

    def history_uploads(name: str) -> list[Event]:
        evs = fake_run.steps[name][1]
        return [e for e in evs if e.kind == "h2d" and any(f == "penalty_history.py" for f, _, _ in e.frames)]

    assert len(history_uploads("prefill 0-64")) == 1  # the recorder sees the uploads it must
    assert not history_uploads("decode: penalty, grammar mask, logprobs")
    host_rows = [
        str(e)
        for _, evs in fake_run.steps.values()
        for e in evs
        if any(fn == "_history_from_host" for _, fn, _ in e.frames)
    ]
    assert not host_rows, host_rows


def _layer_syncs(events: list[Event]) -> list[Event]:
    return [e for e in events if e.in_layers and e.kind in ("sync", "d2h")]


def test_prefill_layer_stack_makes_no_host_sync(fake_run: FakeRun) -> None:
    syncs = [e for name in ("prefill 0-64", "prefill resumed at 64") for e in _layer_syncs(fake_run.steps[name][1])]
    assert not syncs, "\n".join(map(str, syncs))


def test_decode_layer_stack_makes_no_host_sync(fake_run: FakeRun) -> None:
    syncs = [
        e
        for name in ("decode: penalty, grammar mask, logprobs", "MTP verify")
        for e in _layer_syncs(fake_run.steps[name][1])
    ]
    assert not syncs, "\n".join(map(str, syncs))


def test_layer_syncs_are_only_in_the_layer_files(fake_run: FakeRun) -> None:
    """Whatever host syncs could appear inside the layers would be in the layer files, not the rank's."""
    evs = [e for _, evs in fake_run.steps.values() for e in _layer_syncs(evs)] + _layer_syncs(fake_run.expert_events)
    assert all(e.site[0] in SYNCS_FILES for e in evs), "\n".join(str(e) for e in evs if e.site[0] not in SYNCS_FILES)


def test_expert_rank_compute_makes_no_host_sync(fake_run: FakeRun) -> None:
    syncs = _layer_syncs(fake_run.expert_events)
    assert not syncs, "\n".join(map(str, syncs))


def test_seeded_sampling_runs_on_the_device(fake_run: FakeRun) -> None:
    res, evs = fake_run.steps["seeded sampling"]
    assert res is not None, evs[0].op if evs else "no result"


def test_the_canary_runs_on_the_device(fake_run: FakeRun) -> None:
    """Construction ran the canary on the device: its batch went in (h2d) and its verdict came out (one sync)."""
    canary = [e for e in fake_run.setup_events if any(fn == "canary" for _, fn, _ in e.frames)]
    assert any(e.kind == "h2d" for e in canary)
    assert [e.site for e in _outside(canary)] and all(
        ("trunk_rank.py", "canary") in [(f, fn) for f, fn, _ in e.frames] for e in _outside(canary)
    )


# ============================================================ a trunk step over the all-to-all seam
A2A_SHAPE = GroupShape(trunk_ranks=1, expert_ranks=2)
A2A_PROMPT = 40  # prefill tokens (VARIABLE mode), then one decode token (FIXED mode)
# The host reads the all-to-all seam makes inside the decoder layers, per MoE layer (file, function) -> why.
A2A_LAYER_READS = {
    "prefill": {
        # (the count exchange is issued without a wait and its answer never read: a trunk receives no rows)
        ("dispatch.py", "dispatch"): "the X row counts: all_to_all_single takes its split sizes as host ints",
    },
    "decode": {
        ("a2a_protocol.py", "read_overflow"): "the combine headers' overflow flag: every rank must agree on "
        "whether an extra exchange follows, a host decision",
    },
}


class _CudaGroup(GroupHandle):
    """A group handle whose device is "cuda" and has no process group behind it (the transport is replaced)."""

    @property
    def device(self) -> torch.device:
        return CUDA


class _Transport:
    """`torch.distributed` as replicas/ep/a2a_protocol.py sees it, replaced at the collective only: every
    `all_to_all_single` is recorded (shapes and devices: NCCL takes device tensors only) and echoes, i.e. the
    receive buffer the protocol made stands for the peers' answer (fake tensors hold no values anyway)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.device, torch.device]] = []

    def all_to_all_single(  # torch.distributed's names
        self,
        output: torch.Tensor,
        input: torch.Tensor,  # noqa: A002
        *,
        async_op: bool = False,
        **_: Any,  # noqa: ANN401  # the split sizes and group, unused by the echo
    ) -> _Echoed | None:
        self.calls.append((output.device, input.device))
        return _Echoed() if async_op else None  # the dispatcher's collectives are issued asynchronously


class _Echoed:
    """The work handle of an asynchronous echo: already done."""

    def wait(self) -> bool:
        return True


@dataclass
class A2aRun:
    cfg: ModelConfig
    rank: TrunkRank
    steps: dict[str, tuple[StepResult, list[Event], int, StepPlan]]  # result, events, collectives, plan


@pytest.fixture(scope="module")
def a2a_run(tiny_fused: Path) -> A2aRun:
    """A TrunkRank with the AllToAllDispatcher (1 trunk rank, 2 expert ranks), everything real down to
    `a2a_protocol`'s `dist.all_to_all_single`: a prefill (VARIABLE mode: count exchange, packed rows) and a
    decode step (FIXED mode: capacity buffers, the overflow flag)."""
    cfg = from_hf_config(tiny_fused)
    layout = CheckpointLayout(prefix="model.language_model.", layout="fused", mtp_layout=None, has_vision=False)
    x, k = A2A_SHAPE.expert_ranks, cfg.num_experts_per_tok
    rec = Recorder()
    # stand-in values for the seam's host reads: the prefill's X counts sum to its T * k rows (all to expert
    # rank 0, which the echo then answers); the decode's overflow flag reads "none" (the fast path)
    rec.answers[("dispatch.py", "dispatch")] = lambda n: A2A_PROMPT * k if n % x == 0 else 0
    rec.answers[("a2a_protocol.py", "read_overflow")] = False
    transport = _Transport()
    steps: dict[str, tuple[StepResult, list[Event], int, StepPlan]] = {}
    spec = GroupSpec("127.0.0.1", 1, world_size=A2A_SHAPE.world_size, backend="gloo", deadline_s=1.0, epoch=0)
    emap = ExpertMap.contiguous(num_experts=cfg.num_experts, num_moe_layers=cfg.num_moe_layers, expert_ranks=x)
    layers = tuple(range(cfg.num_layers))
    with pytest.MonkeyPatch.context() as mp, FakeTensorMode(), _Ops(rec), _Placement(rec):
        mp.setattr(a2a_protocol, "dist", transport)
        reader = _SpecReader(layout.expected(cfg))
        trunk_w = load_trunk(reader, cfg, dtype=torch.bfloat16, layout=layout, device=CUDA)  # type: ignore[arg-type]  # the reader's boundary, see _SpecReader
        trunk = Trunk(trunk_w, cfg, dtype=torch.bfloat16)
        _watch_layers(trunk, rec)
        group = _CudaGroup(None, 0, spec)  # type: ignore[arg-type]  # no process group: the transport is replaced
        routed = AllToAllDispatcher(
            group, A2A_SHAPE, emap, hidden=cfg.hidden_size, dtype=torch.bfloat16, num_experts=cfg.num_experts
        )
        pools = CachePools.allocate(cfg, num_blocks=8, block_size=16, num_slots=2, dtype=torch.bfloat16, device=CUDA)
        rank = TrunkRank(trunk, pools, routed, progress=group.progress)
        rec.take()
        greedy = SamplingParams(temperature=0.0)
        start = SeqStart(slot=0, params=greedy, prompt_len=A2A_PROMPT)
        plans = {
            "prefill": (
                StepRequest(seqs=(SeqStep(1, 0, tuple(range(1, A2A_PROMPT + 1)), (0, 1, 2), start=start),)),
                StepPlan(layers, VARIABLE),
            ),
            "decode": (
                StepRequest(seqs=(SeqStep(1, A2A_PROMPT, (5,), output_index=1),)),
                StepPlan(layers, FIXED, fixed_capacity(1, top_k=k, expert_ranks=x, factor=2.0)),
            ),
        }
        for name, (req, plan) in plans.items():
            before = len(transport.calls)
            res = rank.step(req, plan)
            assert not any(res.errors), f"{name}: the step refused or failed its sequences: {res.errors}"
            bad = [(o, i) for o, i in transport.calls[before:] if o != CUDA or i != CUDA]
            assert not bad, f"{name}: a collective was handed host tensors: {bad}"
            steps[name] = (res, rec.take(), len(transport.calls) - before, plan)
    return A2aRun(cfg, rank, steps)


def test_a2a_trunk_step_keeps_every_tensor_on_the_device(a2a_run: A2aRun) -> None:
    """Both modes ran to a sampled token with every collective on device tensors (checked in the fixture),
    the expected number of collectives per MoE layer, and no op mixing a CPU tensor in."""
    per_layer = {"prefill": 3, "decode": 2}  # counts + rows + answers; rows + answers (the counts ride in headers)
    for name, (res, evs, collectives, plan) in a2a_run.steps.items():
        assert res.token_ids[0] is not None, name
        assert collectives == per_layer[name] * len(plan.moe_layers), name
        bad = [str(e) for e in evs if e.kind == "cpu-tensor"]
        assert not bad, f"{name}:\n" + "\n".join(bad)
    assert all(t.device == CUDA for t in _all_tensors(a2a_run.rank.routed))


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_a2a_layer_syncs_are_only_the_named_reads(a2a_run: A2aRun, step: str) -> None:
    """Inside the decoder layers the seam reads back only A2A_LAYER_READS (printed with why), each once per
    MoE layer: decode the combine header's overflow flag; prefill the row counts sent (split sizes)."""
    _, evs, _, plan = a2a_run.steps[step]
    syncs = _layer_syncs(evs)
    named = A2A_LAYER_READS[step]
    unnamed = [str(e) for e in syncs if e.site not in named]
    assert not unnamed, "host syncs in the layers beyond the named reads:\n" + "\n".join(unnamed)
    for site, why in named.items():
        # one call per MoE layer, each the same number of recorded reads (a list read counts per element)
        calls = [e for e in syncs if e.site == site]
        print(f"{step}: {site[0]}:{site[1]} ({why}): {len(calls)} reads over {len(plan.moe_layers)} MoE layers")
        assert calls and len(calls) % len(plan.moe_layers) == 0, (site, len(calls))
    assert not [e for e in evs if e.in_layers and e.kind == "d2h"]


def test_a2a_host_transfers_outside_the_layers_are_the_named_points(a2a_run: A2aRun) -> None:
    unnamed = [
        f"{name}: {e}"
        for name, (_, evs, _, _) in a2a_run.steps.items()
        for e in _outside(evs)
        if not any((f, fn) in NAMED_POINTS for f, fn, _ in e.frames)
    ]
    assert not unnamed, "host transfers outside the named points:\n" + "\n".join(unnamed)
