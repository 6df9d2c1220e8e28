"""Soak: 16 concurrent streams on D=2 x X=4 lose nothing and leak nothing.

The streams run through a warm-up, then through a measured window of 15 s (the `slow` variant: 10 minutes;
EPSERVE_SOAK_S sets it). Every response ends with a finish_reason or an error object (0 lost, 0 hung), every
stream completes requests again and again (a count, not a throughput: CI machines differ), and every process of
the app (ingress, engine replica, the 6 rank actors) grows its resident memory by less than 10% over the window.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

APP = "soak"
WARMUP_S = 25.0
# each of the 16 streams must finish this many requests: a stalled or starved stream fails, a slow machine does not
MIN_PER_STREAM = 2


def _pid(_self: object) -> int:
    return os.getpid()


def _app_pids() -> dict[str, int]:
    import ray

    out = {}
    for e in ray.util.list_named_actors(all_namespaces=True):
        name = e["name"]
        if name.startswith("epserve-") or name.startswith(f"SERVE_REPLICA::{APP}#"):
            try:
                handle = ray.get_actor(name, namespace=e["namespace"])
                # a rank actor answers `pid` on its control thread (an expert rank's default one runs its step loop)
                call = handle.pid.remote() if name.startswith("epserve-") else handle.__ray_call__.remote(_pid)
                out[name] = ray.get(call, timeout=30)
            except Exception:  # noqa: BLE001  # actors of other apps being torn down
                continue
    return out


def _rss(pids: dict[str, int]) -> dict[str, int]:
    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}


def _soak(serve_http: str, embedded_model_dir: Path, seconds: float) -> None:
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="soaktiny",
        dtype="float32",
        trunk_ranks=2,
        expert_ranks=4,
        collective_deadline_s=20,
        num_kv_blocks=128,
        max_num_seqs=12,
        max_model_len=1024,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name=APP, route_prefix="/soak")
    base = serve_http + "/soak"
    outcomes = {"finished": 0, "error": 0, "lost": 0}
    per_stream = [0] * 16
    stop = threading.Event()
    lock = threading.Lock()

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            finish, error = None, None
            try:
                with requests.post(
                    base + "/v1/completions",
                    json={
                        "model": "soaktiny",
                        "prompt": f"soak {i} {n}",
                        "max_tokens": 24 + (n % 3) * 8,
                        "stream": True,
                        "temperature": 0.7,
                        "seed": n,
                        "ignore_eos": True,
                    },
                    stream=True,
                    timeout=(10, 120),
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            obj = json.loads(line[6:])
                            if "error" in obj:
                                error = obj["error"]
                            for c in obj.get("choices", []):
                                finish = c["finish_reason"] or finish
                    if r.status_code != 200:
                        error = {"status": r.status_code}
            except requests.RequestException as exc:
                error = {"transport": repr(exc)}
            with lock:
                outcomes["finished" if finish else "error" if error else "lost"] += 1
                per_stream[i] += finish is not None

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(16)]
    try:
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)
        pids = _app_pids()
        assert len([n for n in pids if n.startswith("epserve-") and "-metrics-" not in n]) == 6, pids
        before = _rss(pids)
        time.sleep(seconds)
        after = _rss(pids)
        stop.set()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads), "a stream hung"
        print(f"soak {WARMUP_S:.0f} s + {seconds:.0f} s: {outcomes}, finished per stream {per_stream}")
        assert outcomes["lost"] == 0 and outcomes["error"] == 0, outcomes
        assert min(per_stream) >= MIN_PER_STREAM, per_stream
        grown = {n: after[n] / before[n] - 1 for n in before}
        print("memory growth after warm-up:", {n: f"{g:+.1%}" for n, g in grown.items()})
        assert all(g < 0.10 for g in grown.values()), grown
    finally:
        stop.set()
        serve.delete(APP)


@pytest.mark.timeout(900)
def test_soak_16_streams(serve_http: str, embedded_model_dir: Path) -> None:
    _soak(serve_http, embedded_model_dir, float(os.environ.get("EPSERVE_SOAK_S", "15")))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_16_streams_long(serve_http: str, embedded_model_dir: Path) -> None:
    _soak(serve_http, embedded_model_dir, 600.0)
