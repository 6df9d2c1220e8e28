"""Expert load balancing: from measured tokens per expert to a placement with redundant copies.

A pure function per MoE layer (DeepSeek's EPLB is the reference): give the R redundant slots to the
experts with the highest load per copy (replicate), then pack the E + R copies onto X expert ranks of
S = (E + R) / X slots each so the busiest rank carries the least (longest-processing-time first), and
improve the result by moving or swapping copies off the busiest rank. A copy of expert e carries
load[e] / copies[e]: the dispatch spreads an expert's tokens over its copies by token index
(cluster/placement.py's route table). Two copies of one expert never share a rank (no gain).

Moving weights costs time while serving, so `rebalance` keeps an expert's copy where it already is
whenever the resulting busiest-rank load stays within `tolerance` of the unconstrained packing's.
Must not: know Ray, weights or the step loop. Tests: tests/cluster/test_expert_balance.py.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cluster.placement import ExpertMap


@dataclass(frozen=True)
class LayerPlacement:
    """One MoE layer: owners[e] = expert ranks holding a copy of expert e, and each rank's load."""

    owners: tuple[tuple[int, ...], ...]
    rank_load: tuple[float, ...]

    @property
    def imbalance(self) -> float:
        """max / mean rank load (1.0 = balanced; 1.0 for an idle layer)."""
        mean = sum(self.rank_load) / len(self.rank_load)
        return max(self.rank_load) / mean if mean > 0 else 1.0


def replica_counts(load: Sequence[float], redundant: int, max_copies: int) -> list[int]:
    """Copies per expert: each redundant slot goes to the expert whose load per copy is highest now, at most
    `max_copies` each (ties to the lower expert id, so the answer is deterministic)."""
    counts = [1] * len(load)
    heap = [(-float(w), e) for e, w in enumerate(load)]
    heapq.heapify(heap)
    for _ in range(redundant):
        if not heap:
            raise ValueError(f"{redundant} redundant copies exceed {max_copies} copies per expert")
        _, e = heapq.heappop(heap)
        counts[e] += 1
        if counts[e] < max_copies:
            heapq.heappush(heap, (-float(load[e]) / counts[e], e))
    return counts


def rank_loads(owners: Sequence[Sequence[int]], load: Sequence[float], num_ranks: int) -> list[float]:
    """Tokens each rank receives under `owners` (an expert's tokens split evenly over its copies)."""
    out = [0.0] * num_ranks
    for e, ranks in enumerate(owners):
        for r in ranks:
            out[r] += float(load[e]) / len(ranks)
    return out


def balance_layer(
    load: Sequence[float],
    *,
    num_ranks: int,
    redundant: int = 0,
    current: Sequence[Sequence[int]] | None = None,
    tolerance: float = 0.02,
) -> LayerPlacement:
    """Place one layer's experts (and `redundant` extra copies) on `num_ranks` ranks of equal slot count.

    Args:
        load: tokens per expert (any non-negative weights, e.g. a moving average).
        redundant: extra copies R; (E + R) must divide evenly over the ranks.
        current: today's owners per expert; copies stay on their rank when that costs at most `tolerance`
            (relative) in the busiest rank's load, so a rebalance moves few weights.
    Raises:
        ValueError: slots do not divide evenly, negative load, or a rank would need two copies of one expert.
    """
    num_experts = len(load)
    slots_total = num_experts + redundant
    if num_ranks < 1 or slots_total % num_ranks:
        raise ValueError(f"{num_experts} experts + {redundant} redundant copies do not divide over {num_ranks} ranks")
    if any(w < 0 for w in load):
        raise ValueError("expert loads must be >= 0")
    slots = slots_total // num_ranks
    if slots > num_experts:
        raise ValueError(f"{slots} slots per rank but only {num_experts} experts: a rank would hold one twice")
    counts = _search_counts(load, replica_counts(load, redundant, max_copies=num_ranks), num_ranks, slots)
    free = _pack(load, counts, num_ranks, slots)
    _improve(free, load, num_ranks)
    free_max = max(rank_loads(free, load, num_ranks))
    best = free
    if current is not None:
        target = free_max * (1 + tolerance)
        best = _relabel(free, current, num_ranks)  # ranks are interchangeable: keep what lines up
        _restore(best, load, current, num_ranks, target=max(target, max(rank_loads(best, load, num_ranks))))
        sticky = _repair(load, counts, current, num_ranks, slots, target=target)
        if sticky is not None:
            _restore(sticky, load, current, num_ranks, target=target)
            if _moves(sticky, current) < _moves(best, current):
                best = sticky
    owners = tuple(tuple(sorted(best[e])) for e in range(num_experts))
    return LayerPlacement(owners=owners, rank_load=tuple(rank_loads(owners, load, num_ranks)))


