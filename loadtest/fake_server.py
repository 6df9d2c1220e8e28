"""A trivial OpenAI-completions-shaped streaming server (raw asyncio, HTTP/1.1 keep-alive, chunked SSE).

For measuring the load generator itself (benchmarks/bench_loadgen.py) and for tests of the
client: it does no work but answer. POST /v1/completions streams max_tokens (default 16)
`data:` events, `ttft_s` after the request and `itl_s` apart, then a usage event when asked
(stream_options.include_usage) and `data: [DONE]`. GET /v1/models lists "fake". Prompts starting
with "fail:429" get HTTP 429; "fail:stream" gets an in-band error event after one token.
`strict=True` makes it a server that follows the OpenAI schema to the letter: a body with a field
outside the documented /v1/completions fields (`ignore_eos`, `min_tokens`, ...), a token-id prompt
or another model's name gets HTTP 422 / 404, as FastAPI-based servers answer. With a `tokenizer`,
prompt tokens are counted with it (usage.prompt_tokens, `prompt_tokens_seen`); else by words.
Must not: be used as a reference for anything but transport. Run: python -m loadtest.fake_server --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

MODEL = "fake"


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None


class StrictCompletionRequest(BaseModel):
    """The documented body of OpenAI's POST /v1/completions, text prompts only, nothing else accepted."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    prompt: StrictStr | list[StrictStr]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    user: str | None = None


def strict_check(body: bytes) -> tuple[str, dict[str, Any]] | None:
    """None when `body` is a valid strict request, else (HTTP status, error body)."""
    try:
        req = StrictCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return "422 Unprocessable Entity", {"detail": detail}
    if req.model != MODEL:
        return "404 Not Found", {
            "error": {
                "message": f"model {req.model!r} does not exist",
                "type": "not_found",
                "param": "model",
                "code": 404,
            }
        }
    return None


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
        + body
    )


class _Conn(asyncio.Protocol):
    """One client connection: parses pipelined requests and answers them in order."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a socket transport
        self.worker = asyncio.get_running_loop().create_task(self._answer())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            method, path, _ = head.split("\r\n", 1)[0].split(" ", 2)
            self.queue.put_nowait((method, path, self.buf[head_end + 4 : end]))
            self.buf = self.buf[end:]

    async def _answer(self) -> None:
        while True:
            method, path, body = await self.queue.get()
            if self.transport is None or self.transport.is_closing():
                return
            if method == "GET" and path.endswith("/v1/models"):
                self.transport.write(
                    _response(
                        "200 OK", json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
                    )
                )
            elif method == "POST" and path.endswith("/v1/completions"):
                refused = strict_check(body) if self.server.strict else None
                if refused is not None:
                    self.server.refused += 1
                    self.transport.write(_response(refused[0], json.dumps(refused[1]).encode()))
                else:
                    await self._stream(json.loads(body))
            else:
                self.transport.write(_response("404 Not Found", b'{"error": {"message": "not found"}}'))

    async def _stream(self, req: dict) -> None:
        s, t = self.server, self.transport
        assert t is not None
        prompt = req.get("prompt")
        if isinstance(prompt, str) and prompt.startswith("fail:429"):
            t.write(_response("429 Too Many Requests", b'{"error": {"message": "at capacity"}}'))
            return
        n = int(req.get("max_tokens") or 16)
        if isinstance(prompt, list):
            n_prompt = len(prompt)
        elif s.tokenizer is not None:
            n_prompt = len(s.tokenizer.encode(prompt))
        else:
            n_prompt = len(str(prompt).split())
        s.requests += 1
        s.prompt_tokens_seen.append(n_prompt)
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        if s.ttft_s:
            await asyncio.sleep(s.ttft_s)
        for i in range(n):
            if i and s.itl_s:
                await asyncio.sleep(s.itl_s)
            if t.is_closing():
                return
            if i == 1 and isinstance(prompt, str) and prompt.startswith("fail:stream"):
                t.write(_chunk(b'data: {"error": {"message": "engine failed", "code": 503}}\n\n'))
                break
            finish = b'"length"' if i == n - 1 else b"null"
            t.write(
                _chunk(
                    b'data: {"id":"cmpl-1","object":"text_completion","model":"fake","choices":'
                    b'[{"index":0,"text":" tok%d","logprobs":null,"finish_reason":%s}]}\n\n' % (i, finish)
                )
            )
        else:
            if (req.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
                t.write(
                    _chunk(
                        b"data: "
                        + json.dumps(
                            {"id": "cmpl-1", "object": "text_completion", "model": MODEL, "choices": [], "usage": usage}
                        ).encode()
                        + b"\n\n"
                    )
                )
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


class FakeServer:
    """The server on 127.0.0.1; `start_in_thread()` for tests, `serve_forever()` for a process of its own.

    Args:
        port: 0 picks a free port (see `.port` once started).
        ttft_s: delay before the first event.
        itl_s: delay between events.
        strict: refuse what the OpenAI schema does not define (see the module docstring).
        tokenizer: counts prompt tokens (anything with `encode(text) -> list`).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        ttft_s: float = 0.0,
        itl_s: float = 0.0,
        strict: bool = False,
        tokenizer: Any = None,  # noqa: ANN401
    ) -> None:
        self.port, self.ttft_s, self.itl_s = port, ttft_s, itl_s
        self.strict, self.tokenizer = strict, tokenizer
        self.requests = 0
        self.refused = 0
        self.prompt_tokens_seen: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", self.port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        print(f"fake server listening on {self.base_url}", flush=True)
        await self._server.serve_forever()

    def start_in_thread(self) -> FakeServer:
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True, name="fake-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake server did not start within 10 s")
        return self

    def stop(self) -> None:
        loop = self._loop
        server = self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeServer:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    p.add_argument("--strict", action="store_true", help="refuse fields and token-id prompts outside the OpenAI schema")
    a = p.parse_args()
    try:
        asyncio.run(FakeServer(a.port, ttft_s=a.ttft_ms / 1e3, itl_s=a.itl_ms / 1e3, strict=a.strict).serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
