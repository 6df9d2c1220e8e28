"""How often can a router meet both routing targets of bench_prefix_cache section 3? A discrete-event simulation.

The workload of section 3: G prefix groups of N requests, their group-firsts first (each group's home is where its
first request ran: G/2 homes per replica), then the other G x (N - 1) in random order from a closed loop of C
clients (a client sends its next request when its reply ends). The router is replicas/serving/engine_router.py's
rule: the home takes a request while its load after <= max(1.5 x the mean after, 2), else the other replica does (a
divert). A request's time is lognormal around 1 (sigma 0.3); a divert to a replica that has not yet prefilled its
group runs `cold` times longer (the cold prefill; the measured TTFT ratio is about 7x, and the prefill is a part of
the request). Per run it counts diverts and whether every group kept >= 90% of its requests on one replica (by
construction no dispatch takes max/mean above 1.5).

Diverts are forced by the random order alone (a home holding 6 of 8 when a seventh of its groups arrives), so they
fall on groups at random; two in one group (2 of 16 away: 0.875) fails the landing target. The printed probability
is what an ideal router of this kind reaches; no router that sends each request on arrival can spread its forced
diverts over groups it does not see coming.

Usage: python benchmarks/route_sim.py [--runs 4000] [--groups 8] [--per-group 16] [--concurrency 8] [--cold 3]
Tests: tests/replicas/test_engine_router.py (the simulation's one rule is engine_router.fits_cap's, tested there).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics


def one_run(seed: int, groups: int, per_group: int, conc: int, cold: float, cap: float = 1.5) -> tuple[int, bool]:
    rng = random.Random(seed)
    home = {g: g % 2 for g in range(groups)}
    order = [g for g in range(groups) for _ in range(per_group - 1)]
    rng.shuffle(order)
    queue = list(range(groups)) + order  # group-firsts first
    load = [0, 0]
    away = dict.fromkeys(range(groups), 0)
    warm = {(g, home[g]) for g in range(groups)}
    ends: list[tuple[float, int]] = []
    diverts = 0

    def send(now: float) -> None:
        nonlocal diverts
        if not queue:
            return
        g = queue.pop(0)
        h = home[g]
        if load[h] + 1 > max(cap * (sum(load) + 1) / 2, 2):
            h, diverts = 1 - h, diverts + 1
            away[g] += 1
        t = rng.lognormvariate(0, 0.3) * (1 if (g, h) in warm else cold)
        warm.add((g, h))
        load[h] += 1
        heapq.heappush(ends, (now + t, h))

    for _ in range(conc):
        send(0.0)
    while ends:
        t, h = heapq.heappop(ends)
        load[h] -= 1
        send(t)
    return diverts, all(a <= per_group * 0.1 for a in away.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cold", type=float, default=3.0, help="a cold request's time over a warm one's")
    a = ap.parse_args(argv)
    for cold in sorted({1.0, a.cold}):
        runs = [one_run(s, a.groups, a.per_group, a.concurrency, cold) for s in range(a.runs)]
        print(
            f"cold x{cold:g}: diverts per run mean {statistics.mean(d for d, _ in runs):.2f}; every group >= 90% on "
            f"one replica in {sum(ok for _, ok in runs) / len(runs):.1%} of {len(runs)} runs",
            flush=True,
        )


if __name__ == "__main__":
    main()
