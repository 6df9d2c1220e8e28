"""The decode layer stack on device "cuda" makes no host sync: layer-level fake-tensor tests.

Each layer runs under `FakeTensorMode` with every tensor created directly on "cuda" (no GPU needed)
and under `tests.device_ops.HostSyncRecorder`, which raises at the first host sync, device-to-host
copy, data-dependent shape or CPU operand. Fake tensors run the pure-torch reference paths only
(no Triton, fla, scaled GEMMs, streams or graphs).
"""

from __future__ import annotations

import pytest
import torch

from cluster.placement import ExpertMap
from cluster.process_groups import GroupHandle, GroupSpec
from cluster.topology import GroupShape
from model_shards.batch import SeqChunk, StepBatch
from model_shards.cache import CachePools
from model_shards.config import ModelConfig, tiny
from model_shards.experts import ExpertShard, LayerExperts
from model_shards.gated_attention import AttentionWeights, attention_forward
from model_shards.gated_deltanet import DeltaNetWeights, deltanet_forward
from model_shards.moe import SharedMoEWeights, route_and_shared
from model_shards.quant import FP8_DTYPE, Fp8Weight
from replicas.ep import dispatch as dispatch_module
from replicas.ep import expert_rank as expert_rank_module
from replicas.ep.a2a_protocol import FIXED, StepPlan, fixed_capacity
from replicas.ep.dispatch import AllToAllDispatcher, LocalDispatcher
from replicas.ep.expert_rank import ExpertRank
from tests.device_ops import HostSyncError, HostSyncRecorder, fake_cuda


def test_recorder_flags_each_kind_of_host_sync() -> None:
    """The recorder itself: every kind it promises is caught on fake cuda tensors, with the source line."""
    with fake_cuda():
        a = torch.randn(4, 8, device="cuda")
        i = torch.tensor([0, 2], device="cuda")
        cases = {
            "item": lambda: a.sum().item(),
            "tolist": lambda: i.tolist(),
            "bool": lambda: bool((a > 0).any()),
            "cpu": lambda: a.cpu(),
            "bincount": lambda: torch.bincount(i, minlength=4),
            "mixed": lambda: a + torch.ones(4, 8),
        }
        for fn in cases.values():
            with pytest.raises(HostSyncError, match="test_host_syncs.py"), HostSyncRecorder():
                fn()
        # nonzero (and boolean-mask indexing) on a fake cuda tensor fails before dispatch on a CPU-only torch
        # ("not linked with support for cuda devices"): still a failure, without the recorder's source line
        for fn in (lambda: a.nonzero(), lambda: a[a > 0]):
            with pytest.raises((HostSyncError, RuntimeError)), HostSyncRecorder():
                fn()
        with HostSyncRecorder() as rec:  # sync-free ops pass; a host-to-device copy is recorded, not raised
            torch.zeros(4, dtype=torch.long, device="cuda").index_add_(0, i, torch.ones_like(i))
            torch.topk(a, 2)
            torch.tensor([1, 2], device="cuda")
        assert [e.kind for e in rec.events] == ["h2d"]


# ============================================================================== layers on fake "cuda"
DEV = "cuda"
BLOCK = 16
DT = torch.bfloat16  # the serving dtype on a GPU (F.grouped_mm on CUDA takes bf16)