def rebalance(
    loads: Sequence[Sequence[float]],
    *,
    num_ranks: int,
    redundant: int = 0,
    current: ExpertMap | None = None,
    tolerance: float = 0.02,
) -> ExpertMap:
    """`balance_layer` for every MoE layer: the new map (loads[layer][expert])."""
    layers = [
        balance_layer(
            layer_load,
            num_ranks=num_ranks,
            redundant=redundant,
            current=current.owners[i] if current is not None else None,
            tolerance=tolerance,
        ).owners
        for i, layer_load in enumerate(loads)
    ]
    return ExpertMap(owners=tuple(layers), num_expert_ranks=num_ranks)


def moved_slots(old: ExpertMap, new: ExpertMap) -> int:
    """Copies the new map places on a rank that did not hold that expert (weights to load)."""
    moved = 0
    for old_layer, new_layer in zip(old.owners, new.owners):
        for before, after in zip(old_layer, new_layer):
            moved += len(set(after) - set(before))
    return moved


# ----------------------------------------------------------------------------- packing
SEARCH_WIDTH = 8  # experts tried on each side of a copy move
SEARCH_ROUNDS = 16  # copy moves tried at most on a large layer (each round packs SEARCH_WIDTH^2 candidates)
EXACT_EVAL_COPIES = 64  # up to this many copies, candidates are judged after local search, not LPT alone
EXHAUSTIVE_LIMIT = 2000  # count vectors below which every one is tried
GOOD_ENOUGH = 1e-3  # a large layer's search stops within this of a perfect split


def _search_counts(load: Sequence[float], counts: list[int], num_ranks: int, slots: int) -> list[int]:
    """Copies per expert that pack best. Greedy replication alone ignores how copies pack (e.g. a third copy
    that leaves one rank with two heavy halves): small layers try every way to hand out the redundant copies;
    large ones hill-climb, moving one copy from a lightly loaded replicated expert to a heavy one."""
    redundant = sum(counts) - len(counts)
    exact = sum(counts) <= EXACT_EVAL_COPIES

    def cost(c: list[int]) -> float:
        owners = _pack(load, c, num_ranks, slots)
        if exact:
            _improve(owners, load, num_ranks)
        return max(rank_loads(owners, load, num_ranks))

    best = cost(counts)
    if math.comb(len(load) + redundant - 1, redundant) <= EXHAUSTIVE_LIMIT:
        for extra in _extra_copies(len(load), redundant, num_ranks - 1):
            c = [1 + x for x in extra]
            value = cost(c)
            if value < best - 1e-12:
                best, counts = value, c
        return counts
    good_enough = sum(float(w) for w in load) / num_ranks * (1 + GOOD_ENOUGH)
    for _ in range(min(4 * redundant, SEARCH_ROUNDS)):
        if best <= good_enough:
            break
        per_copy = [float(load[e]) / counts[e] for e in range(len(load))]
        donors = sorted((e for e in range(len(load)) if counts[e] > 1), key=lambda e: per_copy[e])[:SEARCH_WIDTH]
        takers = sorted((e for e in range(len(load)) if counts[e] < num_ranks), key=lambda e: -per_copy[e])
        found: tuple[float, int, int] | None = None
        for a in donors:
            for b in takers[:SEARCH_WIDTH]:
                if a == b:
                    continue
                counts[a] -= 1
                counts[b] += 1
                value = cost(counts)
                counts[a] += 1
                counts[b] -= 1
                if value < best - 1e-12 and (found is None or value < found[0]):
                    found = (value, a, b)
        if found is None:
            break
        best, a, b = found
        counts[a] -= 1
        counts[b] += 1
    return counts


def _extra_copies(experts: int, total: int, cap: int) -> Iterator[tuple[int, ...]]:
    """Every way to give `total` extra copies to `experts` experts, at most `cap` each."""
    if experts == 1:
        if total <= cap:
            yield (total,)
        return
    for first in range(min(total, cap), -1, -1):
        for rest in _extra_copies(experts - 1, total - first, cap):
            yield (first, *rest)


