"""How the prefix cache of one engine behaves: the knobs `epserve serve` exposes (README command table).

The cache itself (replicas/engine/prefix_cache.py) keeps, per trunk rank, a radix tree over prompt token ids on
the 64-token grid: KV blocks shared by reference count, and DeltaNet states saved at chosen positions only, in a
checkpoint pool carved out of the rank's cache memory (`CacheSizes.state_checkpoints`).
Tests: tests/replicas/test_prefix_cache.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixCacheConfig:
    """Attributes:
    enabled: False is `--no-prefix-cache`: every prompt prefills from token 0.
    states_per_path: at most this many saved states along one root-to-leaf path (`--prefix-states-per-path`).
    probe_interval: a new path's first prefill saves provisional states every this many tokens (a multiple of
        64), so the first request that branches from it resumes near the branch point; provisional states that
        no branch or hint claims are the first to go (`--prefix-probe-interval`; 0 turns them off).
    """

    enabled: bool = True
    states_per_path: int = 4
    probe_interval: int = 512

    def __post_init__(self) -> None:
        if self.states_per_path < 1:
            raise ValueError("states_per_path must be >= 1")
        if self.probe_interval < 0 or self.probe_interval % 64:
            raise ValueError("probe_interval must be a multiple of 64 (0 turns provisional states off)")
