"""Which torch device a rank runs on: the `--device` choice (auto | cpu | cuda[:N]) resolved once.

A rank owns one device (replicas/ep/local_runner.py, replicas/ep/trunk_rank.py, replicas/ep/expert_rank.py):
its weights, caches, step batches, rope and index tables are made there, and tensors cross to the host only at
the transfer points its step names. Ray ranks take cuda where Ray gave the actor a GPU (replicas/ep/actors.py).
Tests: tests/replicas/test_device_path.py.
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """`auto`: cuda:0 where torch sees a GPU, else cpu; `cpu`; `cuda` / `cuda:N` (checked to exist).

    Raises:
        ValueError: an unknown name, or a cuda device this process does not have (the message names it).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise ValueError(f"--device {spec!r} is not one of {DEVICE_CHOICES}")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ValueError(f"--device {spec}: this machine has {count} CUDA device(s) visible to torch")
    return torch.device("cuda", index)
