"""Library kernels where they apply, the pure-torch references everywhere else.

Owns: choosing, per call and from the tensors' device, between a maintained library kernel and
the torch code that stays the CPU path and the oracle, and the glue to each library's calling
convention:
- Gated DeltaNet rule: flash-linear-attention (`fla`, the `fla-core` package) `chunk_gated_delta_rule`
  (prefill) and `fused_recurrent_gated_delta_rule` (a decode step); reference: model_shards/delta_rule.py.
- The short causal conv (+ SiLU): fla's `causal_conv1d`, else Dao's `causal_conv1d_fn` (the
  `causal-conv1d` package); reference: `_conv_silu` / `_conv_silu_last` in model_shards/gated_deltanet.py.
- Expert grouped GEMM: `F.grouped_mm` where the installed torch has it and it takes the operands
  (CPU any dtype; CUDA bf16 only), else one GEMM per group.
A library kernel is used only for a real CUDA tensor (never a FakeTensor: the device-path tests run the
references) and when the library imports; `EPSERVE_KERNELS=reference` forces the references.
Must not: hold state (the caller reads and writes the state slots) or change the references' results.
Tests: tests/model_shards/test_kernels.py (selection and glue on CPU; library vs reference where CUDA exists).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from model_shards import delta_rule

KERNELS_ENV = "EPSERVE_KERNELS"  # "auto" (default) or "reference"
TORCH = "torch"
FLA = "fla"
CAUSAL_CONV1D = "causal_conv1d"


# ------------------------------------------------------------------------------ selection
def choose(device: torch.device, *, fake: bool, available: tuple[str, ...], forced_reference: bool = False) -> str:
    """The backend for a tensor on `device`: the first of `available` (libraries in preference order)
    for a real CUDA tensor, else TORCH. Pure: the unit-tested core of every `*_backend` below."""
    if forced_reference or fake or device.type != "cuda" or not available:
        return TORCH
    return available[0]


def _is_fake(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def _forced_reference() -> bool:
    return os.environ.get(KERNELS_ENV, "auto").strip().lower() == "reference"


@functools.cache
def fla_ops() -> SimpleNamespace | None:
    """fla's delta-rule and conv entry points, or None where fla (or its Triton) does not import."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # noqa: BLE001  # ImportError, or Triton failing at import on a machine without a driver
        return None
    conv = None
    for module in ("fla.modules.causal_conv1d", "fla.modules.convolution", "fla.modules"):
        try:
            conv = getattr(__import__(module, fromlist=["causal_conv1d"]), "causal_conv1d", None)
        except Exception:  # noqa: BLE001  # moved between fla releases: try the next home
            conv = None
        if conv is not None:
            break
    return SimpleNamespace(chunk=chunk_gated_delta_rule, recurrent=fused_recurrent_gated_delta_rule, conv=conv)


@functools.cache
def causal_conv1d_fn() -> Callable | None:
    """Dao's `causal_conv1d_fn` (x [B, C, L], weight [C, W]), or None where it does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn as fn
    except Exception:  # noqa: BLE001  # ImportError, or its extension failing to load
        return None
    return fn


def deltanet_backend(x: torch.Tensor) -> str:
    """FLA or TORCH for the delta rule on x's device."""
    return choose(
        x.device,
        fake=_is_fake(x),
        available=(FLA,) if fla_ops() is not None else (),
        forced_reference=_forced_reference(),
    )


def conv_backend(x: torch.Tensor) -> str:
    """FLA, CAUSAL_CONV1D or TORCH for the short causal conv on x's device."""
    ops = fla_ops()
    available = tuple(
        name
        for name, ok in ((FLA, ops is not None and ops.conv is not None), (CAUSAL_CONV1D, causal_conv1d_fn()))
        if ok
    )
    return choose(x.device, fake=_is_fake(x), available=available, forced_reference=_forced_reference())


# ------------------------------------------------------------------------------ Gated DeltaNet rule
def _on_value_heads(x_BTHK: torch.Tensor, heads: int) -> torch.Tensor:
    """q / k from Hk key heads to `heads` value heads (value head h reads key head h // r, as the
    references' [Hk, r] view does). Repeated rather than left to fla's grouped-value support, which
    older fla releases lack."""
    r = heads // x_BTHK.shape[2]
    return x_BTHK.repeat_interleave(r, dim=2) if r > 1 else x_BTHK


