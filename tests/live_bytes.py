"""Peak bytes of tensors alive at once while some code runs, counted at the aten-op level.

`LiveBytes` is a TorchDispatchMode: every op's output storages are recorded (once per storage) with a
weak reference, and after each op the bytes of the storages still alive are summed; `peak` is the
largest such sum. Outputs that alias an input's storage (views) count nothing. Tensors created
before the mode is entered (weights, inputs) are not counted, so `peak` is the extra memory the
code needed, its output included. It sees what aten ops return, not scratch a kernel allocates
inside itself. Used by tests/model_shards/test_fp8_experts.py and
benchmarks/bench_fp8_experts.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage cdata -> (weak ref, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401  # aten's signature
        out = func(*args, **(kwargs or {}))
        # A view of an input (e.g. one expert of the stacked weights) allocates nothing.
        inputs = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._live and ref.cdata not in inputs:
                    self._live[ref.cdata] = (ref, storage.nbytes())
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self._live.values()))
        return out
