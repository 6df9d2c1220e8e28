"""When a benchmark sends: the arrival process, as `vllm bench serve` draws it.

Inter-arrival times are gamma distributed with shape = burstiness and mean = 1/rate
(burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular; the coefficient of variation
of the gaps is 1/sqrt(burstiness)). An infinite rate sends everything at t = 0. The first
request goes at t = 0. Fixed concurrency (`--max-concurrency`) is applied by the runner on top
of these times. Must not: sleep or send. Tests: tests/loadtest/test_bench.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

BLOCK = 1024  # gaps drawn per numpy call


def check_rate(rate: float, burstiness: float) -> None:
    """Raises ValueError on a non-positive rate or burstiness."""
    if not rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")


def arrival_times(rate: float, burstiness: float = 1.0, *, seed: int = 0) -> Iterator[float]:
    """Send times in seconds from the start: 0, then cumulative gamma gaps (endless).

    Args:
        rate: mean requests per second; math.inf sends every request at 0.
        burstiness: gamma shape of the gaps.
        seed: fixes the times.
    """
    check_rate(rate, burstiness)
    if math.isinf(rate):
        while True:
            yield 0.0
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    t = 0.0
    while True:
        for gap in rng.gamma(shape=burstiness, scale=theta, size=BLOCK):
            yield t
            t += float(gap)


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, *, seed: int = 0) -> np.ndarray:
    """The first `n` send times of `arrival_times` as an array (float64, seconds)."""
    it = arrival_times(rate, burstiness, seed=seed)
    return np.fromiter((next(it) for _ in range(n)), dtype=np.float64, count=n)
