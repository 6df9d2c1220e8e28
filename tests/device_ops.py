"""Test helpers for device-path proofs without a GPU: a dispatch mode that records host syncs.

`HostSyncRecorder` is a `TorchDispatchMode` that sees every aten op of the code run under it and
records (or raises at) what would stall a GPU stream or move data off the device:
- "sync": an op that needs a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`,
  `torch.equal`: aten `_local_scalar_dense`, `is_nonzero`, `equal`);
- "d2h": a device-to-host copy (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(device_tensor)`);
- "data_dependent": an op whose output shape depends on device values, which the host must read
  (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`, `repeat_interleave` with
  tensor repeats and no output size);
- "mixed": a CPU tensor (not a 0-dim scalar) used by an op on device tensors (an implicit copy);
- "h2d": a host-to-device copy (allowed by default: step inputs and plans built from host-known
  lengths go in this way; recorded so a test can count or forbid them).
Use it inside `torch._subclasses.fake_tensor.FakeTensorMode` with tensors created directly on device
"cuda" (on a CPU-only torch, `.to("cuda")` of a fake tensor fails; `torch.empty(..., device="cuda")`
works): fake tensors have no values, so `.item()` etc. raise there anyway, but `.cpu()` passes
silently and the fake errors name no source line. (On a CPU-only torch, `nonzero` and boolean-mask
indexing of a fake cuda tensor fail before dispatch with "not linked with support for cuda devices":
still a failure, without the recorder's source line.) The recorder names the op and the first frame
outside torch and this file, and by default raises `HostSyncError` at the first forbidden event.
Enter the recorder after (inside) the FakeTensorMode so it sees each op first.
Fake runs exercise the reference (pure torch) code paths only: Triton, fla, scaled GEMMs, streams and
CUDA graphs cannot run on fake tensors.
Tests: tests/model_shards/test_host_syncs.py.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

FORBIDDEN = frozenset({"sync", "d2h", "data_dependent", "mixed"})

_aten = torch.ops.aten
_SYNC_OPS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default}
_DATA_DEPENDENT = {
    _aten.nonzero.default,
    _aten.argwhere.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten._unique.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.histc.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass(frozen=True)
class HostSync:
    """One recorded event: its kind (see the module docstring), the aten op and where it was called."""

    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


class HostSyncError(AssertionError):
    """A forbidden host sync or device-to-host copy happened under a strict `HostSyncRecorder`."""


def _caller() -> str:
    """file:line (function) of the innermost frame outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _HERE or path.startswith(_TORCH_DIR):
            continue
        return f"{os.path.relpath(path)}:{frame.lineno} ({frame.name})"
    return "?"


def _is_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


class HostSyncRecorder(TorchDispatchMode):
    """Records host syncs, device-to-host copies, data-dependent shapes and CPU operands of device ops.

    Args:
        forbid: the kinds that raise `HostSyncError` at once (default: all but "h2d"); an empty set
            records everything and raises nothing (to list what a path does on real tensors).
    Attributes:
        events: every recorded event, in order.
    """

    def __init__(self, *, forbid: Iterable[str] = FORBIDDEN) -> None:
        super().__init__()
        self.forbid = frozenset(forbid)
        self.events: list[HostSync] = []

    def of_kind(self, *kinds: str) -> list[HostSync]:
        return [e for e in self.events if e.kind in kinds]

    @property
    def forbidden(self) -> list[HostSync]:
        """Recorded events of the forbidden kinds (non-empty only when `forbid` is empty or was changed)."""
        return self.of_kind(*FORBIDDEN)

    def _record(self, kind: str, func: torch._ops.OpOverload) -> None:
        event = HostSync(kind, str(func), _caller())
        self.events.append(event)
        if kind in self.forbid:
            raise HostSyncError(f"host sync under HostSyncRecorder: {event}")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401  # aten's signature
        kwargs = kwargs or {}
        for kind in self._classify(func, args, kwargs):
            self._record(kind, func)
        return func(*args, **kwargs)

    @staticmethod
    def _classify(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[str]:
        if func in _SYNC_OPS:
            return ["sync"]
        if func in _DATA_DEPENDENT:
            return ["data_dependent"]
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return ["data_dependent"]
        kinds = []
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                kinds.append("data_dependent")
        if func is _aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device")
            if dst is not None and torch.device(dst).type != src.type:
                kinds.append("d2h" if torch.device(dst).type == "cpu" else "h2d")
            return kinds
        if func in (_aten.copy_.default, _aten.copy.default):
            dst_dev, src_dev = args[0].device, args[1].device
            if dst_dev.type != src_dev.type:
                kinds.append("d2h" if dst_dev.type == "cpu" else "h2d")
            return kinds
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_device = any(not _is_cpu(t) for t in tensors)
        if on_device and any(_is_cpu(t) and t.dim() > 0 for t in tensors):
            kinds.append("mixed")
        return kinds
