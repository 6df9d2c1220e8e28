"""Locust file for autoscaling tests: streaming chat / completions users under a ramp -> burst -> soak shape.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 [-t 10m] [--peak-users 64]
           [--model NAME] [--api-key KEY] [--prompt-words 64] [--max-tokens 64] [CompletionsUser|ChatUser]

The shape (KubeRay's RayService e2e tests use Locust stages the same way): ramp up to a quarter
of the peak users, a burst at the peak (the autoscaler must add replicas), then a soak at a
quarter of the peak (it must scale back down without errors). `--peak-users` sets the peak
(default 64; headless Locust always sets `-u`, to 1 by default, so the shape has its own option),
`-t` compresses the whole shape into that run time (default 10 minutes). Each user streams
requests back to back (`ignore_eos`, fixed max_tokens); a request fails on a non-200 status, an
in-band error event, or a stream without `[DONE]`. Besides the request itself (its time is the
whole stream), TTFT is reported as its own entry ("TTFT ..."). Stand-alone: imports only Locust.
Tests: tests/loadtest/test_bench.py (headless, 10 s, zero failures).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from locust import HttpUser, LoadTestShape, between, events, task

WORDS = (
    "expert parallel serving routes every token to the experts it picked and combines their outputs "
    "while the trunk keeps attention caches and the scheduler batches requests continuously"
).split()
DEFAULT_PEAK_USERS = 64
DEFAULT_RUN_TIME_S = 600
# (name, fraction of the run time, fraction of the peak users, spawn rate as a fraction of the peak per second)
STAGES = (("ramp", 0.2, 0.25, None), ("burst", 0.2, 1.0, 0.5), ("soak", 0.6, 0.25, 0.5))


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # noqa: ANN001  # locust's argparse wrapper
    parser.add_argument("--model", default="", help="model name (default: the server's first model)")
    parser.add_argument("--api-key", default="", help="Authorization: Bearer KEY")
    parser.add_argument("--prompt-words", type=int, default=64, help="words per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per response (ignore_eos)")
    parser.add_argument("--peak-users", type=int, default=DEFAULT_PEAK_USERS, help="users during the burst")


class _StreamingUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)
    path = ""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self.model = opts.model or self._first_model()
        self.max_tokens = opts.max_tokens
        self.prompt_words = opts.prompt_words

    def _first_model(self) -> str:
        with self.client.get(
            "/v1/models", headers=getattr(self, "headers", {}), name="/v1/models", catch_response=True
        ) as resp:
            try:
                return resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError):
                resp.failure(f"no model in /v1/models (HTTP {resp.status_code})")
                return ""

    def prompt(self) -> str:
        return " ".join(random.choice(WORDS) for _ in range(self.prompt_words))

    def body(self) -> dict:
        raise NotImplementedError

    def stream(self) -> None:
        """POST one streaming request; the entry's time is the whole stream, TTFT is fired separately."""
        t0 = time.perf_counter()
        ttft = None
        with self.client.post(
            self.path, json=self.body(), headers=self.headers, stream=True, name=self.path, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = False
            for line in resp.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    resp.failure(f"in-band error: {event['error']}")
                    return
                if ttft is None and event.get("choices"):
                    ttft = time.perf_counter() - t0
            if not done:
                resp.failure("the stream ended without [DONE]")
                return
            resp.request_meta["response_time"] = (time.perf_counter() - t0) * 1e3  # the whole stream
            resp.success()
        if ttft is not None:
            events.request.fire(
                request_type="TTFT",
                name=f"TTFT {self.path}",
                response_time=ttft * 1e3,
                response_length=0,
                exception=None,
                context={},
            )


class CompletionsUser(_StreamingUser):
    path = "/v1/completions"

    @task
    def complete(self) -> None:
        self.stream()

    def body(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt(),
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
        }


class ChatUser(_StreamingUser):
    path = "/v1/chat/completions"

    @task
    def chat(self) -> None:
        self.stream()

    def body(self) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt()}],
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
        }


class RampBurstSoak(LoadTestShape):
    """ramp -> burst -> soak, scaled to `-t` (run time) and `--peak-users`."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        opts: Any = self.runner.environment.parsed_options  # type: ignore[union-attr]  # locust sets runner before tick()
        total = float(opts.run_time or DEFAULT_RUN_TIME_S)
        peak = int(opts.peak_users)
        t = self.get_run_time()
        end = 0.0
        for _name, frac_time, frac_users, spawn in STAGES:
            stage_s = frac_time * total
            end += stage_s
            if t < end:
                users = max(1, round(frac_users * peak))
                rate = spawn * peak if spawn else users / max(stage_s, 1.0)  # the ramp spreads over its stage
                return users, max(rate, 1.0)
        return None
