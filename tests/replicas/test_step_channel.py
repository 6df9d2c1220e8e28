"""The step header channel (replicas/ep/step_channel.py) on loopback, no Ray: what trunk rank 0 sends is what an
expert rank's loop reads (every plan field), a stop flag ends a wait within a poll, a STOP header ends the loop,
and a sender that vanishes is a CollectiveError (the expert rank was only waiting: collateral)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from cluster.rank_progress import CollectiveError
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan
from replicas.ep.step_channel import POLL_S, STEP, STOP, HeaderReceiver, HeaderSender, StepHeader

pytestmark = pytest.mark.timeout(30)

PLANS = [
    StepPlan((0, 1, 2, 3), FIXED, 8, map_version=3),
    StepPlan((0, 1, 2, 3, 4, 4, 4), VARIABLE),
    StepPlan((0, 1), VARIABLE, map_version=1, canary=True),
    StepPlan((0, 1, 2, 5), FIXED, 4, micro_batches=2, split_layers=3),  # ping-pong: the expert loop must know m
]


def _pair(experts: int = 2, epoch: int = 5) -> tuple[HeaderSender, list[HeaderReceiver]]:
    sender = HeaderSender("127.0.0.1")
    got: list[HeaderReceiver] = []
    t = threading.Thread(target=sender.accept, args=(experts, epoch, 10.0))
    t.start()
    # connect in reverse order: the sender orders its streams by expert index, not arrival
    for j in reversed(range(experts)):
        got.insert(0, HeaderReceiver(sender.address, token=sender.token, index=j, epoch=epoch, timeout_s=10.0))
    t.join(10)
    return sender, got


def test_header_round_trip_names_every_plan_field() -> None:
    for i, plan in enumerate(PLANS):
        frame = StepHeader(STEP, 7, i + 1, plan).encode()
        assert StepHeader.decode(frame[4:]) == StepHeader(STEP, 7, i + 1, plan)
    assert StepHeader.decode(StepHeader(STOP, 7, 9).encode()[4:]) == StepHeader(STOP, 7, 9)
    with pytest.raises(ValueError, match="malformed step header"):
        StepHeader.decode(b"\0" * 88)
    with pytest.raises(ValueError, match="at least"):
        StepHeader.decode(b"\0" * 8)


def test_every_expert_reads_each_step_in_order_then_stop() -> None:
    sender, receivers = _pair()
    try:
        for plan in PLANS:
            sender.send(plan)
        for r in receivers:
            got = [r.receive(lambda: False) for _ in PLANS]
            assert got == [StepHeader(STEP, 5, i + 1, p) for i, p in enumerate(PLANS)]
        sender.stop()
        assert [r.receive(lambda: False) for r in receivers] == [StepHeader(STOP, 5, len(PLANS))] * 2
    finally:
        sender.close()
        for r in receivers:
            r.close()


def test_stop_flag_ends_an_idle_wait_and_a_vanished_sender_is_collateral() -> None:
    sender, receivers = _pair(experts=1)
    r = receivers[0]
    try:
        t0 = time.monotonic()
        assert r.receive(lambda: time.monotonic() - t0 > 0.1) is None
        assert time.monotonic() - t0 < 0.1 + 2 * POLL_S + 0.5
        sender.close()  # trunk rank 0's process gone: no STOP, the stream just closes
        with pytest.raises(CollectiveError, match="step header stream"):
            r.receive(lambda: False)
    finally:
        r.close()


def test_a_stale_epochs_expert_is_not_taken() -> None:
    sender = HeaderSender("127.0.0.1")
    t = threading.Thread(target=sender.accept, args=(1, 2, 10.0))
    t.start()
    stale = HeaderReceiver(sender.address, token=sender.token, index=0, epoch=1, timeout_s=10.0)
    fresh = HeaderReceiver(sender.address, token=sender.token, index=0, epoch=2, timeout_s=10.0)
    t.join(10)
    try:
        sender.send(PLANS[0])
        assert fresh.receive(lambda: False) == StepHeader(STEP, 2, 1, PLANS[0])
        with pytest.raises(CollectiveError):
            stale.receive(lambda: False)
    finally:
        sender.close()
        stale.close()
        fresh.close()


def test_strangers_neither_take_a_place_nor_stall_the_join() -> None:
    """The port is open to the network: a connection without the token (a wrong one, garbage, or silence) is
    closed and the join still takes the real expert rank."""
    sender = HeaderSender("127.0.0.1")
    t = threading.Thread(target=sender.accept, args=(1, 3, 20.0))
    t.start()
    wrong = HeaderReceiver(sender.address, token=b"x" * 16, index=0, epoch=3, timeout_s=10.0)
    garbage = socket.create_connection(sender.address, timeout=10.0)
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"-" * 64)
    real = HeaderReceiver(sender.address, token=sender.token, index=0, epoch=3, timeout_s=10.0)
    t.join(20)
    try:
        assert not t.is_alive()
        sender.send(PLANS[3])
        assert real.receive(lambda: False) == StepHeader(STEP, 3, 1, PLANS[3])
        with pytest.raises(CollectiveError):
            wrong.receive(lambda: False)  # closed by the sender
    finally:
        sender.close()
        for r in (wrong, real):
            r.close()
        garbage.close()
