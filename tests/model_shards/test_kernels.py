"""Kernel selection (model_shards/kernels.py): library kernels on CUDA, the torch references elsewhere.

Proves, on CPU: the choice is made from the tensor's device (CPU and FakeTensors take the reference
even where a library imports; `EPSERVE_KERNELS=reference` forces it); the glue to fla's and
causal-conv1d's calling conventions (value-head repeat, scale, l2norm flag, keyword order, state in /
out, dropped causal-padding columns) is right: the DeltaNet mixer run through stand-ins that
implement each library's documented contract token by token equals the mixer on the references,
prefill then decode, states in the slots included; the grouped-GEMM fallback (older torch, fp32 on
CUDA) equals `F.grouped_mm`.
Where CUDA exists (skipped otherwise): fla's kernels against the references on the GPU, with the
tolerances stated beside each check; bf16 grouped GEMM against the per-expert fp32 reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model_shards import delta_rule, kernels
from model_shards.config import tiny
from model_shards.gated_deltanet import _conv_silu
from tests.model_shards.test_blocks import (
    LAYER,
    MIXER_FP32_ATOL,
    STATE_FP32_ATOL,
    _deltanet_weights,
    _make_seqs,
    _pools,
    _run_deltanet,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ------------------------------------------------------------------------------ selection
def test_choose_takes_a_library_only_for_a_real_cuda_tensor() -> None:
    libs = (kernels.FLA, kernels.CAUSAL_CONV1D)
    assert kernels.choose(CUDA, fake=False, available=libs) == kernels.FLA  # preference order
    assert kernels.choose(CUDA, fake=False, available=libs[1:]) == kernels.CAUSAL_CONV1D
    assert kernels.choose(CPU, fake=False, available=libs) == kernels.TORCH
    assert kernels.choose(CUDA, fake=True, available=libs) == kernels.TORCH  # FakeTensorMode device tests
    assert kernels.choose(CUDA, fake=False, available=()) == kernels.TORCH  # no library installed
    assert kernels.choose(CUDA, fake=False, available=libs, forced_reference=True) == kernels.TORCH


def _stand_in_fla() -> SimpleNamespace:
    return SimpleNamespace(chunk=_fla_contract_rule, recurrent=_fla_contract_rule, conv=_fla_contract_conv)


def test_backends_follow_the_tensor_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a library 'installed', a CPU tensor and a fake CUDA tensor still take the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(kernels, "fla_ops", _stand_in_fla)
    x = torch.zeros(2, 3)
    assert kernels.deltanet_backend(x) == kernels.TORCH
    assert kernels.conv_backend(x) == kernels.TORCH
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda")  # made on "cuda" directly: CPU-only torch can't .to() it
        assert kernels.deltanet_backend(fake) == kernels.TORCH
        assert kernels.conv_backend(fake) == kernels.TORCH
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert kernels._forced_reference()


def test_library_probes_report_absence_here() -> None:
    """This CPU machine has neither library (the `gpu` extra): the probes say so instead of raising."""
    if kernels.fla_ops() is None:
        assert kernels.deltanet_backend(torch.zeros(1)) == kernels.TORCH
    assert kernels.causal_conv1d_fn() is None or callable(kernels.causal_conv1d_fn())


# ------------------------------------------------------------------------------ glue, through the libraries' contracts
def _fla_contract_rule(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's documented contract, token by token (a stand-in for the library, not our code): q, k
    [B, T, H, K] on as many heads as v; g log decay; l2norm in kernel; o = scale * S^T q."""
    assert q.shape[2] == k.shape[2] == v.shape[2] and output_final_state and use_qk_l2norm_in_kernel
    assert initial_state.dtype == torch.float32 and initial_state.is_contiguous()
    qf, kf = (x.float() * torch.rsqrt((x.float() ** 2).sum(-1, keepdim=True) + 1e-6) for x in (q, k))  # fla's l2norm
    s = initial_state.clone()
    out = torch.empty(v.shape, dtype=torch.float32)
    for t in range(q.shape[1]):
        s = s * g[:, t].exp()[..., None, None]
        u = beta[:, t].float()[..., None] * (v[:, t].float() - torch.einsum("bhkv,bhk->bhv", s, kf[:, t]))
        s = s + kf[:, t, ..., None] * u[..., None, :]
        out[:, t] = scale * torch.einsum("bhkv,bhk->bhv", s, qf[:, t])
    return out.to(q.dtype), s


