"""The step channels (replicas/ep/step_channel.py) on loopback, no Ray. The header: what trunk rank 0 sends is what an
expert rank's loop reads (every plan field), a stop flag ends a wait within a poll, a STOP header ends the loop,
and a sender that vanishes is a CollectiveError (the expert rank was only waiting: collateral). The trunk step
stream: the driver's steps arrive in order and their results answer them, strangers neither connect nor inject
(a forged pickle is never unpickled), a replayed frame is refused."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
import time

import pytest
import torch

from cluster.rank_progress import CollectiveError
from model_shards.sampling import SamplingParams
from replicas.engine.step_types import SeqStart, SeqStep, StepRequest, StepResult
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan
from replicas.ep.step_channel import (
    POLL_S,
    STEP,
    STOP,
    HeaderReceiver,
    HeaderSender,
    StepClient,
    StepHeader,
    StepServer,
)

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


# ------------------------------------------------------------------------------------------------ the trunk stream
def _stream_pair(timeout_s: float = 10.0) -> tuple[StepServer, StepClient]:
    server = StepServer("127.0.0.1")
    t = threading.Thread(target=server.accept, args=(timeout_s,))
    t.start()
    client = StepClient(server.address, token=server.token, timeout_s=timeout_s)
    t.join(timeout_s)
    assert not t.is_alive()
    return server, client


STEPS = [
    (StepRequest(), PLANS[0]),
    (
        StepRequest(
            seqs=(
                SeqStep(
                    7,
                    0,
                    (1, 2, 3),
                    (0, 1),
                    start=SeqStart(slot=2, params=SamplingParams(temperature=0.5, seed=3), prompt_len=3),
                    allowed_mask=torch.tensor([5, -1], dtype=torch.int32),
                ),
                SeqStep(9, 40, (5,), drafts=(6, 7), save_state=1),
            ),
            released=(3, 4),
            mtp_steps=2,
        ),
        PLANS[3],
    ),
    (StepRequest(canary=True), None),
]


def _same_step(a: tuple[StepRequest, StepPlan | None], b: tuple[StepRequest, StepPlan | None]) -> None:
    assert a[1] == b[1] and a[0].released == b[0].released and a[0].mtp_steps == b[0].mtp_steps
    assert a[0].canary == b[0].canary and len(a[0].seqs) == len(b[0].seqs)
    for x, y in zip(a[0].seqs, b[0].seqs):
        assert x._replace(allowed_mask=None) == y._replace(allowed_mask=None)
        assert (x.allowed_mask is None) == (y.allowed_mask is None)
        if x.allowed_mask is not None:
            assert torch.equal(x.allowed_mask, y.allowed_mask)


def test_trunk_stream_carries_each_step_and_its_result_in_order_then_stop() -> None:
    server, client = _stream_pair()
    try:
        results = [StepResult(token_ids=(i, None), errors=(None, "why")) for i in range(len(STEPS))]
        futs = [client.send(req, plan) for req, plan in STEPS]  # several in flight: results answer them in order
        for sent, res in zip(STEPS, results):
            got = server.receive(lambda: False)
            assert got is not None
            _same_step(got, sent)
            server.reply(res)
        assert [f.result(timeout=10) for f in futs] == results
        client.stop()
        assert server.receive(lambda: False) is None
    finally:
        client.close()
        server.close()


def test_trunk_stream_stop_flag_and_a_vanished_driver_is_collateral() -> None:
    server, client = _stream_pair()
    try:
        t0 = time.monotonic()
        assert server.receive(lambda: time.monotonic() - t0 > 0.1) is None
        assert time.monotonic() - t0 < 0.1 + 2 * POLL_S + 0.5
        client.close()  # the driver's process gone
        with pytest.raises(CollectiveError, match="step stream"):
            server.receive(lambda: False)
    finally:
        server.close()


def test_trunk_stream_a_vanished_rank_leaves_the_step_pending() -> None:
    """The rank's process gone: its result never comes and sending more does not raise (the driver learns what
    happened from the rank's loop call, not from the stream)."""
    server, client = _stream_pair()
    try:
        fut = client.send(*STEPS[0])
        server.close()
        deadline = time.monotonic() + 5
        while not client.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.closed and not fut.done()
        assert not client.send(*STEPS[0]).done()
    finally:
        client.close()


def test_trunk_stream_strangers_cannot_connect_nor_inject() -> None:
    """The rank's port is open to the network: a connection with the wrong token, garbage or silence is closed and
    the driver still gets in; and a frame not authenticated by the token (here: a pickle forged on the real stream)
    is refused before anything is unpickled."""
    server = StepServer("127.0.0.1")
    t = threading.Thread(target=server.accept, args=(20.0,))
    t.start()
    wrong = StepClient(server.address, token=b"x" * 16, timeout_s=10.0)  # answers the challenge wrongly
    deadline = time.monotonic() + 10
    while not wrong.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert wrong.closed, "the rank kept a stream whose peer does not hold the token"
    wrong.close()
    garbage = socket.create_connection(server.address, timeout=10.0)
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"-" * 64)
    real = StepClient(server.address, token=server.token, timeout_s=10.0)
    t.join(20)
    garbage.close()
    try:
        assert not t.is_alive()
        real.send(*STEPS[2])
        got = server.receive(lambda: False)
        assert got is not None
        _same_step(got, STEPS[2])
        # a forged frame: a pickle that would run code, with a made-up MAC, written on the authenticated stream
        evil = pickle.dumps(_Boom())
        real._stream.sock.sendall(struct.pack("<IQB32s", len(evil), 2, 0, b"\0" * 32) + evil)
        with pytest.raises(CollectiveError, match="authentication"):
            server.receive(lambda: False)
        assert not _Boom.ran
    finally:
        real.close()
        server.close()


def test_trunk_stream_a_frame_replayed_is_refused() -> None:
    """A frame captured from the stream and sent again (same MAC) has a stale sequence number: refused."""
    server, client = _stream_pair()
    sent: list[bytes] = []
    sock = client._stream.sock
    orig = sock.sendall
    try:
        client._stream.sock = _Tap(sock, sent)  # type: ignore[assignment]  # records what the client writes
        client.send(*STEPS[0])
        assert server.receive(lambda: False) is not None
        orig(sent[0])  # the same bytes again
        with pytest.raises(CollectiveError, match="authentication"):
            server.receive(lambda: False)
    finally:
        client._stream.sock = sock
        client.close()
        server.close()


class _Tap:
    def __init__(self, sock: socket.socket, out: list[bytes]) -> None:
        self._sock, self._out = sock, out

    def sendall(self, data: bytes) -> None:
        self._out.append(bytes(data))
        self._sock.sendall(data)


class _Boom:
    ran = False

    def __reduce__(self):  # noqa: ANN204  # pickle protocol
        return (_mark_ran, ())


def _mark_ran() -> None:
    _Boom.ran = True
