"""Every way a client gives up aborts the engine request: gRPC cancel, gRPC deadline, HTTP disconnect,
and the ingress replica that held the stream dying.

200 streams (long max_tokens, so an orphan would run for tens of seconds) are abandoned at random
moments — before the request is sent on, before the first token, or after a random number of
tokens — 16 at a time. Oracle: the engine's own counts once every client is gone: no running or
waiting sequence, no open stream, KV blocks and state slots back to the baseline taken before,
within about a second, and still so 2 s later (a request that slipped past its cancel would start
late).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from replicas.api.grpc_client import EpserveClient
from replicas.proto import epserve_pb2 as pb

pytestmark = pytest.mark.timeout(600)

APP = "cancelapp"
STREAMS = 200
CONCURRENCY = 16
MAX_TOKENS = 1000
# How soon after the last client left the engine must be idle with its pools at the baseline. The target is
# 1 s; the bound leaves room for a 2-core CI machine shared with other jobs.
QUIET_BOUND_S = 2.0


@pytest.fixture(scope="module")
def app(serve_ports, embedded_model_dir: Path):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs

    http_base, grpc_target = serve_ports
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="ctiny",
        dtype="float32",
        num_kv_blocks=1200,
        max_num_seqs=32,
        max_model_len=2048,
    )
    serve.run(build_app(args), name=APP, route_prefix="/c")
    client = EpserveClient(grpc_target, application=APP, timeout_s=120)
    host, port = http_base.removeprefix("http://").split(":")
    yield SimpleNamespace(
        host=host, port=int(port), client=client, engine=serve.get_deployment_handle("EpserveEngine", app_name=APP)
    )
    client.close()
    serve.delete(APP)


def _grpc_call(app, rng: random.Random, timeout_s: float | None):  # noqa: ANN001, ANN202
    sampling = dict(max_tokens=MAX_TOKENS, temperature=0.8, ignore_eos=True)
    if rng.random() < 0.5:
        return app.client.generate(text=f"story {rng.random()}", timeout_s=timeout_s, **sampling)
    return app.client.chat(
        [pb.ChatMessage(role="user", content=f"story {rng.random()}")], timeout_s=timeout_s, **sampling
    )


def _grpc_cancel(app, rng: random.Random) -> str:  # noqa: ANN001
    call = _grpc_call(app, rng, None)
    after = rng.choice([0, 0, 1, 2, 5, 10, 20, 40])
    if after == 0:
        time.sleep(rng.uniform(0, 0.3))  # maybe before the engine saw it, maybe before its first token
    else:
        for i, _ in enumerate(call):
            if i + 1 >= after:
                break
    call.cancel()
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED, exc
        return "grpc-cancel"
    raise AssertionError("a cancelled gRPC stream ended cleanly")


def _grpc_deadline(app, rng: random.Random) -> str:  # noqa: ANN001
    call = _grpc_call(app, rng, rng.uniform(0.05, 1.5))
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        return "grpc-deadline"
    raise AssertionError(f"a {MAX_TOKENS}-token stream finished within its deadline")


def _http_disconnect(app, rng: random.Random) -> str:  # noqa: ANN001
    chat = rng.random() < 0.5
    body = {"model": "ctiny", "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0.8, "ignore_eos": True}
    if chat:
        body["messages"] = [{"role": "user", "content": f"story {rng.random()}"}]
    else:
        body["prompt"] = f"story {rng.random()}"
    conn = http.client.HTTPConnection(app.host, app.port, timeout=120)
    try:
        conn.request(
            "POST",
            "/c/v1/chat/completions" if chat else "/c/v1/completions",
            body=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        after = rng.choice([0, 0, 1, 2, 5, 10, 20, 40])
        if after == 0:
            time.sleep(rng.uniform(0, 0.3))
        else:
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            events = 0
            while events < after:
                line = resp.readline()
                assert line, "the stream ended early"
                events += line.startswith(b"data: ")
    finally:
        conn.sock and conn.sock.close()  # a hard disconnect, as a client that went away
        conn.close()
    return "http-disconnect"


def _stats(app) -> dict:  # noqa: ANN001
    return app.engine.stats.remote().result(timeout_s=30)


def _idle(stats: dict, baseline: list) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["streams"] == 0 and stats["pools"] == baseline


def test_random_cancels_leave_nothing_running(app) -> None:  # noqa: ANN001
    list(app.client.generate(text="warm up", max_tokens=2))  # every deployment up and the engine loop started
    before = _stats(app)
    assert _idle(before, before["pools"]), before
    baseline = before["pools"]
    kinds = [_grpc_cancel, _grpc_deadline, _http_disconnect]
    rng = random.Random(12)
    jobs = [(rng.choice(kinds), random.Random(rng.random())) for _ in range(STREAMS)]
    busy: list[int] = []
    loading = threading.Event()
    loading.set()

    def sample() -> None:
        while loading.is_set():
            busy.append(_stats(app)["running"])
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(lambda job: job[0](app, job[1]), jobs))
    t_last = time.monotonic()
    loading.clear()
    sampler.join(30)
    quiet_after = None
    while time.monotonic() - t_last < 30:
        stats = _stats(app)
        if _idle(stats, baseline):
            quiet_after = time.monotonic() - t_last
            break
        time.sleep(0.05)
    assert quiet_after is not None, f"orphaned engine requests 30 s after every client left: {stats}"
    time.sleep(2.0)
    late = _stats(app)
    assert _idle(late, baseline), f"a request started after its client left: {late}"
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(
        f"{STREAMS} abandoned streams {counts} in {t_last - t0:.1f} s; peak running seen "
        f"{max(busy)}; engine aborts {late['aborted'] - before['aborted']}; idle with pools at baseline "
        f"{quiet_after:.2f} s after the last client left"
    )
    assert max(busy) > 0, "the streams never ran concurrently in the engine"
    assert quiet_after <= QUIET_BOUND_S, f"the engine took {quiet_after:.2f} s to drop abandoned requests"


def _ingress_pids() -> list[int]:
    import ray

    names = [
        e
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith(f"SERVE_REPLICA::{APP}#EpserveIngress")
    ]
    return [
        ray.get(
            ray.get_actor(e["name"], namespace=e["namespace"]).__ray_call__.remote(lambda _self: os.getpid()),
            timeout=30,
        )
        for e in names
    ]


def test_killed_ingress_replica_aborts_its_engine_requests(app) -> None:  # noqa: ANN001
    """The ingress replica holding the streams dies (SIGKILL): the engine requests it opened are aborted."""
    baseline = _stats(app)["pools"]
    n = 6

    def stream(i: int) -> None:
        conn = http.client.HTTPConnection(app.host, app.port, timeout=120)
        try:
            conn.request(
                "POST",
                "/c/v1/completions",
                body=json.dumps(
                    {
                        "model": "ctiny",
                        "prompt": f"victim {i}",
                        "max_tokens": MAX_TOKENS,
                        "stream": True,
                        "ignore_eos": True,
                    }
                ),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            while resp.readline():
                pass
        except (OSError, http.client.HTTPException):
            pass  # the replica died under it
        finally:
            conn.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while _stats(app)["running"] < n:
        assert time.monotonic() < deadline, _stats(app)
        time.sleep(0.1)
    pids = _ingress_pids()
    assert pids
    t_kill = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    while not _idle(stats := _stats(app), baseline):
        assert time.monotonic() - t_kill < 30, f"the dead ingress's engine requests still run: {stats}"
        time.sleep(0.05)
    took = time.monotonic() - t_kill
    for t in threads:
        t.join(60)
    print(f"ingress replica killed under {n} streams: engine idle with pools at baseline {took:.2f} s later")
    assert took <= 5.0, took