def _fla_contract_conv(
    *, x: torch.Tensor, weight: torch.Tensor, bias: None, activation: str
) -> tuple[torch.Tensor, None]:
    """fla's `causal_conv1d` contract: x [B, T, C], zero left padding, depthwise, SiLU; returns (y, state)."""
    assert activation == "silu" and bias is None
    w = weight.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (w - 1, 0)), weight.unsqueeze(1), groups=x.shape[2])
    return F.silu(y).transpose(1, 2), None


def _dao_contract_conv(x: torch.Tensor, weight: torch.Tensor, bias: None, activation: str) -> torch.Tensor:
    """causal-conv1d's `causal_conv1d_fn` contract: x [B, C, L], zero left padding, depthwise, SiLU."""
    assert activation == "silu" and bias is None
    return F.silu(F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight.unsqueeze(1), groups=x.shape[1]))


@pytest.mark.parametrize("conv_lib", [kernels.FLA, kernels.CAUSAL_CONV1D])
def test_mixer_through_library_contracts_equals_references(monkeypatch: pytest.MonkeyPatch, conv_lib: str) -> None:
    """Prefill (chunk kernel, conv over the window) of three sequences, then 3 decode steps (fused
    recurrent kernel, conv at the newest position): outputs and the slots' conv windows and states
    equal a run on the references (fp32; the stand-ins' per-token sums differ by rounding only)."""
    cfg = tiny()
    w = _deltanet_weights(cfg, seed=1)
    prompt, steps = [70, 7, 64], 3
    seqs = _make_seqs(cfg, [n + steps for n in prompt], seed=2, slots=[4, 1, 6])
    pools_ref, pools_lib = _pools(cfg), _pools(cfg)

    def run(pools, lib: bool) -> list[torch.Tensor]:  # noqa: ANN001  # CachePools
        with monkeypatch.context() as m:
            if lib:
                m.setattr(kernels, "fla_ops", _stand_in_fla)
                m.setattr(kernels, "causal_conv1d_fn", lambda: _dao_contract_conv)
                m.setattr(kernels, "deltanet_backend", lambda x: kernels.FLA)
                m.setattr(kernels, "conv_backend", lambda x: conv_lib)
            outs = _run_deltanet([(s, 0, n) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
            for i in range(steps):
                outs += _run_deltanet([(s, n + i, n + i + 1) for s, n in zip(seqs, prompt)], cfg=cfg, w=w, pools=pools)
            return outs

    want, got = run(pools_ref, lib=False), run(pools_lib, lib=True)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=MIXER_FP32_ATOL, rtol=0, msg=lambda m, i=i: f"output {i}: {m}")
    conv_ref, rec_ref = pools_ref.state(LAYER)
    conv_lib_, rec_lib = pools_lib.state(LAYER)
    for s in seqs:
        torch.testing.assert_close(conv_lib_[s.slot], conv_ref[s.slot], atol=STATE_FP32_ATOL, rtol=0)
        torch.testing.assert_close(rec_lib[s.slot], rec_ref[s.slot], atol=STATE_FP32_ATOL, rtol=0)
    untouched = [i for i in range(conv_ref.shape[0]) if i not in {s.slot for s in seqs}]
    assert torch.isnan(rec_lib[untouched]).all()  # other slots never written


def test_verify_steps_keep_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """`keep_states` (states after every token) is not something fla returns: the reference answers."""
    monkeypatch.setattr(kernels, "fla_ops", lambda: SimpleNamespace(chunk=None, recurrent=None, conv=None))
    monkeypatch.setattr(kernels, "deltanet_backend", lambda x: kernels.FLA)
    gen = torch.Generator().manual_seed(0)
    args = dict(
        k_BTHK=torch.randn(1, 3, 2, 8, generator=gen),
        v_BTHV=torch.randn(1, 3, 4, 8, generator=gen),
        g_BTH=-torch.rand(1, 3, 4, generator=gen),
        beta_BTH=torch.rand(1, 3, 4, generator=gen),
        state_BHKV=torch.randn(1, 4, 8, 8, generator=gen),
    )
    q = torch.randn(1, 3, 2, 8, generator=gen)
    got = kernels.recurrent_gated_delta_rule(q, keep_states=True, **args)
    want = delta_rule.recurrent_gated_delta_rule(q, keep_states=True, **args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------ grouped GEMM
def _grouped_inputs(dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 5, 1])
    a = torch.randn(int(counts.sum()), 16, generator=gen).to(device, dtype)
    b = torch.randn(4, 16, 8, generator=gen).to(device, dtype)
    return a, b, torch.cumsum(counts, 0, dtype=torch.int32).to(device)


def test_grouped_mm_fallback_equals_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-group mm (older torch; fp32 on CUDA) against `F.grouped_mm` on CPU (fp32: rounding only)."""
    a, b, offs = _grouped_inputs(torch.float32)
    want = F.grouped_mm(a, b, offs=offs)
    assert kernels.grouped_mm_applies(a, b)
    monkeypatch.delattr(F, "grouped_mm")  # a torch without it
    assert not kernels.grouped_mm_applies(a, b)
    torch.testing.assert_close(kernels.grouped_mm(a, b, offs=offs), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ on CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_fla = pytest.mark.skipif(kernels.fla_ops() is None, reason="needs fla (pip install '.[gpu]')")

H, HK, K, V = 8, 2, 64, 64


def _rule_inputs(b: int, t: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(b * 1000 + t)
    return {
        name: x.to("cuda")
        for name, x in dict(
            q_BTHK=torch.randn(b, t, HK, K, generator=gen).to(dtype),
            k_BTHK=torch.randn(b, t, HK, K, generator=gen).to(dtype),
            v_BTHV=torch.randn(b, t, H, V, generator=gen).to(dtype),
            g_BTH=-0.1 * F.softplus(torch.randn(b, t, H, generator=gen)),
            beta_BTH=torch.rand(b, t, H, generator=gen).to(dtype),
            state_BHKV=0.5 * torch.randn(b, H, K, V, generator=gen),
        ).items()
    }


# fp32 inputs: fla's Triton dots may run in TF32 (10-bit mantissa): outputs O(1) over up to 300 tokens
# agree to ~1e-3; 5e-3 absolute + 5e-3 relative. bf16 inputs: both sides round q/k/v to bf16 first,
# fla keeps intermediates in bf16 where the reference upcasts: 3e-2 absolute (a few bf16 ulps at O(1)).
TOL = {torch.float32: dict(atol=5e-3, rtol=5e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@needs_cuda
@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [1, 63, 64, 65, 300])
def test_fla_chunk_matches_reference_on_cuda(t: int, dtype: torch.dtype) -> None:
    x = _rule_inputs(2, t, dtype)
    assert kernels.deltanet_backend(x["q_BTHK"]) == kernels.FLA
    out, state = kernels.chunk_gated_delta_rule(**x)
    want_out, want_state = delta_rule.chunk_gated_delta_rule(**x)
    torch.testing.assert_close(out.float(), want_out.float(), **TOL[dtype])
    torch.testing.assert_close(state, want_state, **TOL[dtype])


@needs_cuda
@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_recurrent_step_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    x = _rule_inputs(16, 1, dtype)
    out, state = kernels.recurrent_gated_delta_rule(**x)
    want_out, want_state = delta_rule.recurrent_gated_delta_rule(**x)
    torch.testing.assert_close(out.float(), want_out.float(), **TOL[dtype])
    torch.testing.assert_close(state, want_state, **TOL[dtype])


@needs_cuda
@pytest.mark.skipif(
    kernels.fla_ops() is None and kernels.causal_conv1d_fn() is None, reason="needs fla or causal-conv1d"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_conv_library_matches_reference_on_cuda(dtype: torch.dtype) -> None:
    """fp32: summation order only (1e-5); bf16: the reference rounds the fp32 sum to bf16 once, a
    library may round differently (2 bf16 ulps at O(1): 2e-2)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 96, 3 + 70, generator=gen).to("cuda", dtype)
    w = (0.3 * torch.randn(96, 4, generator=gen)).to("cuda", dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kernels.conv_silu(x, w, dtype), _conv_silu(x, w, dtype), **tol)
    torch.testing.assert_close(kernels.conv_silu_last(x, w, dtype), _conv_silu(x, w, dtype)[:, :, -1], **tol)


@needs_cuda
def test_grouped_mm_on_cuda_matches_per_expert_reference() -> None:
    """bf16 grouped GEMM (fp32 accumulation) against fp32 per-group matmuls of the same bf16 values:
    within bf16 output rounding (1e-2 relative)."""
    a, b, offs = _grouped_inputs(torch.bfloat16, "cuda")
    got = kernels.grouped_mm(a, b, offs=offs).float()
    want = kernels.grouped_mm(a.float(), b.float(), offs=offs)  # fp32 on CUDA: the per-group fallback
    torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)
