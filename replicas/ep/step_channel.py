"""The step header channel: how expert ranks learn of each step without a Ray call per step.

Owns: `StepHeader` (step id, epoch, the step's `StepPlan`: MoE layers, exchange mode, capacity, map version,
canary; or a stop signal) and its wire format, `HeaderSender` (trunk rank 0: one TCP stream to every expert
rank, one small frame per step, sent as the step's first message before its first collective) and
`HeaderReceiver` (an expert rank's loop blocks on it, with no deadline, checking a stop flag a few times a
second). Why a stream of its own rather than a collective: an idle server's expert ranks would sit in that
collective for as long as no request comes, past the collective deadline (gloo's timeout, NCCL's watchdog),
and on GPUs reading a header from a collective would be a device-to-host sync per step; the header is host
data on both ends. A closed stream (trunk rank 0's process gone) is a `CollectiveError`: the expert rank was
waiting on a peer, so it is collateral, not failed.
Tests: tests/replicas/test_step_channel.py (wire format, stop, a vanished sender), tests/replicas/test_failures.py.
"""

from __future__ import annotations

import hmac
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.rank_progress import CollectiveError
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan

STEP, STOP = 0, 1
_MAGIC = 0x45504844  # "EPHD"
# magic, kind, epoch, step, map_version, mode, capacity, canary, micro_batches, split_layers, layers
_FIXED_FIELDS = struct.Struct("<11q")
_LEN = struct.Struct("<I")
_HELLO = struct.Struct("<2q16s")  # expert index, epoch, the channel's token (proves the peer got it through Ray)
TOKEN_BYTES = 16
HELLO_TIMEOUT_S = 5.0  # how long a connection may take to say who it is
POLL_S = 0.25  # how often a waiting receiver looks at its stop flag


@dataclass(frozen=True)
class StepHeader:
    """What an expert rank needs to take part in one step (or STOP: leave the loop)."""

    kind: int
    epoch: int
    step: int
    plan: StepPlan | None = None

    def encode(self) -> bytes:
        p = self.plan
        layers = p.moe_layers if p is not None else ()
        body = _FIXED_FIELDS.pack(
            _MAGIC,
            self.kind,
            self.epoch,
            self.step,
            p.map_version if p is not None else 0,
            int(p is not None and p.mode == FIXED),
            p.capacity if p is not None else 0,
            int(p is not None and p.canary),
            p.micro_batches if p is not None else 1,
            p.split_layers if p is not None else 0,
            len(layers),
        ) + struct.pack(f"<{len(layers)}i", *layers)
        return _LEN.pack(len(body)) + body

    @classmethod
    def decode(cls, body: bytes) -> StepHeader:
        if len(body) < _FIXED_FIELDS.size:
            raise ValueError(f"step header of {len(body)} bytes, at least {_FIXED_FIELDS.size} expected")
        magic, kind, epoch, step, version, fixed, cap, canary, m, split, n = _FIXED_FIELDS.unpack_from(body)
        if magic != _MAGIC or kind not in (STEP, STOP) or len(body) != _FIXED_FIELDS.size + 4 * n:
            raise ValueError(f"malformed step header (magic {magic:#x}, kind {kind}, {n} layers, {len(body)} bytes)")
        if kind == STOP:
            return cls(STOP, epoch, step)
        layers = struct.unpack_from(f"<{n}i", body, _FIXED_FIELDS.size)
        plan = StepPlan(
            tuple(layers),
            FIXED if fixed else VARIABLE,
            cap,
            map_version=version,
            canary=bool(canary),
            micro_batches=m,
            split_layers=split,
        )
        return cls(STEP, epoch, step, plan)


