"""Request routing to engine replicas: prefix affinity, load as tie-breaker, a cap on imbalance, failed groups avoided.

Each engine replica (one EP group) keeps a prefix cache of its own (replicas/engine/prefix_cache.py), so a
request is worth most on the replica that recently prefilled its prefix. Per router (one per ingress replica)
a bounded LRU map remembers which replicas got which 64-token prompt blocks, keyed by a chained hash (the
request's cache_salt first, then each block with the hash before it, so a key names a whole prefix). A request
goes to the replica with the longest remembered prefix; load (Serve's queue length of the replica, else the
running + waiting count of its routing stats) breaks ties, and with no match the least loaded replica gets it.
The imbalance cap is the balance measure itself: max / mean of the replicas' loads after the dispatch stays <=
`imbalance_factor` (1.5), i.e. the home takes the request only while its load with it is <= max(factor x the mean
after, `imbalance_slack`); the slack (2 requests) lets tiny totals (2 vs 0) through. Otherwise the least loaded of
the others gets it at once: affinity must not pile hot prefixes onto one group. Such a diverted request is not
recorded, so a prefix keeps one home. Why divert at once rather than hold the request for its home: under a
closed loop (clients waiting for their replies) a held request is at no replica, so while it waits the replicas
show the home's surplus alone; holds made both balance and landing worse in the 2-replica benchmark
(benchmarks/RESULTS-prefix.md), and no widely used router holds (SGLang's cache-aware policy diverts too).

A failed group (dead or hung rank) fails its requests and rebuilds; meanwhile its replica reports
`available: false` in its routing stats (EngineServer.record_routing_stats) and this router picks among the
others, so the ingress's one retry lands on another group. With no available replica it falls back to all
(the engine then answers 503 quickly). `finish_choice` calls go to the replica named in their first argument
(the engine id the request's stream items carry), since only that replica runs the request.

No FIFO mixin: Serve's FIFO routing hands a chosen replica to whichever request is first in its queue, which
would undo both the prefix choice and the `finish_choice` target; here a choice fulfils its own request.
Tests: tests/replicas/test_engine_router.py, tests/replicas/test_reliability.py.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, TypeVar

from ray.serve._private.replica_result import ReplicaResult
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from replicas.engine.engine_types import GenerateRequest

BLOCK_TOKENS = 64  # the prefix cache's grid: only whole 64-token blocks are ever reused
MAX_BLOCKS = 200_000  # entries of the map (a few tens of MB at most), least recently routed dropped first
PENDING_REQUESTS = 4096  # requests between their first choice and being routed, at most
UNSENT_S = 2.0  # a choice not followed by its send within this long no longer counts as load (sent elsewhere)
K = TypeVar("K", bound=Hashable)  # a replica's id
IMBALANCE_FACTOR = 1.5
IMBALANCE_SLACK = 2.0  # requests: a home may reach this many whatever the others carry (2 vs 0 is no imbalance)


def prefix_hashes(key: Sequence[int], salt: str | None, block: int = BLOCK_TOKENS) -> list[int]:
    """Chained hashes of `key`'s whole blocks: entry i names the prefix key[: (i + 1) * block] within `salt`.

    The last block is left out when it ends exactly at the prompt's end: the engine recomputes at least the last
    prompt token, so that block is never a hit. Hashes live in one process only (Python's str hash is seeded)."""
    h = hash(("epserve-prefix", salt or ""))
    out: list[int] = []
    for end in range(block, len(key), block):
        h = hash((h, tuple(key[end - block : end])))
        out.append(h)
    return out


class PrefixMap:
    """Which replicas recently got which prefix blocks (approximate: the engines evict on their own)."""

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self._owners: OrderedDict[int, set[Hashable]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def match(self, hashes: Sequence[int], replicas: Sequence[K]) -> dict[K, int]:
        """For each of `replicas`, how many leading blocks of `hashes` it holds."""
        out = dict.fromkeys(replicas, 0)
        alive: set[Hashable] = set(replicas)
        for i, h in enumerate(hashes):
            alive &= self._owners.get(h, set())
            if not alive:
                break
            for r in alive:
                out[r] = i + 1  # type: ignore[index]  # alive holds only keys of `replicas`
        return out

    def record(self, hashes: Sequence[int], replica: Hashable) -> None:
        """`replica` now holds every block of `hashes` (they become the most recent)."""
        for h in hashes:
            owners = self._owners.get(h)
            if owners is None:
                self._owners[h] = {replica}
            else:
                owners.add(replica)
                self._owners.move_to_end(h)
        while len(self._owners) > self.max_blocks:
            self._owners.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """A replica is gone: its blocks are no one's (a new replica with the same id starts empty)."""
        for h in [h for h, owners in self._owners.items() if replica in owners]:
            owners = self._owners[h]
            owners.discard(replica)
            if not owners:
                del self._owners[h]


def fits_cap(
    load: dict[K, float],
    target: K,
    *,
    imbalance_factor: float = IMBALANCE_FACTOR,
    imbalance_slack: float = IMBALANCE_SLACK,
) -> bool:
    """Whether `target` may take one more request: its load after <= max(factor x the mean load after, slack).
    When the target is then the most loaded, that is max / mean after <= factor, the figure the benchmark samples;
    a target below the max never worsens the imbalance."""
    after = load.get(target, 0.0) + 1
    mean_after = (sum(load.values()) + 1) / max(1, len(load))
    return after <= max(imbalance_factor * mean_after, imbalance_slack)


def rank_replicas(
    matched: dict[K, int],
    load: dict[K, float],
    *,
    imbalance_factor: float = IMBALANCE_FACTOR,
    imbalance_slack: float = IMBALANCE_SLACK,
    rng: random.Random | None = None,
) -> tuple[list[K], K | None]:
    """Replicas best first: longest matched prefix, then least load (random among equals). The best goes to the
    back when it does not fit the cap with this request (`fits_cap`; the least loaded other is first then).
    Also returns the prefix's home: the best by affinity when it matched any block (None otherwise), which the
    caller compares with where the request went."""
    rng = rng or random.Random()
    ids = list(matched)
    rng.shuffle(ids)  # equal replicas: no fixed favourite
    ids.sort(key=lambda r: (-matched[r], load.get(r, 0.0)))
    home = ids[0] if ids and matched[ids[0]] > 0 else None
    if len(ids) > 1:
        loads = {r: load.get(r, 0.0) for r in ids}
        if not fits_cap(loads, ids[0], imbalance_factor=imbalance_factor, imbalance_slack=imbalance_slack):
            rest = sorted(ids[1:], key=lambda r: loads[r])
            return [*rest, ids[0]], home
    return ids, home


def request_key(req: GenerateRequest) -> tuple[int, ...] | None:
    """The prompt as the engine's prefix cache keys it (image pads by content), None when it is not cached."""
    if req.mm is not None:
        key = req.mm.cache_key(req.prompt_ids)
        return None if key is None else tuple(key)
    return tuple(req.prompt_ids)


class AvailableGroupRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Prefix affinity among replicas whose group is up; `finish_choice` to the replica it names."""

    def initialize_state(
        self,
        imbalance_factor: float = IMBALANCE_FACTOR,
        imbalance_slack: float = IMBALANCE_SLACK,
        max_blocks: int = MAX_BLOCKS,
        **_: Any,  # noqa: ANN401  # Serve passes request_router_kwargs through
    ) -> None:
        self.imbalance_factor = imbalance_factor
        self.imbalance_slack = imbalance_slack
        self.prefixes = PrefixMap(max_blocks)
        # internal request id -> its block hashes and its prefix's home, from the first choice until routed
        # (bounded: a request cancelled while queued is never routed)
        self._pending: OrderedDict[str, tuple[list[int], Hashable | None]] = OrderedDict()
        # internal request id -> (replica ranked first, when): chosen but not sent yet. Serve counts a request in the
        # replica's queue length only once sent, and requests arriving together are chosen before any is sent: they
        # would all see the same loads and pile onto one replica.
        self._unsent: OrderedDict[str, tuple[ReplicaID, float]] = OrderedDict()

    def _load(self, r: RunningReplica, now: float) -> float:
        unsent = sum(1 for rid, t in self._unsent.values() if rid == r.replica_id and now - t < UNSENT_S)
        queued = self._replica_queue_len_cache.get(r.replica_id)  # ongoing requests as Serve counts them
        if queued is not None:
            return float(queued) + unsent
        stats = r.routing_stats or {}
        return float(stats.get("running", 0)) + float(stats.get("waiting", 0)) + unsent

    def _request_hashes(self, pending_request: PendingRequest) -> list[int]:
        seen = self._pending.get(pending_request.metadata.internal_request_id)
        if seen is not None:
            return seen[0]
        req = pending_request.args[0] if pending_request.args else None
        if not isinstance(req, GenerateRequest):
            return []
        key = request_key(req)
        return [] if key is None else prefix_hashes(key, req.cache_salt)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.call_method == "finish_choice":
            target = pending_request.args[0] if pending_request.args else None
            named = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if named:
                return [named]
        up = [r for r in candidate_replicas if (r.routing_stats or {}).get("available", True)] or candidate_replicas
        if pending_request is None or pending_request.metadata.call_method != "generate":
            return [random.sample(up, min(2, len(up)))]  # admin calls: power of two choices
        by_id = {r.replica_id: r for r in up}
        hashes = self._request_hashes(pending_request)
        matched = self.prefixes.match(hashes, list(by_id))
        now = time.monotonic()
        rid_ = pending_request.metadata.internal_request_id
        self._unsent.pop(rid_, None)  # chosen again (backoff): its earlier choice no longer counts
        load = {rid: self._load(r, now) for rid, r in by_id.items()}
        ranked, home = rank_replicas(
            matched, load, imbalance_factor=self.imbalance_factor, imbalance_slack=self.imbalance_slack
        )
        self._pending[rid_] = (hashes, home)
        self._unsent[rid_] = (ranked[0], now)
        for d in (self._pending, self._unsent):
            while len(d) > PENDING_REQUESTS:
                d.popitem(last=False)
        if hashes and home in (None, ranked[0]):
            # recorded now, not only when routed: the next request of this prefix may be chosen before this one is
            # sent (Serve reports a routed request only where replicas may reject it)
            self.prefixes.record(hashes, ranked[0])
        return [[by_id[rid]] for rid in ranked]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)  # Serve's queue length now counts it: the oldest unsent choice goes
        for key, (rid, _) in self._unsent.items():
            if rid == replica_id:
                del self._unsent[key]
                break

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        hashes, home = self._pending.pop(pending_request.metadata.internal_request_id, ([], None))
        # A request sent off its prefix's home (the imbalance cap, a full queue) is not recorded: the prefix keeps one
        # home instead of spreading over every replica the cap ever picked (each would then hold a copy).
        if hashes and home in (None, replica_id):
            self.prefixes.record(hashes, replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = self._replica_id_set - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for rid in gone:
            self.prefixes.forget(rid)
