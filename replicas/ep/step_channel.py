"""The step channels: how expert ranks (the header) and trunk ranks (the step stream) get each step without a Ray
call per step.

Owns: `StepHeader` (step id, epoch, the step's `StepPlan`: MoE layers, exchange mode, capacity, map version,
canary; or a stop signal) and its wire format, `HeaderSender` (trunk rank 0: one TCP stream to every expert
rank, one small frame per step, sent as the step's first message before its first collective) and
`HeaderReceiver` (an expert rank's loop blocks on it, with no deadline, checking a stop flag a few times a
second). Why a stream of its own rather than a collective: an idle server's expert ranks would sit in that
collective for as long as no request comes, past the collective deadline (gloo's timeout, NCCL's watchdog),
and on GPUs reading a header from a collective would be a device-to-host sync per step; the header is host
data on both ends. A closed stream (trunk rank 0's process gone) is a `CollectiveError`: the expert rank was
waiting on a peer, so it is collateral, not failed.

The trunk step stream (`StepServer` on each trunk rank, `StepClient` in the engine-side driver): how trunk ranks
get their step without a Ray call per step. The driver sends each step's `StepRequest` and `StepPlan` (replicas/
engine/step_types.py) and reads the `StepResult` back on it; the rank's `run_loop` (one Ray call per epoch) serves
it. The driver and a trunk rank may be on different nodes, so it is TCP, opened per epoch. Encoding: pickle, but
only of authenticated frames. Why not an explicit struct encoding like the header's: a step carries sampling
parameters, tensors (MRoPE positions, grammar bitmasks) and preprocessed images, and a second schema of all of
it would have to follow every field step_types.py gains. Why pickle is safe here: the security rule is that
nothing unauthenticated is unpickled; the stream opens with a challenge (the peer proves it holds the epoch's
random token, which travels only through Ray's calls and never crosses this stream), and every frame carries an
HMAC-SHA256 under that token over the connection's nonce, direction, sequence number, kind and body, checked
before the body is unpickled: a stranger can neither connect nor inject, replay or reorder a frame. (Like Ray's
own calls, the stream is not encrypted: the step's token ids are readable on the wire.)
Tests: tests/replicas/test_step_channel.py (wire format, stop, a vanished sender, strangers on both streams),
tests/replicas/test_failures.py.
"""

from __future__ import annotations

import hmac
import pickle
import secrets
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.rank_progress import CollectiveError
from replicas.ep.a2a_protocol import FIXED, VARIABLE, StepPlan

if TYPE_CHECKING:
    from replicas.engine.step_types import StepRequest

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


# ------------------------------------------------------------------------------------------------ the trunk stream
# A trunk rank's step stream: the engine-side driver sends each step's (StepRequest, StepPlan) and reads the
# StepResult back, with no Ray call per step. Frames: length, sequence number, kind, HMAC-SHA256, body.
STEP_FRAME, RESULT_FRAME, STOP_FRAME = 0, 1, 2
_NONCE_BYTES = 16
_FRAME_HEAD = struct.Struct("<IQB32s")  # body length, sequence number, kind, MAC
_TO_TRUNK, _TO_DRIVER = b">", b"<"
MAX_FRAME_BYTES = 1 << 30  # a step with images is megabytes; a length past this is garbage


def _mac(key: bytes, nonce: bytes, direction: bytes, seq: int, kind: int, body: bytes) -> bytes:
    m = hmac.new(key, nonce + direction + struct.pack("<QB", seq, kind), "sha256")
    m.update(body)
    return m.digest()


class _Framed:
    """One authenticated stream: every frame carries HMAC-SHA256(token; connection nonce, direction, sequence
    number, kind, body). A frame is unpickled only after its MAC checked, so nothing a stranger sends (nor a frame
    replayed from another connection, the other direction or another place in this one) reaches pickle."""

    def __init__(self, sock: socket.socket, key: bytes, nonce: bytes, *, out: bytes, inbound: bytes) -> None:
        self.sock, self._key, self._nonce = sock, key, nonce
        self._out, self._in = out, inbound
        self._sent = self._read = 0

    def send(self, kind: int, obj: object) -> None:
        body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if obj is not None else b""
        self._sent += 1
        mac = _mac(self._key, self._nonce, self._out, self._sent, kind, body)
        self.sock.sendall(_FRAME_HEAD.pack(len(body), self._sent, kind, mac) + body)

    def receive(self, stopped: Callable[[], bool]) -> tuple[int, object] | None:
        """The next frame's (kind, object); None once `stopped()` (nothing of a frame read yet).

        Raises:
            ValueError: a frame whose MAC, sequence number or length is wrong (the stream is not to be trusted).
            EOFError, OSError: the stream closed.
        """
        head = _recv_exact(self.sock, _FRAME_HEAD.size, stopped)
        if head is None:
            return None
        n, seq, kind, mac = _FRAME_HEAD.unpack(head)
        if n > MAX_FRAME_BYTES:
            raise ValueError(f"step stream: a frame of {n} bytes")
        body = _recv_exact(self.sock, n, lambda: False) if n else b""
        assert body is not None
        if seq != self._read + 1 or not hmac.compare_digest(
            mac, _mac(self._key, self._nonce, self._in, seq, kind, body)
        ):
            raise ValueError("step stream: a frame failed authentication")
        self._read = seq
        return kind, (pickle.loads(body) if body else None)  # authenticated above: the driver's or the rank's