def _fla_rule(
    fn: Callable,
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fla delta-rule call in the references' convention. Every argument by keyword: fla 0.5+ put
    `gk` / `gv` before `beta` in the fused recurrent kernel's positional order."""
    h = v_BTHV.shape[2]
    out, state = fn(
        q=_on_value_heads(q_BTHK, h).contiguous(),
        k=_on_value_heads(k_BTHK, h).contiguous(),
        v=v_BTHV.contiguous(),
        g=g_BTH.float().contiguous(),
        beta=beta_BTH.contiguous(),
        scale=q_BTHK.shape[-1] ** -0.5,
        initial_state=state_BHKV.float().contiguous(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,  # the references' l2norm: x * rsqrt(sum(x^2) + 1e-6)
    )
    return out.to(q_BTHK.dtype), state.float()


def chunk_gated_delta_rule(
    q_BTHK: torch.Tensor,
    *,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta_rule.chunk_gated_delta_rule` (same arguments and results) through fla's chunked kernel on
    CUDA. Right-padded rows (q = k = v = 0, g = 0, beta = 0) leave the state as it is in both."""
    ops = fla_ops()
    if ops is None or deltanet_backend(q_BTHK) != FLA:
        return delta_rule.chunk_gated_delta_rule(
            q_BTHK, k_BTHK=k_BTHK, v_BTHV=v_BTHV, g_BTH=g_BTH, beta_BTH=beta_BTH, state_BHKV=state_BHKV
        )
    return _fla_rule(ops.chunk, q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV)


def recurrent_gated_delta_rule(
    q_BTHK: torch.Tensor,
    *,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    state_BHKV: torch.Tensor,
    keep_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta_rule.recurrent_gated_delta_rule` through fla's fused recurrent kernel on CUDA. The
    states after every token (`keep_states`, speculative verification) come from the reference: fla
    returns only the last."""
    ops = fla_ops()
    if ops is None or keep_states or deltanet_backend(q_BTHK) != FLA:
        return delta_rule.recurrent_gated_delta_rule(
            q_BTHK,
            k_BTHK=k_BTHK,
            v_BTHV=v_BTHV,
            g_BTH=g_BTH,
            beta_BTH=beta_BTH,
            state_BHKV=state_BHKV,
            keep_states=keep_states,
        )
    return _fla_rule(ops.recurrent, q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, state_BHKV)


# ------------------------------------------------------------------------------ short causal conv
def conv_silu(x_BCL: torch.Tensor, weight_CK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Library form of gated_deltanet's `_conv_silu`: depthwise conv without padding over x (whose first
    kernel - 1 columns are the left context), then SiLU. Returns [B, C, L - kernel + 1].

    The library kernels pad causally (zeros on the left); their first kernel - 1 outputs (which would
    see those zeros) are dropped, so the rest see exactly x's columns. Callers check `conv_backend`
    first; TORCH here raises (the reference lives beside its callers).
    """
    width = weight_CK.shape[1]
    x = x_BCL.to(weight_CK.dtype)
    backend = conv_backend(x_BCL)
    if backend == FLA:
        ops = fla_ops()
        assert ops is not None and ops.conv is not None  # conv_backend said so
        out = ops.conv(x=x.transpose(1, 2), weight=weight_CK, bias=None, activation="silu")  # [B, L, C] in and out
        y = (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    elif backend == CAUSAL_CONV1D:
        fn = causal_conv1d_fn()
        assert fn is not None
        y = fn(x, weight_CK, None, activation="silu")  # [B, C, L]
    else:
        raise ValueError(f"no conv library applies to a {x_BCL.device} tensor; use the reference")
    return y[:, :, width - 1 :].to(out_dtype)


def conv_silu_last(x_BCL: torch.Tensor, weight_CK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`conv_silu` at the newest position only (a decode step's window of exactly `kernel` columns). Returns [B, C]."""
    return conv_silu(x_BCL[:, :, -weight_CK.shape[1] :], weight_CK, out_dtype)[:, :, -1]


# ------------------------------------------------------------------------------ expert grouped GEMM
_GROUPED_MM_REJECTED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) this torch's grouped_mm refused


def grouped_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: the installed torch has it, on CUDA the operands
    are bf16 (its CUDA kernels take nothing else), and it has not refused this device and dtype before."""
    if not hasattr(F, "grouped_mm") or (a.device.type, a.dtype) in _GROUPED_MM_REJECTED:
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    return True


def _grouped_mm_masked(a_RK: torch.Tensor, b_EKN: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` without reading the offsets on the host (what a CUDA-graph capture needs where
    `F.grouped_mm` does not apply, e.g. the fp32 checks): every row times every group's matrix, each row
    keeping its own group's product. E times the FLOPs: a decode-sized fallback, not a serving path."""
    rows = torch.arange(a_RK.shape[0], device=a_RK.device, dtype=offs.dtype)
    group = torch.searchsorted(offs, rows, right=True)  # [R] the group of each row
    out = a_RK.new_zeros(a_RK.shape[0], b_EKN.shape[-1])
    for e in range(b_EKN.shape[0]):
        out = torch.where((group == e)[:, None], torch.mm(a_RK, b_EKN[e]), out)
    return out


def grouped_mm(a_RK: torch.Tensor, b_EKN: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm(a, b, offs=offs)`: rows offs[e-1]:offs[e] of a times b[e]. Where it does not apply
    (older torch; fp32 on CUDA, as the fp32 parity checks run; a torch whose CPU grouped_mm refuses the
    dtype) one `mm` per group, which reads the offsets on the host (one sync)."""
    if grouped_mm_applies(a_RK, b_EKN):
        try:
            return F.grouped_mm(a_RK, b_EKN, offs=offs)
        except (RuntimeError, NotImplementedError):
            # e.g. a CPU or dtype this torch's grouped_mm lacks: remembered, so it is tried once per process
            _GROUPED_MM_REJECTED.add((a_RK.device.type, a_RK.dtype))
    if a_RK.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _grouped_mm_masked(a_RK, b_EKN, offs=offs)
    out = a_RK.new_empty(a_RK.shape[0], b_EKN.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(a_RK[start:end], b_EKN[e], out=out[start:end])
        start = end
    return out
