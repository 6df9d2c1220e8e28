"""A rank's progress, reported outside the collectives, and what its errors say about who failed.

Owns: `RankProgress` (steps begun, collectives entered, whether the rank is inside one now), which every
collective of a group updates (replicas/ep/a2a_protocol.py) and the group's driver reads through a rank
actor's control method while a step runs, so a rank that stopped progressing is named in seconds rather
than at the collective deadline (NCCL peers of a failed rank stay silent until then); `CollectiveError`,
what a collective's own failure becomes, so the driver tells a rank that failed (raised on its own, died,
hung) from ranks that were only waiting for it (collateral); and `Fault`, a test-only hook that makes a
rank raise, run out of memory, exit or hang at a chosen point of its next step.
Tests: tests/replicas/test_failures.py.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

FAULT_KINDS = ("raise", "oom", "exit", "hang")


class CollectiveError(RuntimeError):
    """A collective failed on this rank (a peer died, the group was aborted, the deadline passed): this rank
    was waiting for a peer, so it is collateral of someone else's failure, not the failed one."""


@dataclass(frozen=True)
class Fault:
    """Test-only fault injection: at `point` of the rank's next step, `kind` happens once.

    point: "start" (the step's beginning, before any collective; on a trunk rank, where its own work starts)
        or "collective:N" (on entering the step's N-th collective, N >= 1, while the peers wait in it).
    kind: "raise" (RuntimeError), "oom" (torch.OutOfMemoryError), "exit" (the process ends), "hang" (the
        calling thread sleeps `hang_s`: alive, not progressing).
    """

    point: str
    kind: str
    hang_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.point != "start" and not (self.point.startswith("collective:") and int(self.point[11:]) >= 1):
            raise ValueError(f"fault point must be 'start' or 'collective:N' (N >= 1), got {self.point!r}")

    def fire(self) -> None:
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at {self.point}")
        if self.kind == "oom":
            raise torch.OutOfMemoryError(f"injected out of memory at {self.point}")
        if self.kind == "exit":
            os._exit(17)
        time.sleep(self.hang_s)


class RankProgress:
    """Counters a rank updates as it runs and its actor reports on a separate thread (plain attributes: a
    snapshot is a few reads under the GIL, never a lock the step could hold)."""

    def __init__(self) -> None:
        self.steps = 0  # steps begun
        self.collectives = 0  # collectives entered, over the rank's life
        self.step_collectives = 0  # collectives entered in the step running now
        self.in_collective = False
        self.busy = False  # inside a step call
        self.fault: Fault | None = None
        self._began = 0.0
        self.step_seconds: deque[float] = deque(maxlen=4096)  # the latest steps' durations (control-cost benchmark)

    def begin_step(self) -> None:
        self.steps += 1
        self.step_collectives = 0
        self.busy = True
        self._began = time.perf_counter()

    def end_step(self) -> None:
        self.busy = False
        self.step_seconds.append(time.perf_counter() - self._began)

    def check(self, point: str) -> None:
        """Fire the armed fault if it is for `point` (test-only; one attribute read otherwise)."""
        fault = self.fault
        if fault is not None and fault.point == point:
            self.fault = None
            fault.fire()

    @contextmanager
    def collective(self) -> Iterator[None]:
        """Frame one collective: counted on entry; its own failure becomes a `CollectiveError`."""
        self.collectives += 1
        self.step_collectives += 1
        if self.fault is not None:
            self.check(f"collective:{self.step_collectives}")
        self.in_collective = True
        try:
            yield
        except Exception as exc:
            raise CollectiveError(f"collective {self.step_collectives} of the step failed: {exc}") from exc
        finally:
            self.in_collective = False

    @contextmanager
    def awaiting(self) -> Iterator[None]:
        """Frame the wait for an asynchronous collective already counted by `collective` (ping-pong
        micro-batches): inside a collective for the hang watch, not counted again; a failure is a `CollectiveError`."""
        self.in_collective = True
        try:
            yield
        except Exception as exc:
            raise CollectiveError(f"an asynchronous collective of the step failed: {exc}") from exc
        finally:
            self.in_collective = False

    def snapshot(self) -> tuple[int, int, bool, bool]:
        """(steps, collectives entered in this step, in_collective, busy): what the driver compares between polls
        and across ranks (every rank runs the same collectives of a step, so a rank behind the others is the one
        they wait for, also under NCCL, where a collective returns once enqueued and `in_collective` is brief)."""
        return self.steps, self.step_collectives, self.in_collective, self.busy
