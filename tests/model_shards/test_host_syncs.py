"""The decode layer stack on device "cuda" makes no host sync: layer-level fake-tensor tests.

Each layer runs under `FakeTensorMode` with every tensor created directly on "cuda" (no GPU needed)
and under `tests.device_ops.HostSyncRecorder`, which raises at the first host sync, device-to-host
copy, data-dependent shape or CPU operand. Fake tensors run the pure-torch reference paths only
(no Triton, fla, scaled GEMMs, streams or graphs).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tests.device_ops import HostSyncError, HostSyncRecorder


def test_recorder_flags_each_kind_of_host_sync() -> None:
    """The recorder itself: every kind it promises is caught on fake cuda tensors, with the source line."""
    with FakeTensorMode():
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