class StepServer:
    """A trunk rank's end of its step stream: listens (`address`, opened per epoch with a fresh `token` that reaches
    the driver only through Ray's calls), `accept`s the driver, then `receive`s steps and `reply`s results.

    The port is reachable by anything on the network, so `accept` runs a challenge (a random nonce the peer must
    answer with HMAC-SHA256(token, nonce): the token itself never crosses the wire); a stranger's connection (a
    wrong answer, garbage, silence past HELLO_TIMEOUT_S) is closed and the wait goes on.
    """

    def __init__(self, host: str) -> None:
        self.token = secrets.token_bytes(TOKEN_BYTES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self.address: tuple[str, int] = (host, int(self._listener.getsockname()[1]))
        self._stream: _Framed | None = None

    def accept(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"step stream: the driver did not connect in {timeout_s} s")
            self._listener.settimeout(left)
            conn, _ = self._listener.accept()
            nonce = secrets.token_bytes(_NONCE_BYTES)
            try:
                conn.settimeout(min(left, HELLO_TIMEOUT_S))
                conn.sendall(nonce)
                answer = _recv_exact(conn, 32, lambda: False)
            except (OSError, EOFError):
                conn.close()
                continue
            assert answer is not None
            if not hmac.compare_digest(answer, hmac.digest(self.token, b"hello" + nonce, "sha256")):
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._stream = _Framed(conn, self.token, nonce, out=_TO_DRIVER, inbound=_TO_TRUNK)
            self._listener.close()  # one driver per epoch: nobody else may connect
            return

    def receive(self, stopped: Callable[[], bool]) -> tuple[StepRequest, StepPlan | None] | None:
        """Block (no deadline) until the next step; None on a STOP frame or once `stopped()`.

        Raises:
            CollectiveError: the stream closed (the driver is gone) or failed authentication.
        """
        assert self._stream is not None, "step stream: no driver accepted"
        try:
            got = self._stream.receive(stopped)
        except (OSError, ValueError, EOFError) as exc:
            raise CollectiveError(f"step stream from the driver failed: {exc}") from exc
        if got is None or got[0] == STOP_FRAME:
            return None
        kind, obj = got
        if kind != STEP_FRAME or not isinstance(obj, tuple) or len(obj) != 2:
            raise CollectiveError(f"step stream: frame kind {kind} where a step was expected")
        return obj[0], obj[1]

    def reply(self, result: object) -> None:
        assert self._stream is not None
        try:
            self._stream.send(RESULT_FRAME, result)
        except OSError as exc:
            raise CollectiveError(f"step stream to the driver failed: {exc}") from exc

    def close(self) -> None:
        for s in ([self._stream.sock] if self._stream else []) + [self._listener]:
            try:
                s.close()
            except OSError:
                pass


class StepClient:
    """The driver's end of one trunk rank's step stream: `send` a step, get a future of its result.

    A reader thread completes the futures in order as results arrive. A stream that fails (the rank's process gone,
    its loop ended, a frame failing authentication) leaves the pending futures pending: the rank's `run_loop` call
    ending tells the driver what happened (raised, collateral, dead), as with the expert loops.
    """

    def __init__(self, address: tuple[str, int], *, token: bytes, timeout_s: float) -> None:
        sock = socket.create_connection(address, timeout=timeout_s)
        try:
            nonce = _recv_exact(sock, _NONCE_BYTES, lambda: False)
            assert nonce is not None
            sock.sendall(hmac.digest(token, b"hello" + nonce, "sha256"))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stream = _Framed(sock, token, nonce, out=_TO_TRUNK, inbound=_TO_DRIVER)
        self._waiting: deque[Future] = deque()
        self.closed = False
        self.error: str | None = None  # why the reader stopped
        self._reader = threading.Thread(target=self._read, name="epserve-step-stream", daemon=True)
        self._reader.start()

    def send(self, req: StepRequest, plan: StepPlan | None) -> Future:
        """Send one step; the future holds its StepResult (pending forever if the stream failed: see the class)."""
        fut: Future = Future()
        if self.closed:
            return fut
        self._waiting.append(fut)
        try:
            self._stream.send(STEP_FRAME, (req, plan))
        except OSError as exc:
            self.error = self.error or f"send: {exc}"
            self.closed = True
        return fut

    def stop(self) -> None:
        """Ask the rank's loop to end (it returns its step count)."""
        if not self.closed:
            try:
                self._stream.send(STOP_FRAME, None)
            except OSError:
                pass

    def _read(self) -> None:
        try:
            while True:
                got = self._stream.receive(lambda: self.closed)
                if got is None:
                    return
                kind, obj = got
                if kind != RESULT_FRAME or not self._waiting:
                    raise ValueError(f"step stream: frame kind {kind} with {len(self._waiting)} steps waiting")
                self._waiting.popleft().set_result(obj)
        except (OSError, ValueError, EOFError) as exc:
            self.error = self.error or str(exc)
        finally:
            self.closed = True

    def close(self) -> None:
        self.closed = True
        try:
            self._stream.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._stream.sock.close()
        except OSError:
            pass
