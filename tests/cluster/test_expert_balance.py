"""Expert load balancing (cluster/expert_balance.py) against brute force and known answers.

Oracle: every way to hand out the redundant copies and place all copies on the ranks (small cases),
and loads worked out by hand.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

import pytest

from cluster.expert_balance import balance_layer, moved_slots, rebalance, replica_counts
from cluster.placement import ExpertMap


def rank_loads(owners: Sequence[Sequence[int]], load: Sequence[float], ranks: int) -> list[float]:
    """Independent of the module: each copy of expert e receives load[e] / copies (split by token index)."""
    return [sum(load[e] / len(rs) for e, rs in enumerate(owners) if r in rs) for r in range(ranks)]


def _count_vectors(experts: int, extra: int, cap: int) -> Iterator[tuple[int, ...]]:
    for split in itertools.product(range(min(extra, cap - 1) + 1), repeat=experts):
        if sum(split) == extra:
            yield tuple(1 + x for x in split)


def _brute_force(load: Sequence[float], ranks: int, redundant: int) -> float:
    """The least busiest-rank load over every placement with equal slots per rank."""
    slots = (len(load) + redundant) // ranks
    best = float("inf")
    for counts in _count_vectors(len(load), redundant, ranks):
        for owners in itertools.product(*(itertools.combinations(range(ranks), c) for c in counts)):
            used = [0] * ranks
            for rs in owners:
                for r in rs:
                    used[r] += 1
            if all(u == slots for u in used):
                best = min(best, max(rank_loads(owners, load, ranks)))
    return best


def _check_valid(owners: Sequence[Sequence[int]], ranks: int, slots: int) -> None:
    used = [0] * ranks
    for rs in owners:
        assert len(set(rs)) == len(rs), f"an expert twice on one rank: {owners}"
        for r in rs:
            used[r] += 1
    assert used == [slots] * ranks


def test_matches_brute_force_on_small_layers() -> None:
    rng = random.Random(7)
    for _ in range(60):
        ranks = rng.choice([2, 3])
        experts = rng.choice([4, 5, 6])
        redundant = rng.choice([r for r in range(4) if (experts + r) % ranks == 0])
        load = [float(rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 40])) for _ in range(experts)]
        got = balance_layer(load, num_ranks=ranks, redundant=redundant)
        _check_valid(got.owners, ranks, (experts + redundant) // ranks)
        assert max(got.rank_load) == pytest.approx(_brute_force(load, ranks, redundant)), (load, ranks, redundant)


def test_known_answers() -> None:
    # one hot expert takes the redundant copy; its two halves go to different ranks
    assert replica_counts([8, 1, 1, 2], 1, max_copies=2) == [2, 1, 1, 1]
    got = balance_layer([8, 1, 1, 2], num_ranks=2, redundant=2)
    assert max(got.rank_load) == 6.0  # {4, 1, 1} and {4, 2}: 6 and 6
    assert got.imbalance == pytest.approx(1.0)
    idle = balance_layer([0, 0, 0, 0], num_ranks=2)
    assert idle.imbalance == 1.0


def test_rejects_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="do not divide"):
        balance_layer([1, 1, 1], num_ranks=2)
    with pytest.raises(ValueError, match=">= 0"):
        balance_layer([1, -1], num_ranks=2)
    with pytest.raises(ValueError, match="twice"):
        balance_layer([1, 1], num_ranks=2, redundant=4)  # 3 slots per rank, 2 experts


def _zipf_loads(seed: int, experts: int, layers: int) -> list[list[float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(layers):
        order = list(range(experts))
        rng.shuffle(order)
        load = [0.0] * experts
        for i, e in enumerate(order):
            load[e] = 1000.0 / (i + 1) ** 1.1
        out.append(load)
    return out


def test_zipf_skew_is_balanced_and_a_second_pass_moves_nothing() -> None:
    experts, ranks, redundant, layers = 64, 8, 8, 4
    loads = _zipf_loads(3, experts, layers)
    static = ExpertMap.contiguous(num_experts=experts, num_moe_layers=layers, expert_ranks=ranks)
    imbalance = [max(rank_loads(static.owners[i], loads[i], ranks)) * ranks / sum(loads[i]) for i in range(layers)]
    assert min(imbalance) >= 1.5
    new = rebalance(loads, num_ranks=ranks, redundant=redundant, current=static, tolerance=0.05)
    for i in range(layers):
        _check_valid(new.owners[i], ranks, (experts + redundant) // ranks)
        assert max(rank_loads(new.owners[i], loads[i], ranks)) * ranks / sum(loads[i]) <= 1.10
    # relabelling, repairing and swapping copies back home keep most copies where they are (a fresh packing
    # moves ~2/3 of them; the 8 new copies per layer are 11% of the slots)
    assert moved_slots(static, new) <= 0.25 * layers * (experts + redundant)
    again = rebalance(loads, num_ranks=ranks, redundant=redundant, current=new, tolerance=0.05)
    assert moved_slots(new, again) == 0


def test_a_copy_whose_rank_is_fine_stays() -> None:
    # rank 0 holds the two heavy experts; only one of them must move
    current = [(0,), (0,), (1,), (1,)]
    got = balance_layer([5, 5, 1, 1], num_ranks=2, current=current)
    assert max(got.rank_load) == 6.0
    assert sum(len(set(n) - set(o)) for n, o in zip(got.owners, current)) == 2  # one swap


@pytest.mark.parametrize("seed", range(8))
def test_zipf_rebalance_moves_at_most_a_quarter_of_the_slots(seed: int) -> None:
    """From the contiguous map and from a placement balanced for another skew (the traffic changed): max/mean
    within 1.10 of the layer's mean while at most 25% of the slots take new weights."""
    experts, ranks, redundant, layers = 64, 8, 8, 3
    slots = layers * (experts + redundant)
    static = ExpertMap.contiguous(num_experts=experts, num_moe_layers=layers, expert_ranks=ranks)
    first_loads, loads = _zipf_loads(100 + seed, experts, layers), _zipf_loads(200 + seed, experts, layers)
    first = rebalance(first_loads, num_ranks=ranks, redundant=redundant, current=static, tolerance=0.05)
    for current in (static, first):
        new = rebalance(loads, num_ranks=ranks, redundant=redundant, current=current, tolerance=0.05)
        for i in range(layers):
            _check_valid(new.owners[i], ranks, (experts + redundant) // ranks)
            assert max(rank_loads(new.owners[i], loads[i], ranks)) * ranks / sum(loads[i]) <= 1.10
        assert moved_slots(current, new) <= 0.25 * slots, (seed, moved_slots(current, new))


def test_moves_only_what_balance_needs() -> None:
    """Counted by hand: rank 0 holds {9, 1, 0}, rank 1 {1, 1, 0}. The best busiest load is 9 ({9, 0, 0} and
    {1, 1, 1}), reached only by swapping the 1 on rank 0 with the 0 on rank 1: two copies move, no more."""
    current = [(0,), (0,), (1,), (1,), (0,), (1,)]
    load = [9.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    got = balance_layer(load, num_ranks=2, current=current, tolerance=0.0)
    assert max(got.rank_load) == 9.0  # the 9 alone with the zero-load copies; the three 1s together
    assert sum(len(set(n) - set(o)) for n, o in zip(got.owners, current)) == 2  # the 1 on rank 0 swaps a 0
