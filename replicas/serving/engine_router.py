"""Request routing to engine replicas that keeps requests off a group that is down.

A failed group (dead or hung rank) fails its requests and rebuilds; meanwhile its replica
reports `available: false` in its routing stats (EngineServer.record_routing_stats) and this
router picks among the others, so the ingress's one retry lands on another group. With no
available replica it falls back to all (the engine then answers 503 quickly).
Tests: tests/replicas/test_reliability.py.
"""

from __future__ import annotations

import random

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica


class AvailableGroupRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices among replicas whose group is up."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        up = [r for r in candidate_replicas if (r.routing_stats or {}).get("available", True)]
        if not up or len(up) == len(candidate_replicas):
            return await super().choose_replicas(candidate_replicas, pending_request)
        return [random.sample(up, min(2, len(up)))]