def _rand(*shape: int, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(*shape, device=DEV, dtype=dtype)


def _attention_weights(cfg: ModelConfig) -> AttentionWeights:
    d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    qkv = _rand((2 * h + 2 * hkv) * hd, d)
    q, k, v = qkv.split([2 * h * hd, hkv * hd, hkv * hd])
    return AttentionWeights(q, k, v, _rand(d, h * hd), _rand(hd), _rand(hd), qkv_proj=qkv)


def _deltanet_weights(cfg: ModelConfig) -> DeltaNetWeights:
    d, h, hv, c = cfg.hidden_size, cfg.linear_num_value_heads, cfg.linear_value_dim, cfg.linear_conv_dim
    qkvz = _rand(c + hv, d)
    qkv, z = qkvz.split([c, hv])
    return DeltaNetWeights(
        in_proj_qkv=qkv,
        in_proj_z=z,
        in_proj_b=_rand(h, d),
        in_proj_a=_rand(h, d),
        conv1d=_rand(c, cfg.linear_conv_kernel_dim),
        dt_bias=_rand(h),
        A_log=_rand(h, dtype=torch.float32),
        norm=_rand(cfg.linear_value_head_dim),
        out_proj=_rand(d, hv),
        in_proj_qkvz=qkvz,
    )


# (context_len, new tokens, state slot) per sequence; blocks are laid out per sequence, 16 apiece
STEPS = {
    "decode": [(40, 1, 0), (100, 1, 1), (7, 1, 2)],  # consecutive slots: the in-place path
    "decode_scattered": [(40, 1, 5), (700, 1, 0), (7, 1, 3)],  # gathered / scattered slots, several key tiles
    "prefill": [(64, 30, 2), (0, 20, 4), (33, 1, 6)],  # a prefill resumed at 64, a fresh one, a decode row
    "verify": [(50, 3, 1), (20, 1, 2)],  # speculative verification (3 tokens) beside a decode row
}


def _batch(step: str) -> StepBatch:
    seqs = [
        SeqChunk(
            token_ids=tuple(range(n)),
            context_len=ctx,
            state_slot=slot,
            block_table=tuple(range(i * 48, i * 48 + -(-(ctx + n) // BLOCK))),
            verify=step == "verify" and n > 1,
            logits="all" if step == "verify" and n > 1 else "last",
        )
        for i, (ctx, n, slot) in enumerate(STEPS[step])
    ]
    return StepBatch.build(seqs, block_size=BLOCK, device=DEV)


def _pools(cfg: ModelConfig) -> CachePools:
    return CachePools.allocate(
        cfg, num_blocks=48 * 3, block_size=BLOCK, num_slots=8, dtype=DT, device=DEV, spec_tokens=3
    )


@pytest.mark.parametrize("step", list(STEPS))
def test_attention_layer_on_device_makes_no_host_sync(step: str) -> None:
    """Paged attention (decode rows tile by tile; chunked prefill over the pool) reads nothing back."""
    cfg = tiny()
    with fake_cuda():
        w, pools, batch = _attention_weights(cfg), _pools(cfg), _batch(step)
        x = _rand(batch.num_tokens, cfg.hidden_size)
        cos, sin = _rand(batch.num_tokens, cfg.rotary_dim), _rand(batch.num_tokens, cfg.rotary_dim)
        k_pool, v_pool = pools.kv(cfg.attention_layers[0])
        with HostSyncRecorder():
            out = attention_forward(x, w=w, cfg=cfg, batch=batch, cos=cos, sin=sin, k_pool=k_pool, v_pool=v_pool)
        assert out.device.type == DEV and out.shape == x.shape


@pytest.mark.parametrize("step", list(STEPS))
def test_deltanet_layer_on_device_makes_no_host_sync(step: str) -> None:
    """DeltaNet: recurrent decode (slots in place or gathered), chunked prefill groups, verification."""
    cfg = tiny()
    with fake_cuda():
        w, pools, batch = _deltanet_weights(cfg), _pools(cfg), _batch(step)
        x = _rand(batch.num_tokens, cfg.hidden_size)
        layer = cfg.linear_layers[0]
        conv, rec = pools.state(layer)
        with HostSyncRecorder():
            out = deltanet_forward(
                x, w=w, cfg=cfg, batch=batch, conv_state=conv, recurrent_state=rec, spec_state=pools.spec_state(layer)
            )
        assert out.device.type == DEV and out.shape == x.shape


def _fp8(*shape: int) -> Fp8Weight:
    """An FP8 stacked expert weight with (128, 128) blocks (partial blocks at tiny sizes)."""
    blocks = [-(-d // 128) for d in shape[-2:]]
    return Fp8Weight(
        torch.empty(*shape, device=DEV, dtype=FP8_DTYPE), _rand(*shape[:-2], *blocks, dtype=torch.float32), (128, 128)
    )


def _moe(cfg: ModelConfig, *, fp8: bool, held: tuple[int, ...]) -> tuple[SharedMoEWeights, ExpertShard]:
    d, e, i, s = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    stacked = _rand(e + 2 * s, d)
    router, gate, up = stacked.split([e, s, s])
    shared = SharedMoEWeights(router, gate, up, _rand(d, s), _rand(1, d), router_gate_up=stacked)
    n = len(held)
    gate_up, down = (_fp8(n, 2 * i, d), _fp8(n, d, i)) if fp8 else (_rand(n, 2 * i, d), _rand(n, d, i))
    return shared, ExpertShard([LayerExperts(held, gate_up, down)], num_experts=e)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("held", ["all", "some"])
@pytest.mark.parametrize("tokens", [3, 64])
def test_moe_block_on_device_makes_no_host_sync(fp8: bool, held: str, tokens: int) -> None:
    """Router + shared expert, then the local dispatcher's grouped expert FFN (bf16 grouped GEMM; FP8 by
    chunks of dequantised experts with device offsets) and its expert-load counting: nothing read back
    until the load counters' named read."""
    cfg = tiny()
    ids = tuple(range(cfg.num_experts)) if held == "all" else tuple(range(0, cfg.num_experts, 2))
    with fake_cuda():
        shared, shard = _moe(cfg, fp8=fp8, held=ids)
        dispatcher = LocalDispatcher(shard, num_moe_layers=1)
        x = _rand(tokens, cfg.hidden_size)
        with HostSyncRecorder():
            routing, y_shared = route_and_shared(x, w=shared, top_k=cfg.num_experts_per_tok)
            y = dispatcher(0, x, routing) + y_shared
            dispatcher.finish()
        assert y.device.type == DEV and y.shape == x.shape
        with HostSyncRecorder() as rec:  # the named read (every N steps): one device-to-host copy
            with pytest.raises(HostSyncError, match="take"):
                dispatcher.load.take()
        assert [e.kind for e in rec.events] == ["d2h"]


class _CudaGroup(GroupHandle):
    """The transport's boundary, replaced: a group whose device is "cuda" (no process group behind it)."""

    @property
    def device(self) -> torch.device:
        return torch.device(DEV)


def _loopback(group: GroupHandle, send: torch.Tensor, *, send_splits: list[int], recv_splits: list[int], out=None):  # noqa: ANN001, ANN202  # a2a_protocol.exchange's signature
    """`a2a_protocol.exchange` replaced at its boundary: no peers, the receive buffer comes back as is."""
    return out if out is not None else send.new_empty((sum(recv_splits), *send.shape[1:]))


class _Done:
    """The work handle of a looped-back exchange: already complete."""

    def wait(self) -> bool:
        return True


def _loopback_start(
    group: object,
    send: torch.Tensor,
    *,
    send_splits: list[int],
    recv_splits: list[int],
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, _Done]:
    """`a2a_protocol.exchange_start` replaced the same way (the dispatcher issues its exchanges asynchronously)."""
    return _loopback(group, send, send_splits=send_splits, recv_splits=recv_splits, out=out), _Done()


@pytest.mark.parametrize("tokens", [3, 64])
def test_fixed_capacity_dispatch_on_device_reads_only_the_overflow_flag(
    tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trunk side of the decode exchange (fixed capacity, D = 1, X = 2): destinations, counts, buffer
    slots and the combine gather stay on the device; the one host read per MoE layer is the combine
    header's overflow flag (`read_overflow`, answered "no overflow" here since fake tensors hold no values)."""
    cfg = tiny()
    monkeypatch.setattr(dispatch_module, "exchange", _loopback)
    monkeypatch.setattr(dispatch_module, "exchange_start", _loopback_start)
    monkeypatch.setattr(dispatch_module, "wait_exchange", lambda group, work: work.wait())
    spec = GroupSpec("127.0.0.1", 1, world_size=3, backend="gloo", deadline_s=1.0, epoch=0)
    shape = GroupShape(trunk_ranks=1, expert_ranks=2)
    emap = ExpertMap.contiguous(num_experts=cfg.num_experts, num_moe_layers=2, expert_ranks=2)
    with fake_cuda():
        group = _CudaGroup(None, 0, spec)  # type: ignore[arg-type]  # no process group: the transport is replaced
        d = AllToAllDispatcher(group, shape, emap, hidden=cfg.hidden_size, dtype=DT, num_experts=cfg.num_experts)
        shared, _ = _moe(cfg, fp8=False, held=(0,))
        x = _rand(tokens, cfg.hidden_size)
        plan = StepPlan((0, 1), mode=FIXED, capacity=fixed_capacity(tokens, top_k=4, expert_ranks=2, factor=2.0))
        with HostSyncRecorder(named={"read_overflow": False}) as rec:
            d.begin(plan)
            for layer in plan.moe_layers:
                routing, y_shared = route_and_shared(x, w=shared, top_k=cfg.num_experts_per_tok)
                y = d(layer, x, routing) + y_shared
            d.finish()
        assert y.device.type == DEV and y.shape == x.shape
        assert [e.kind for e in rec.of_kind("sync", "named", "d2h")] == ["named"] * len(plan.moe_layers)


@pytest.mark.parametrize("trunks", [1, 2])
def test_expert_rank_decode_layer_on_device_reads_only_its_headers(
    trunks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expert rank's fixed-capacity layer (the decode exchange): receive, run its experts, answer. The one
    host read per MoE layer is the dispatch headers (`read_headers`: each trunk's row count and overflow
    flag, which slice the rows and decide whether an extra exchange follows); here every trunk sends
    `rows` rows and no overflow."""
    cfg = tiny()
    monkeypatch.setattr(expert_rank_module, "exchange", _loopback)
    spec = GroupSpec("127.0.0.1", 1, world_size=trunks + 1, backend="gloo", deadline_s=1.0, epoch=0)
    shape = GroupShape(trunk_ranks=trunks, expert_ranks=1)
    cap, rows = 8, 5
    header = (rows, 0, 0, 0, 0, 0, 0, 0, 0)  # int64 little-endian count, then the flag byte
    for fp8 in (False, True):
        with fake_cuda():
            _, shard = _moe(cfg, fp8=fp8, held=tuple(range(cfg.num_experts)))
            group = _CudaGroup(None, trunks, spec)  # type: ignore[arg-type]  # the transport is replaced
            rank = ExpertRank(shard, group, shape, hidden=cfg.hidden_size, dtype=DT)
            with HostSyncRecorder(named={"read_headers": lambda k: header[k % 9]}) as rec:
                # the undecorated body: ops inside torch.inference_mode are invisible to dispatch modes
                stats = ExpertRank.serve.__wrapped__(rank, StepPlan((0,), mode=FIXED, capacity=cap))  # type: ignore[attr-defined]  # set by inference_mode's decorator
            assert stats.rows == trunks * rows
            assert {e.where.rsplit("(", 1)[1] for e in rec.of_kind("named")} == {"read_headers)"}