def _pack(load: Sequence[float], counts: list[int], num_ranks: int, slots: int) -> list[list[int]]:
    """Copies heaviest first onto the least-loaded rank with a free slot that lacks the expert."""
    owners: list[list[int]] = [[] for _ in load]
    used = [0] * num_ranks
    total = [0.0] * num_ranks
    copies = sorted(
        ((float(load[e]) / counts[e], e) for e in range(len(load)) for _ in range(counts[e])),
        key=lambda c: (-c[0], c[1]),
    )
    for w, e in copies:
        choices = [r for r in range(num_ranks) if used[r] < slots and r not in owners[e]]
        if not choices:  # heaviest-first painted itself into a corner: a placement that always fits
            return _pack_most_copies_first(load, counts, num_ranks, slots)
        r = min(choices, key=lambda r: (total[r], r))
        owners[e].append(r)
        used[r] += 1
        total[r] += w
    return owners


def _repair(
    load: Sequence[float],
    counts: list[int],
    current: Sequence[Sequence[int]],
    num_ranks: int,
    slots: int,
    *,
    target: float,
) -> list[list[int]] | None:
    """Fewest moves: start from today's placement (an expert keeps up to counts[e] of its ranks; a rank over
    its slots drops its lightest copies), place the missing copies on the lightest ranks, then swap copies off
    the busiest rank until it is within `target`. None when that does not get there."""
    weight = [float(load[e]) / counts[e] for e in range(len(load))]
    owners: list[list[int]] = [[r for r in current[e] if 0 <= r < num_ranks][: counts[e]] for e in range(len(load))]
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    for e, ranks in enumerate(owners):
        for r in ranks:
            held[r].append(e)
    for r in range(num_ranks):
        for e in sorted(held[r], key=lambda e: weight[e])[: max(0, len(held[r]) - slots)]:
            owners[e].remove(r)
    used = [0] * num_ranks
    for ranks in owners:
        for r in ranks:
            used[r] += 1
    total = rank_loads(owners, [weight[e] * len(owners[e]) for e in range(len(load))], num_ranks)
    missing = sorted((e for e in range(len(load)) for _ in range(counts[e] - len(owners[e]))), key=lambda e: -weight[e])
    for e in missing:
        choices = [r for r in range(num_ranks) if used[r] < slots and r not in owners[e]]
        if not choices:
            return None
        r = min(choices, key=lambda r: (total[r], r))
        owners[e].append(r)
        used[r] += 1
        total[r] += weight[e]
    home = {(e, r) for e in range(len(load)) for r in current[e]}
    for _ in range(2 * len(load)):
        top = max(range(num_ranks), key=lambda r: (total[r], -r))
        excess = total[top] - target
        if excess <= 0:
            return owners
        # the swap that takes the most of the excess off the busiest rank per copy moved off its home rank,
        # without pushing the other rank over the target
        best: tuple[float, float, int, int, int] | None = None
        for a in [e for e in range(len(load)) if top in owners[e]]:
            for other in range(num_ranks):
                if other == top or other in owners[a]:
                    continue
                for b in [e for e in range(len(load)) if other in owners[e] and top not in owners[e]]:
                    d = weight[a] - weight[b]
                    if d <= 0 or total[other] + d > target:
                        continue
                    moves = ((a, top) in home) + ((b, other) in home)
                    key = (-min(d, excess) / max(moves, 0.5), d)
                    if best is None or key < (best[0], best[1]):
                        best = (key[0], key[1], a, other, b)
        if best is None:
            break
        _, d, a, other, b = best
        owners[a][owners[a].index(top)] = other
        owners[b][owners[b].index(other)] = top
        total[top] -= d
        total[other] += d
    return owners if max(rank_loads(owners, load, num_ranks)) <= target + 1e-9 else None


