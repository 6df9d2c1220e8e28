"""When an engine replica rebalances its experts by itself: every N steps, or when the measured imbalance
(max / mean rows per expert rank, the worst MoE layer, over the load window) exceeds a threshold.

`RebalanceTrigger` is pure bookkeeping on the engine's step count (no clock): `auto_rebalance`, the task the
engine deployment runs beside its engine, asks `wants_check` each poll, measures the imbalance only when
asked to, and tells `decide` the answer. A threshold rebalance
waits `cooldown_steps` after the last one, so a skew no placement can fix does not rebalance every check.
Tests: tests/replicas/test_rebalance_trigger.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicas.engine.engine import Engine
    from replicas.ep.group import ExpertParallelGroup
    from replicas.serving.metrics import MetricsRegistry

log = logging.getLogger("ray.serve.epserve.engine")

THRESHOLD_CHECK_STEPS = 32  # the imbalance is measured (one call per rank) at most once per this many steps
POLL_S = 0.2  # how often `auto_rebalance` looks at the engine's step count


class RebalanceTrigger:
    """Args:
    interval_steps: rebalance every this many engine steps (None: never by count).
    threshold: rebalance when the window's max/mean exceeds this (None: never by imbalance).
    cooldown_steps: least steps between a rebalance and a threshold-triggered one.
    """

    def __init__(
        self,
        *,
        interval_steps: int | None,
        threshold: float | None,
        cooldown_steps: int = 256,
        check_steps: int = THRESHOLD_CHECK_STEPS,
    ) -> None:
        if interval_steps is not None and interval_steps < 1:
            raise ValueError(f"rebalance interval must be >= 1 step, got {interval_steps}")
        if threshold is not None and threshold <= 1.0:
            raise ValueError(f"imbalance threshold must be > 1.0 (max/mean), got {threshold}")
        self.interval_steps, self.threshold = interval_steps, threshold
        self.cooldown_steps, self.check_steps = cooldown_steps, check_steps
        self._last = 0  # engine step of the last rebalance (or the start)
        self._checked = 0

    @property
    def enabled(self) -> bool:
        return self.interval_steps is not None or self.threshold is not None

    def wants_check(self, steps: int) -> bool:
        """Whether `decide` needs the imbalance now (a threshold is set, past the cooldown, a check is due)."""
        return (
            self.threshold is not None
            and steps - self._last >= self.cooldown_steps
            and steps - self._checked >= self.check_steps
        )

    def decide(self, steps: int, imbalance: float | None = None) -> str | None:
        """The reason to rebalance now, or None. `imbalance`: the measured max/mean when `wants_check` said so."""
        if self.interval_steps is not None and steps - self._last >= self.interval_steps:
            return f"every {self.interval_steps} steps"
        if imbalance is not None:
            self._checked = steps
            if self.threshold is not None and imbalance > self.threshold and steps - self._last >= self.cooldown_steps:
                return f"max/mean {imbalance:.3f} > {self.threshold}"
        return None

    def fired(self, steps: int) -> None:
        """A rebalance ran (or failed) at `steps`: the interval and the cooldown count from here."""
        self._last = self._checked = steps


async def auto_rebalance(
    trigger: RebalanceTrigger,
    engine: Engine,
    group: ExpertParallelGroup,
    *,
    redundant: int,
    metrics: MetricsRegistry | None = None,
    poll_s: float = POLL_S,
    reports: list[dict] | None = None,
) -> None:
    """Run forever beside the engine loop: rebalance `group` (with `redundant` copies) when `trigger` says so.
    The weights move in pieces between the engine's steps, so serving never waits for a whole move; a failed
    rebalance leaves the old map serving and the next trigger tries again. `reports` collects each report."""
    while True:
        await asyncio.sleep(poll_s)
        steps = engine.steps
        if engine.failure is not None or group.rebalancing:
            continue
        try:
            imbalance = None
            if trigger.wants_check(steps):
                await asyncio.to_thread(group.expert_load)
                imbalance = group.window_imbalance()
            reason = trigger.decide(steps, imbalance)
            if reason is None:
                continue
            trigger.fired(steps)
            report = await group.rebalance(redundant)
            report["open_streams"] = engine.stats()["streams"]
            if reports is not None:
                reports.append(report)
            if metrics is not None:
                metrics.inc("expert_rebalances", result="ok")
            log.info(
                "expert rebalance v%d (%s): max/mean %.3f -> %.3f, %d slots moved in %d pieces (%d from peers)",
                report["version"],
                reason,
                report["max_imbalance_before"],
                report["max_imbalance_after"],
                report["moved_slots"],
                report["pieces"],
                report["from_peer"],
            )
        except (RuntimeError, ValueError) as e:  # the old map keeps serving
            trigger.fired(steps)
            if metrics is not None:
                metrics.inc("expert_rebalances", result="failed")
            log.warning("automatic expert rebalance failed: %s", e)