class HeaderSender:
    """Trunk rank 0's end: listens (`address`), then `accept`s one stream per expert rank at join time.

    The port is reachable by anything on the network, so a stream counts only when its hello carries `token` (a
    fresh random secret the expert ranks get through Ray's authenticated calls): a stranger's connection, or one
    that sends garbage or nothing, is closed and the wait goes on, so it can neither take an expert rank's place
    nor stall the join.
    """

    def __init__(self, host: str) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.address: tuple[str, int] = (host, int(self._listener.getsockname()[1]))
        self._peers: list[socket.socket] = []
        self.epoch = -1
        self.step = 0

    def accept(self, expert_ranks: int, epoch: int, timeout_s: float) -> None:
        """Take every expert rank's stream (ordered by expert index); they connect after joining the group."""
        deadline = time.monotonic() + timeout_s
        got: dict[int, socket.socket] = {}
        while len(got) < expert_ranks:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"step header: {len(got)} of {expert_ranks} expert ranks connected in {timeout_s} s")
            self._listener.settimeout(left)
            conn, _ = self._listener.accept()
            try:
                conn.settimeout(min(left, HELLO_TIMEOUT_S))  # a silent stranger may hold the accept loop this long
                hello = _recv_exact(conn, _HELLO.size, lambda: False)
                assert hello is not None  # never stopped
                index, their_epoch, token = _HELLO.unpack(hello)
            except (OSError, EOFError):
                conn.close()
                continue
            if not hmac.compare_digest(token, self.token) or their_epoch != epoch or not 0 <= index < expert_ranks:
                conn.close()
                continue
            conn.settimeout(timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            got[index] = conn
        self._peers = [got[j] for j in sorted(got)]
        self.epoch, self.step = epoch, 0

    def send(self, plan: StepPlan) -> None:
        """The next step's header to every expert rank. A peer gone is a CollectiveError (this rank only waited)."""
        self.step += 1
        self._send_all(StepHeader(STEP, self.epoch, self.step, plan).encode())

    def stop(self) -> None:
        """Tell every expert rank's loop to end (a rebuild, a shutdown); peers already gone are skipped."""
        frame = StepHeader(STOP, self.epoch, self.step).encode()
        for s in self._peers:
            try:
                s.sendall(frame)
            except OSError:
                pass

    def _send_all(self, frame: bytes) -> None:
        for s in self._peers:
            try:
                s.sendall(frame)
            except OSError as exc:
                raise CollectiveError(f"step header: an expert rank's stream is gone ({exc})") from exc

    def close(self) -> None:
        for s in self._peers + [self._listener]:
            try:
                s.close()
            except OSError:
                pass
        self._peers = []


class HeaderReceiver:
    """An expert rank's end: connects to trunk rank 0's `address` after joining the group."""

    def __init__(self, address: tuple[str, int], *, token: bytes, index: int, epoch: int, timeout_s: float) -> None:
        self._sock = socket.create_connection(address, timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(_HELLO.pack(index, epoch, token))
        self._sock.setblocking(True)
        self.epoch = epoch

    def receive(self, stopped: Callable[[], bool]) -> StepHeader | None:
        """Block (no deadline: the server may idle for hours) until the next header; None once `stopped()`.

        Raises:
            CollectiveError: the stream closed (trunk rank 0 is gone) or carried garbage.
        """
        try:
            head = _recv_exact(self._sock, _LEN.size, stopped)
            if head is None:
                return None
            body = _recv_exact(self._sock, _LEN.unpack(head)[0], lambda: False)
            assert body is not None
            return StepHeader.decode(body)
        except (OSError, ValueError, EOFError) as exc:
            raise CollectiveError(f"step header stream from trunk rank 0 failed: {exc}") from exc

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def _recv_exact(sock: socket.socket, n: int, stopped: Callable[[], bool]) -> bytes | None:
    """n bytes from `sock`; None if `stopped()` turns true while nothing of them has arrived yet."""
    buf = bytearray()
    while len(buf) < n:
        if not buf:
            ready, _, _ = select.select([sock], [], [], POLL_S)
            if not ready:
                if stopped():
                    return None
                continue
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("stream closed")
        buf += chunk
    return bytes(buf)