def _restore(
    owners: list[list[int]], load: Sequence[float], current: Sequence[Sequence[int]], num_ranks: int, *, target: float
) -> None:
    """Fewer moves at no cost in balance: swap a moved copy back to a rank that held its expert with another
    moved copy there, while both ranks stay within `target` (each swap saves one or two weight loads)."""
    weight = [float(load[e]) / len(owners[e]) for e in range(len(owners))]
    total = rank_loads(owners, load, num_ranks)
    home = [set(r for r in current[e] if 0 <= r < num_ranks) for e in range(len(owners))]
    for _ in range(4 * len(owners)):
        on = [[e for e in range(len(owners)) if r in owners[e]] for r in range(num_ranks)]
        found: tuple[int, int, int, int, int] | None = None  # (-saved, a, from rank, b, to rank)
        for a in range(len(owners)):
            for p in owners[a]:
                if p in home[a]:
                    continue
                for h in home[a]:
                    if h in owners[a]:
                        continue
                    for b in on[h]:
                        if h in home[b] or p in owners[b]:
                            continue
                        d = weight[a] - weight[b]
                        if total[p] - d > target + 1e-9 or total[h] + d > target + 1e-9:
                            continue
                        saved = 1 + (p in home[b])
                        if found is None or -saved < found[0]:
                            found = (-saved, a, p, b, h)
        if found is None:
            return
        _, a, p, b, h = found
        owners[a][owners[a].index(p)] = h
        owners[b][owners[b].index(h)] = p
        d = weight[a] - weight[b]
        total[p] -= d
        total[h] += d


def _moves(owners: Sequence[Sequence[int]], current: Sequence[Sequence[int]]) -> int:
    return sum(len(set(new) - set(old)) for new, old in zip(owners, current))


def _relabel(owners: list[list[int]], current: Sequence[Sequence[int]], num_ranks: int) -> list[list[int]]:
    """The same packing with its ranks renamed so the most copies land where their expert already is
    (greedy on the overlap of each packed rank with each current rank)."""
    overlap: dict[tuple[int, int], int] = {}
    for e, ranks in enumerate(owners):
        for r in ranks:
            for old in current[e]:
                if 0 <= old < num_ranks:
                    overlap[(r, old)] = overlap.get((r, old), 0) + 1
    rename: dict[int, int] = {}
    taken: set[int] = set()
    for (r, old), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if r not in rename and old not in taken:
            rename[r] = old
            taken.add(old)
    spare = iter(sorted(set(range(num_ranks)) - taken))
    for r in range(num_ranks):
        if r not in rename:
            rename[r] = next(spare)
    return [[rename[r] for r in ranks] for ranks in owners]


def _pack_most_copies_first(load: Sequence[float], counts: list[int], num_ranks: int, slots: int) -> list[list[int]]:
    """Experts with the most copies first, each onto the ranks with the most free slots: always finds a
    placement when one exists (counts <= ranks, slots filled exactly); _improve then evens the load."""
    owners: list[list[int]] = [[] for _ in load]
    free = [slots] * num_ranks
    for e in sorted(range(len(load)), key=lambda e: (-counts[e], -float(load[e]), e)):
        ranks = sorted(range(num_ranks), key=lambda r: (-free[r], r))[: counts[e]]
        if any(free[r] == 0 for r in ranks):
            raise ValueError(f"copies {counts} do not fit {num_ranks} ranks of {slots} slots")
        for r in ranks:
            owners[e].append(r)
            free[r] -= 1
    return owners


def _improve(
    owners: list[list[int]], load: Sequence[float], num_ranks: int, *, rounds: int = 64, stop_at: float = 0.0
) -> None:
    """Local search: swap a copy on the busiest rank with a lighter copy elsewhere while that lowers the
    busiest rank's load without creating a new maximum (slot counts stay equal)."""
    weight = [float(load[e]) / len(owners[e]) for e in range(len(owners))]
    for _ in range(rounds):
        total = rank_loads(owners, load, num_ranks)
        top = max(range(num_ranks), key=lambda r: (total[r], -r))
        if total[top] <= stop_at:
            return
        best: tuple[float, int, int, int] | None = None  # (new max of the pair, e on top, other rank, e there)
        on_top = [e for e in range(len(owners)) if top in owners[e]]
        for other in range(num_ranks):
            if other == top:
                continue
            on_other = [e for e in range(len(owners)) if other in owners[e]]
            for a in on_top:
                if other in owners[a]:
                    continue
                for b in on_other:
                    if top in owners[b] or weight[b] >= weight[a]:
                        continue
                    delta = weight[a] - weight[b]
                    pair_max = max(total[top] - delta, total[other] + delta)
                    if pair_max < total[top] - 1e-12 and (best is None or pair_max < best[0]):
                        best = (pair_max, a, other, b)
        if best is None:
            return
        _, a, other, b = best
        owners[a][owners[a].index(top)] = other
        owners[b][owners[b].index(other)] = top
