"""`epserve serve` stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it) or SIGTERM
(what Kubernetes sends) under load: no stream is cut.

A real `epserve serve` subprocess with `graceful_shutdown_timeout_s` 4 serves HTTP and gRPC streams,
short ones (they finish within the grace period) and long ones (they cannot). Oracle, per stream:
HTTP ends with `data: [DONE]`, after a finish_reason or after an in-band retriable error event (never
a truncated body); gRPC ends with OK or UNAVAILABLE. Short streams finish normally, long ones get the
error, new requests get 503, and the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import requests

from replicas.api.grpc_client import EpserveClient

pytestmark = pytest.mark.timeout(600)

MODEL = "gs-tiny"
GRACE_S = 4.0
SHORT, LONG = 24, 3000


@dataclass
class Outcome:
    tokens: int = 0
    finish_reason: str | None = None
    error: dict | None = None
    done_marker: bool = False
    grpc_code: str | None = None
    transport_error: str | None = None
    ended_at: float = 0.0
    first_token: threading.Event = field(default_factory=threading.Event)


def _http_stream(base: str, out: Outcome, max_tokens: int, i: int) -> None:
    try:
        with requests.post(
            base + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": f"stream {i}",
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            },
            stream=True,
            timeout=(10, 120),
        ) as r:
            if r.status_code != 200:
                out.transport_error = f"HTTP {r.status_code}: {r.text}"
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    out.done_marker = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    out.error = obj["error"]
                    continue
                for c in obj["choices"]:
                    out.tokens += 1
                    out.first_token.set()
                    out.finish_reason = c["finish_reason"] or out.finish_reason
    except requests.RequestException as exc:
        out.transport_error = repr(exc)
    finally:
        out.ended_at = time.monotonic()
        out.first_token.set()


def _grpc_stream(client: EpserveClient, out: Outcome, max_tokens: int, i: int) -> None:
    try:
        for msg in client.generate(text=f"grpc stream {i}", max_tokens=max_tokens, temperature=0, ignore_eos=True):
            out.tokens += len(msg.token_ids)
            out.first_token.set()
            out.finish_reason = msg.finish_reason or out.finish_reason
        out.grpc_code = "OK"
    except grpc.RpcError as exc:
        out.grpc_code = exc.code().name
        out.error = {"message": exc.details()}
    finally:
        out.ended_at = time.monotonic()
        out.first_token.set()


def _start_server(tmp_path: Path, epserve_cache: Path) -> tuple[subprocess.Popen, str, str]:
    from cluster.process_groups import free_port

    http_port, grpc_port = free_port(), free_port()
    config = tmp_path / "app.yaml"
    config.write_text(
        f"graceful_shutdown_timeout_s: {GRACE_S}\ndtype: float32\nnum_kv_blocks: 1024\nserved_model_name: {MODEL}\n"
    )
    log = open(tmp_path / "serve.log", "w")  # closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "epserve.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "EPSERVE_CACHE_DIR": str(epserve_cache)},
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            if requests.get(base + "/health", timeout=5).status_code == 200:
                return proc, base, f"127.0.0.1:{grpc_port}"
        except requests.RequestException:
            pass
        time.sleep(1.0)
    _kill(proc)
    raise AssertionError("epserve serve did not become healthy: " + (tmp_path / "serve.log").read_text()[-3000:])


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


# SIGTERM (what Kubernetes sends) runs by default; Ctrl-C takes the same drain path and is the long variant
@pytest.mark.parametrize("how", [pytest.param("ctrl-c", marks=pytest.mark.slow), "sigterm"])
def test_stop_under_load_ends_every_stream(how: str, tmp_path: Path, epserve_cache: Path) -> None:
    proc, base, target = _start_server(tmp_path, epserve_cache)
    client = EpserveClient(target, timeout_s=120)
    try:
        plan = [
            ("http", SHORT),
            ("http", SHORT),
            ("http", LONG),
            ("http", LONG),
            ("grpc", SHORT),
            ("grpc", LONG),
            ("grpc", LONG),
        ]
        outs = [Outcome() for _ in plan]
        threads = [
            threading.Thread(
                target=_http_stream if kind == "http" else _grpc_stream,
                args=(base if kind == "http" else client, o, n, i),
                daemon=True,
            )
            for i, ((kind, n), o) in enumerate(zip(plan, outs))
        ]
        for t in threads:
            t.start()
        for o in outs:
            assert o.first_token.wait(120) and o.tokens > 0, f"a stream produced no token: {o}"
        t_stop = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal signals the whole foreground process group
        else:
            os.kill(proc.pid, signal.SIGTERM)
        time.sleep(1.0)
        try:
            refused = requests.post(
                base + "/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2}, timeout=30
            ).status_code
        except requests.RequestException as exc:
            refused = repr(exc)
        assert refused == 503, f"a request after the stop signal got {refused}, not 503"
        for t in threads:
            t.join(GRACE_S + 60)
        assert not any(t.is_alive() for t in threads), "a stream hung after the stop signal"
        rc = proc.wait(GRACE_S + 90)
        t_exit = time.monotonic() - t_stop
        log = (tmp_path / "serve.log").read_text()[-2000:]
        for (kind, n), o in zip(plan, outs):
            assert o.transport_error is None, (
                f"{kind} {n}-token stream cut {o.ended_at - t_stop:.1f} s after the signal: {o}\n{log}"
            )
            if kind == "http":
                assert o.done_marker, f"HTTP stream without [DONE]: {o}"
                assert (o.finish_reason is not None) != (o.error is not None), o
                if o.error is not None:
                    assert o.error.get("type") == "service_unavailable_error", o.error
            else:
                assert o.grpc_code in ("OK", "UNAVAILABLE"), o
            if n == LONG:
                assert o.error is not None, f"a {LONG}-token stream cannot finish within {GRACE_S} s: {o}"
                assert o.ended_at - t_stop < GRACE_S + 15, f"ended {o.ended_at - t_stop:.1f} s after the signal"
        finished_in_grace = [
            o for (_, n), o in zip(plan, outs) if n == SHORT and o.finish_reason == "length" and o.ended_at > t_stop
        ]
        assert finished_in_grace, f"no short stream was let finish after the signal: {outs}"
        assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
        ends = sorted(round(o.ended_at - t_stop, 1) for o in outs)
        print(
            f"{how}: streams ended {ends} s after the signal ({len(finished_in_grace)} short ones finished in "
            f"the grace period), late request answered {refused}, process exited {t_exit:.1f} s after it"
        )
    finally:
        client.close()
        _kill(proc)
