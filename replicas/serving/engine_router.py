"""Request routing to engine replicas that keeps requests off a group that is down.

A failed group (dead or hung rank) fails its requests and rebuilds; meanwhile its replica
reports `available: false` in its routing stats (EngineServer.record_routing_stats) and this
router picks among the others, so the ingress's one retry lands on another group. With no
available replica it falls back to all (the engine then answers 503 quickly).
`finish_choice` calls go to the replica named in their first argument (the engine id the
request's stream items carry), since only that replica runs the request.
Tests: tests/replicas/test_reliability.py.
"""

from __future__ import annotations

import random

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica


class AvailableGroupRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices among replicas whose group is up; `finish_choice` to the replica it names."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.call_method == "finish_choice":
            target = pending_request.args[0] if pending_request.args else None
            named = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if named:
                return [named]
        up = [r for r in candidate_replicas if (r.routing_stats or {}).get("available", True)]
        if not up or len(up) == len(candidate_replicas):
            return await super().choose_replicas(candidate_replicas, pending_request)
        return [random.sample(up, min(2, len(up)))]
