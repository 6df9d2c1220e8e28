"""Autoscaling seen happening: a burst scales the ingress from 1 to 2+ replicas and the engine from
1 to 2 expert-parallel groups (both serve), and both return to 1 after the load (bounds set low); /metrics
still counts every token and request the departed replicas served (the clients' counts are the oracle)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.timeout(900)

APP = "scale"


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {
        name: sum(n for state, n in d.replica_states.items() if state == "RUNNING")
        for name, d in status.deployments.items()
    }


def _wait(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; replicas now {_replicas(APP)}")


def _totals(url: str) -> dict[str, float]:
    """Generated tokens and answered completions in /metrics (read by prometheus_client's parser)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(requests.get(url, timeout=30).text) for s in f.samples]
    return {
        "tokens": sum(s.value for s in samples if s.name == "epserve:generation_tokens_total"),
        "http": sum(
            s.value
            for s in samples
            if s.name == "epserve:http_requests_total" and s.labels.get("route") == "/v1/completions"
        ),
    }


def test_ingress_and_engine_scale_up_and_down(serve_http: str, embedded_model_dir: Path) -> None:
    import ray
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    fast = dict(upscale_delay_s=1.0, downscale_delay_s=4.0, metrics_interval_s=0.5, look_back_period_s=2.0)
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="scale-tiny",
        dtype="float32",
        num_kv_blocks=128,
        max_num_seqs=16,
        max_model_len=1024,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=3, target_ongoing_requests=2, **fast),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=2, target_ongoing_requests=4, **fast),
    )
    serve.run(build_app(args), name=APP, route_prefix="/scale")
    try:
        assert _replicas(APP) == {"EpserveIngress": 1, "EpserveEngine": 1}
        client = openai.OpenAI(base_url=serve_http + "/scale/v1", api_key="unused", max_retries=0, timeout=120)
        stop = threading.Event()
        errors: list[str] = []
        done = [0]

        def load(i: int) -> None:
            while not stop.is_set():
                try:
                    chunks = list(
                        client.completions.create(
                            model="scale-tiny",
                            prompt=f"burst {i}",
                            max_tokens=40,
                            stream=True,
                            temperature=0,
                            extra_body={"ignore_eos": True},
                        )
                    )
                    assert chunks[-1].choices[0].finish_reason == "length"
                    done[0] += 1
                except Exception as exc:  # noqa: BLE001  # collected and asserted below
                    errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        _wait(lambda: _replicas(APP).get("EpserveIngress", 0) >= 2, 240, "the ingress to scale to 2+")
        _wait(lambda: _replicas(APP).get("EpserveEngine", 0) == 2, 240, "a second expert-parallel group")
        hub = ray.get_actor("epserve-metrics-scale-tiny", namespace="epserve")
        _wait(
            lambda: sum(1 for v in ray.get(hub.counter_by_replica.remote("generation_tokens")).values() if v > 0) >= 2,
            120,
            "both engine replicas to generate tokens",
        )
        stop.set()
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors[:3]
        assert done[0] > 16
        _wait(lambda: _replicas(APP) == {"EpserveIngress": 1, "EpserveEngine": 1}, 240, "scale down to 1 and 1")
        out = client.completions.create(
            model="scale-tiny", prompt="after", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (3, "length")
        # cluster totals keep the departed replicas' counts: every token the clients received, exactly
        want = {"tokens": done[0] * 40 + out.usage.completion_tokens, "http": done[0] + 1}
        _wait(lambda: _totals(serve_http + "/scale/metrics") == want, 30, f"/metrics to count {want}")
        # the engine replica that went away retired from the hub as it stopped (its gauges left at once)
        _wait(lambda: len(ray.get(hub.departed.remote())) >= 1, 30, "the stopped engine replica to retire")
    finally:
        serve.delete(APP)
