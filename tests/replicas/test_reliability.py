"""Faults lose nothing: killed or frozen ranks, a killed ingress replica, a killed Serve controller.

An app with two expert-parallel groups (D=1 x X=2 each, the CPU default collective deadline) serves 8 streams while
a victim is killed (SIGKILL) or frozen (SIGSTOP). Outcome table per stream: it ends with a finish_reason,
with an in-band retriable error object, or (ingress killed) with a transport error; never a clean end
without either, never a hang. The failed group serves again within 60 s; the other group keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

pytestmark = pytest.mark.timeout(900)

APP = "rel"


@dataclass
class Stream:
    tokens: int = 0
    finish_reason: str | None = None
    error: dict | None = None
    transport_error: str | None = None
    done_marker: bool = False
    ended_at: float = 0.0
    first_token: threading.Event = field(default_factory=threading.Event)

    @property
    def outcome(self) -> str:
        if self.finish_reason is not None:
            return "finished"
        if self.error is not None:
            return "error"
        if self.transport_error is not None:
            return "transport"
        return "lost"


def _stream(base: str, st: Stream, max_tokens: int, prompt: str) -> None:
    try:
        with requests.post(
            base + "/v1/completions",
            json={
                "model": "rtiny",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            },
            stream=True,
            timeout=(10, 120),
        ) as r:
            if r.status_code != 200:
                st.error = {"status": r.status_code, "body": r.text}
                return
            for line in r.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    st.done_marker = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    st.error = obj["error"]
                    continue
                for c in obj["choices"]:
                    st.tokens += 1
                    st.first_token.set()
                    st.finish_reason = c["finish_reason"] or st.finish_reason
    except requests.RequestException as exc:
        st.transport_error = repr(exc)
    finally:
        st.ended_at = time.monotonic()
        st.first_token.set()


def _start_streams(base: str, n: int, max_tokens: int = 150) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream() for _ in range(n)]
    threads = [
        threading.Thread(target=_stream, args=(base, s, max_tokens, f"stream {i}"), daemon=True)
        for i, s in enumerate(streams)
    ]
    for t in threads:
        t.start()
    for s in streams:
        assert s.first_token.wait(120), "a stream produced no token"
    return streams, threads


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a stream hung"


def _pid_of(name: str, namespace: str) -> int:
    import ray

    handle = ray.get_actor(name, namespace=namespace)
    if name.startswith("epserve-"):  # a rank actor: its default thread may be an expert rank's step loop
        return ray.get(handle.pid.remote(), timeout=30)
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def _group_actors() -> dict[str, dict[str, int]]:
    """group id -> role -> pid, for the live rank actors of every group (names epserve-<id>-<role>-<n>)."""
    import ray

    out: dict[str, dict[str, int]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        parts = name.split("-")
        # NOTE: the metrics hubs are named epserve-metrics-<model name>, and model names may hold dashes
        if len(parts) == 4 and parts[0] == "epserve" and parts[2].startswith(("trunk", "expert")):
            _, gid, role, _ = parts
            try:
                out.setdefault(gid, {})[role] = _pid_of(name, entry["namespace"])
            except Exception:  # noqa: BLE001  # an actor being torn down
                continue
    return out


def _ingress_pids() -> list[int]:
    import ray

    return [
        _pid_of(e["name"], e["namespace"])
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["name"].startswith(f"SERVE_REPLICA::{APP}#EpserveIngress")
    ]


def _check_outcomes(streams: list[Stream], *, t_fault: float, allow_transport: bool = False) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in streams:
        counts[s.outcome] = counts.get(s.outcome, 0) + 1
        assert s.outcome != "lost", f"a stream ended without finish_reason or error: {s}"
        if s.outcome == "error":
            assert (
                s.error.get("type") == "service_unavailable_error" and s.error.get("code") == "service_unavailable"
            ), s.error
            assert s.ended_at - t_fault < 10.0, f"error {s.ended_at - t_fault:.1f} s after the fault"
            assert s.done_marker, "an errored stream must still end cleanly with [DONE]"
        if s.outcome == "transport":
            assert allow_transport, s.transport_error
    return counts


def _canary(base: str, n: int = 4) -> None:
    for i in range(n):
        r = requests.post(
            base + "/v1/completions", json={"model": "rtiny", "prompt": f"canary {i}", "max_tokens": 3}, timeout=120
        )
        assert r.status_code == 200, r.text


def _both_groups_serve(app, timeout: float = 60.0) -> float:  # noqa: ANN001
    """Send traffic until every engine replica's generated-token counter has grown; returns the seconds taken."""
    import ray

    hub = ray.get_actor("epserve-metrics-rtiny", namespace="epserve")
    t0 = time.monotonic()
    before = ray.get(hub.counter_by_replica.remote("generation_tokens"))
    while time.monotonic() - t0 < timeout:
        threads = [threading.Thread(target=_canary, args=(app.base, 1), daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(1.5)  # metrics are pushed every second
        now = ray.get(hub.counter_by_replica.remote("generation_tokens"))
        grown = [rid for rid, v in now.items() if v > before.get(rid, 0)]
        live = _replica_count()
        if len(grown) >= live == 2:
            return time.monotonic() - t0
    raise AssertionError(f"not every group served again within {timeout} s")


def _replica_count() -> int:
    from ray import serve

    d = serve.status().applications[APP].deployments["EpserveEngine"]
    return sum(n for state, n in d.replica_states.items() if state == "RUNNING")


@pytest.fixture(scope="module")
def app(serve_http: str, embedded_model_dir: Path):  # noqa: ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    # NOTE: no collective_deadline_s: the CPU default must end a frozen rank's streams within 10 s
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="rtiny",
        dtype="float32",
        trunk_ranks=1,
        expert_ranks=2,
        num_kv_blocks=128,
        max_num_seqs=12,
        max_model_len=1024,
        ingress_autoscaling=AutoscalingArgs(min_replicas=2, max_replicas=2),
        engine_autoscaling=AutoscalingArgs(min_replicas=2, max_replicas=2),
    )
    serve.run(build_app(args), name=APP, route_prefix="/rel")
    yield SimpleNamespace(base=serve_http + "/rel")
    serve.delete(APP)


def test_reset_prefix_cache_reaches_every_engine_replica(app) -> None:  # noqa: ANN001
    """POST /reset_prefix_cache broadcasts through the engine handle: each running engine replica (Serve's own count
    is the oracle) answers once, with its own id."""
    _canary(app.base, 4)
    body = requests.post(app.base + "/reset_prefix_cache", json={}, timeout=120).json()
    assert body["expected_replicas"] == _replica_count() == 2, body
    assert body["complete"] and len({r["replica"] for r in body["replicas"]}) == 2, body


@pytest.mark.parametrize(
    "victim,how",
    [("expert1", "kill"), ("expert1", "stop"), ("trunk0", "kill")],
    ids=["expert-killed", "expert-frozen", "trunk-killed"],
)
def test_rank_fault_ends_streams_retriably_and_group_returns(app, victim: str, how: str) -> None:  # noqa: ANN001
    groups = _group_actors()
    assert len(groups) == 2, groups
    streams, threads = _start_streams(app.base, 8)
    gid = sorted(groups)[0]
    pid = groups[gid][victim]
    t_fault = time.monotonic()
    os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        # new requests during the rebuild go to the other group (or are retried there): none fails
        _canary(app.base, 3)
        _join(threads, 90)
        counts = _check_outcomes(streams, t_fault=t_fault)
        assert counts.get("error", 0) >= 1, f"the faulty group held no stream? {counts}"
        errored = [s.ended_at - t_fault for s in streams if s.outcome == "error"]
        took = _both_groups_serve(app)
        assert time.monotonic() - t_fault < 90
        print(
            f"{victim} {how}: outcomes {counts}, errors {min(errored):.1f}-{max(errored):.1f} s after the fault, "
            f"both groups serving {took:.1f} s after recovery traffic began"
        )
    finally:
        if how == "stop":
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    new = _group_actors()
    assert new[gid][victim] != pid, "the failed rank was replaced"


def test_ingress_replica_killed(app) -> None:  # noqa: ANN001
    """Streams through the killed ingress replica end with a transport error (never a clean end without a
    finish_reason); other requests are unaffected."""
    ingress = _ingress_pids()
    assert len(ingress) == 2, ingress
    streams, threads = _start_streams(app.base, 8)
    t_fault = time.monotonic()
    os.kill(ingress[0], signal.SIGKILL)
    _canary(app.base, 3)
    _join(threads, 90)
    counts = _check_outcomes(streams, t_fault=t_fault, allow_transport=True)
    for s in streams:
        assert not (s.done_marker and s.finish_reason is None and s.error is None)
    print(f"ingress killed: outcomes {counts}")


def test_serve_controller_killed(app) -> None:  # noqa: ANN001
    import ray

    streams, threads = _start_streams(app.base, 8)
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    ray.kill(controller, no_restart=False)
    _canary(app.base, 3)
    _join(threads, 90)
    counts = _check_outcomes(streams, t_fault=time.monotonic())
    assert counts == {"finished": 8}, counts
