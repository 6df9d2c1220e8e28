"""Streaming OpenAI /v1/completions client over aiohttp, timing every SSE event.

One `send` per request, never raising: the outcome (times, token counts, usage, error kind) is
a `RequestResult`. Every `data:` event with a non-empty `choices` list is one token-bearing
event (epserve sends one per token, so the stream count equals usage.completion_tokens; a
server that packs several tokens per event is still totalled right by its usage chunk).
Bodies follow the OpenAI schema; only with `ignore_eos` do they carry the non-standard
`ignore_eos` and min_tokens = max_tokens that make output lengths exact (epserve, vLLM, SGLang).
Must not: decide when to send (runner.py). Tests: tests/loadtest/test_bench.py (fake server, real app).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from loadtest.datasets import BenchRequest
from loadtest.metrics import RequestResult

ERROR_BODY_CHARS = 300
ENGINE_HEADER = "x-epserve-engine"  # the engine replica that ran the request (epserve only)


def completions_url(base_url: str) -> str:
    """`http://host:port[/prefix][/v1]` -> `.../v1/completions` (a trailing /v1, as `epserve serve` prints, is fine)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + "/v1/completions"


class OpenAICompletionsClient:
    """Streams /v1/completions requests to one server; use as `async with`.

    Args:
        base_url: the server (with its route prefix, if any).
        model: the model name; None asks /v1/models for the first one (`resolve_model`).
        api_key: sent as `Authorization: Bearer KEY`.
        temperature: sampling temperature of every request (0 = greedy).
        timeout_s: deadline of one whole request.
        max_connections: connection pool size (0 = unbounded; the runner bounds concurrency).
        ignore_eos: add `ignore_eos` and `min_tokens` (not in the OpenAI schema) for exact output lengths.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        max_connections: int = 0,
        ignore_eos: bool = False,
    ) -> None:
        self.url = completions_url(base_url)
        self.models_url = self.url[: -len("/completions")] + "/models"
        self.model = model
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAICompletionsClient:
        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def resolve_model(self) -> str:
        """The configured model, else the first id /v1/models lists."""
        if self.model is None:
            assert self.session is not None, "use the client as `async with`"
            async with self.session.get(self.models_url) as resp:
                if resp.status != 200:
                    raise ValueError(
                        f"GET {self.models_url} returned HTTP {resp.status}: {(await resp.text())[:ERROR_BODY_CHARS]}"
                    )
                data = (await resp.json()).get("data") or []
            if not data:
                raise ValueError(f"{self.models_url} lists no model; pass --model")
            self.model = str(data[0]["id"])
        return self.model

    def body(self, req: BenchRequest) -> bytes:
        prompt: Any = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": req.output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body.update(min_tokens=req.output_len, ignore_eos=True)
        return json.dumps(body).encode()

    async def send(self, req: BenchRequest, now: Callable[[], float]) -> RequestResult:
        """Send one request and read its stream to the end.

        Args:
            now: the runner's clock (seconds since the benchmark start).
        """
        assert self.session is not None, "use the client as `async with`"
        data = self.body(req)
        r = RequestResult(req.prompt_len, req.output_len, start=now(), group=req.group)
        try:
            async with self.session.post(self.url, data=data) as resp:
                r.engine = resp.headers.get(ENGINE_HEADER, "")
                if resp.status != 200:
                    r.error, r.error_detail = f"http_{resp.status}", (await resp.text())[:ERROR_BODY_CHARS]
                else:
                    await self._read_stream(resp, r, now)
        except asyncio.TimeoutError:
            r.error = "timeout"
        except aiohttp.ClientError as exc:
            r.error, r.error_detail = "connection", f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
        r.end = now()
        return r

    @staticmethod
    async def _read_stream(resp: aiohttp.ClientResponse, r: RequestResult, now: Callable[[], float]) -> None:
        """Read SSE events as the bytes arrive (events that arrive in one read share its timestamp)."""
        buf = b""
        async for data in resp.content.iter_any():
            t = now()
            buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
            while (end := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:end], buf[end + 2 :]
                for line in event.split(b"\n"):
                    if line.startswith(b"data:") and _on_event(line[5:].strip(), r, t):
                        return
        if r.error is None:
            r.error = "incomplete_stream"  # the connection ended before [DONE]


def _on_event(payload: bytes, r: RequestResult, t: float) -> bool:
    """Account one `data:` payload; True when the stream is over ([DONE] or an error)."""
    if payload == b"[DONE]":
        return True
    try:
        ev = json.loads(payload)
    except json.JSONDecodeError:
        r.error, r.error_detail = "bad_event", payload[:ERROR_BODY_CHARS].decode(errors="replace")
        return True
    if "error" in ev:
        r.error, r.error_detail = "stream_error", json.dumps(ev["error"])[:ERROR_BODY_CHARS]
        return True
    if ev.get("choices"):
        r.chunk_times.append(t)
        r.chunk_tokens.append(1)
    usage = ev.get("usage")
    if usage:
        r.usage_prompt_tokens = usage.get("prompt_tokens")
        r.usage_completion_tokens = usage.get("completion_tokens")
        r.usage_cached_tokens = cached_tokens(usage)
    return False


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field for prompt tokens served from a cache), if given."""
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return int(value) if value is not None else None
