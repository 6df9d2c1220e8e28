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
- "named": a "sync" inside one of the functions the recorder was told are the named host reads
  (`named={"read_overflow": False}`); under fake tensors (no values) the read returns the given value;
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
Dispatch modes see nothing inside `torch.inference_mode` (checked with torch 2.13, real and fake
tensors): call the undecorated function (`f.__wrapped__`) or run under `torch.no_grad` instead.
On a CPU-only torch, Python indexing (`t[0]`, `t[a:b]`, `t[idx] = v`) of a fake cuda tensor also fails
(the indexing entry point takes a CUDA device guard): `fake_cuda()` is FakeTensorMode plus
`FakeCudaIndexing`, a TorchFunctionMode that runs `Tensor.__getitem__` / `__setitem__` as the aten ops
they stand for (select / slice / unsqueeze views, `aten.index` / `index_put_` for tensor indices).
Fake runs exercise the reference (pure torch) code paths only: Triton, fla, scaled GEMMs, streams and
CUDA graphs cannot run on fake tensors.
Tests: tests/model_shards/test_host_syncs.py.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
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
        forbid: the kinds that raise `HostSyncError` at once (default: all but "h2d" and "named"); an empty
            set records everything and raises nothing (to list what a path does on real tensors).
        named: function name -> value: the host reads the code names as its allowed syncs; a scalar read
            (`bool(t)`, `.item()`, `.tolist()` element) inside such a function is recorded as "named" and,
            on a fake tensor, answers the given value instead of raising (a callable value is called with the
            number of scalars read under that name so far, e.g. to spell out header bytes).
    Attributes:
        events: every recorded event, in order.
    """

    def __init__(self, *, forbid: Iterable[str] = FORBIDDEN, named: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.forbid = frozenset(forbid)
        self.named = dict(named or {})
        self._reads: dict[str, int] = {}
        self.events: list[HostSync] = []

    def of_kind(self, *kinds: str) -> list[HostSync]:
        return [e for e in self.events if e.kind in kinds]

    @property
    def forbidden(self) -> list[HostSync]:
        """Recorded events of the forbidden kinds (non-empty only when `forbid` is empty or was changed)."""
        return self.of_kind(*FORBIDDEN)

    def _record(self, kind: str, func: torch._ops.OpOverload) -> HostSync:
        where = _caller()
        if kind == "sync" and self.named and where.endswith(")") and where.rsplit("(", 1)[1][:-1] in self.named:
            kind = "named"
        event = HostSync(kind, str(func), where)
        self.events.append(event)
        if kind in self.forbid:
            raise HostSyncError(f"host sync under HostSyncRecorder: {event}")
        return event

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401  # aten's signature
        kwargs = kwargs or {}
        for kind in self._classify(func, args, kwargs):
            event = self._record(kind, func)
            if event.kind == "named" and isinstance(args[0], FakeTensor):
                name = event.where.rsplit("(", 1)[1][:-1]
                value = self.named[name]
                if callable(value):  # called with how many scalars this name has read before
                    count = self._reads.get(name, 0)
                    self._reads[name] = count + 1
                    return value(count)
                return value
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


class FakeCudaIndexing(TorchFunctionMode):
    """Python indexing as aten ops, so it works on fake cuda tensors of a CPU-only torch (see above).

    Handles ints, slices, None, Ellipsis, lists and integer/bool tensors: basic indices become views
    (select / slice / unsqueeze), tensor indices one `aten.index` (read) or `index_put_` (write) over the
    remaining dims, which is what Python indexing does for the patterns the model code uses.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401  # torch's signature
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            view, indices = _basic(args[0], args[1])
            return torch.ops.aten.index.Tensor(view, indices) if indices else view
        if func is torch.Tensor.__setitem__:
            view, indices = _basic(args[0], args[1])
            value = args[2]
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value, dtype=view.dtype, device=view.device)
            if indices:
                torch.ops.aten.index_put_(view, indices, value.to(view.dtype))
            else:
                torch.ops.aten.copy_.default(view, value)
            return None
        if func is torch.Tensor.copy_:  # its Python binding also takes a device guard
            return torch.ops.aten.copy_.default(*args, **kwargs)
        if func is torch.Tensor.contiguous:  # and .contiguous() of a strided tensor's
            t = args[0]
            fmt = kwargs.get("memory_format", torch.contiguous_format)
            return t if t.is_contiguous(memory_format=fmt) else torch.ops.aten.clone.default(t, memory_format=fmt)
        if func is torch.nn.functional.pad and kwargs.get("mode", "constant") == "constant":  # so does F.pad's
            return torch.ops.aten.constant_pad_nd.default(args[0], args[1], kwargs.get("value") or 0.0)
        return func(*args, **kwargs)


def _basic(t: torch.Tensor, index: Any) -> tuple[torch.Tensor, list[torch.Tensor | None]]:  # noqa: ANN401  # any Python index
    """Apply the basic part of `index` as views; return the view and the tensor indices per view dim
    (an empty list when there are none)."""
    items = list(index) if isinstance(index, tuple) else [index]
    items = [torch.tensor(i, device=t.device) if isinstance(i, list) else i for i in items]
    consumed = sum(
        i.dim() if isinstance(i, torch.Tensor) and i.dtype == torch.bool else 1
        for i in items
        if i is not None and i is not Ellipsis
    )
    out, dim = t, 0
    tensors: list[torch.Tensor | None] = []
    for i in items:
        if i is None:
            out = out.unsqueeze(dim)
            tensors.append(None)
            dim += 1
        elif i is Ellipsis:
            skip = t.dim() - consumed
            tensors.extend([None] * skip)
            dim += skip
        elif isinstance(i, bool) or not isinstance(i, (int, slice, torch.Tensor)):
            raise TypeError(f"FakeCudaIndexing cannot index with {type(i).__name__}")
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            out = torch.ops.aten.slice.Tensor(out, dim, i.start, i.stop, 1 if i.step is None else i.step)
            tensors.append(None)
            dim += 1
        else:
            tensors.append(i)
            dim += i.dim() if i.dtype == torch.bool else 1
    if all(x is None for x in tensors):
        return out, []
    while tensors and tensors[-1] is None:
        tensors.pop()
    return out, tensors


@contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """FakeTensorMode with `FakeCudaIndexing`: create tensors with device="cuda" inside it."""
    with FakeTensorMode() as mode, FakeCudaIndexing():
        yield mode
