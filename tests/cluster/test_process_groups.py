"""Process groups of an expert-parallel group: joining, the rendezvous store's address, deadlines.

Ranks are forked processes joining a real gloo group through `join_group` (no Ray). Known answers:
an all-reduce of the ranks' (rank + 1) is 3; rank 0's store listens on the rendezvous address only
(read from the kernel's socket table via psutil, not from our code); a missing peer fails the join
at the deadline and a dead peer fails the next collective well before it, never a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist

from cluster.process_groups import GroupSpec, choose_backend, free_port, join_group, leave_group

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("fork")  # ranks share this process's imports: no second torch start-up


def _spec(world_size: int, deadline_s: float) -> GroupSpec:
    return GroupSpec("127.0.0.1", free_port(), world_size=world_size, backend="gloo", deadline_s=deadline_s, epoch=0)


def test_spec_validation_and_backend_choice() -> None:
    with pytest.raises(ValueError, match="backend must be gloo or nccl, got 'mpi'"):
        GroupSpec("127.0.0.1", 1, world_size=2, backend="mpi", deadline_s=1.0, epoch=0)
    with pytest.raises(ValueError, match="deadline must be positive, got 0"):
        GroupSpec("127.0.0.1", 1, world_size=2, backend="gloo", deadline_s=0, epoch=0)
    assert choose_backend(every_rank_has_gpu=True) == "nccl"
    assert choose_backend(every_rank_has_gpu=False) == "gloo"


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def _member(spec: GroupSpec, rank: int, results: Any, release: Any, exit_early: bool) -> None:  # noqa: ANN401  # mp queue / event
    try:
        group = join_group(spec, rank)
        if exit_early:
            os._exit(0)  # a peer that dies: no clean leave
        t = torch.tensor([float(rank + 1)])
        t0 = time.monotonic()
        try:
            dist.all_reduce(t, group=group.group)
            results.put((rank, "sum", t.item(), time.monotonic() - t0))
        except Exception as exc:  # noqa: BLE001  # the parent checks the failure and its timing
            results.put((rank, "error", repr(exc), time.monotonic() - t0))
            return
        release.wait(30)
        leave_group()
    except Exception:  # noqa: BLE001  # join failed: reported to the parent
        results.put((rank, "join error", traceback.format_exc(), 0.0))


def _start(spec: GroupSpec, ranks: list[int], *, exit_early: tuple[int, ...] = ()) -> tuple[list, Any, Any]:
    results, release = CTX.Queue(), CTX.Event()
    procs = [CTX.Process(target=_member, args=(spec, r, results, release, r in exit_early), daemon=True) for r in ranks]
    for p in procs:
        p.start()
    return procs, results, release


def _stop(procs: list) -> None:
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


def test_two_ranks_reduce_and_the_store_listens_on_the_rendezvous_address_only() -> None:
    spec = _spec(2, deadline_s=30.0)
    procs, results, release = _start(spec, [0, 1])
    try:
        got = sorted(results.get(timeout=60) for _ in range(2))
        assert [(r, kind, value) for r, kind, value, _ in got] == [(0, "sum", 3.0), (1, "sum", 3.0)], got
        listening = [
            c.laddr for c in psutil.Process(procs[0].pid).net_connections("inet") if c.status == psutil.CONN_LISTEN
        ]
        store = [a for a in listening if a.port == spec.master_port]
        assert store, f"rank 0 does not listen on the rendezvous port {spec.master_port}: {listening}"
        assert {a.ip for a in store} == {"127.0.0.1"}, f"the store listens beyond loopback: {store}"
    finally:
        release.set()
        _stop(procs)


def test_a_missing_peer_fails_the_join_at_the_deadline() -> None:
    spec = _spec(2, deadline_s=2.0)
    t0 = time.monotonic()
    procs, results, _ = _start(spec, [0])  # rank 1 never comes
    try:
        rank, kind, detail, _ = results.get(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        _stop(procs)
    assert (rank, kind) == (0, "join error"), detail
    assert 1.5 < elapsed < 20, f"failed after {elapsed:.1f} s with a 2 s deadline"


def test_a_dead_peer_fails_the_next_collective_before_the_deadline() -> None:
    spec = _spec(2, deadline_s=60.0)
    procs, results, release = _start(spec, [0, 1], exit_early=(1,))
    try:
        rank, kind, detail, secs = results.get(timeout=90)
    finally:
        release.set()
        _stop(procs)
    assert (rank, kind) == (0, "error"), detail
    assert secs < 30, f"the collective failed only after {secs:.1f} s (deadline 60 s)"
