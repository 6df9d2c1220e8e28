"""A trivial OpenAI-completions-shaped streaming server (raw asyncio, HTTP/1.1 keep-alive, chunked SSE).

For measuring the load generator itself (benchmarks/bench_loadgen.py) and for tests of the
client: it does no work but answer. POST /v1/completions streams max_tokens (default 16)
`data:` events, `ttft_s` after the request and `itl_s` apart, then a usage event when asked
(stream_options.include_usage) and `data: [DONE]`. GET /v1/models lists "fake". Prompts starting
with "fail:429" get HTTP 429; "fail:stream" gets an in-band error event after one token.
Must not: be used as a reference for anything but transport. Run: python -m loadtest.fake_server --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

MODEL = "fake"


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type +
            b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


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
            self.queue.put_nowait((method, path, self.buf[head_end + 4:end]))
            self.buf = self.buf[end:]

    async def _answer(self) -> None:
        while True:
            method, path, body = await self.queue.get()
            if self.transport is None or self.transport.is_closing():
                return
            if method == "GET" and path.endswith("/v1/models"):
                self.transport.write(_response("200 OK", json.dumps({"object": "list", "data": [
                    {"id": MODEL, "object": "model"}]}).encode()))
            elif method == "POST" and path.endswith("/v1/completions"):
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
        n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        s.requests += 1
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
            t.write(_chunk(b'data: {"id":"cmpl-1","object":"text_completion","model":"fake","choices":'
                           b'[{"index":0,"text":" tok%d","logprobs":null,"finish_reason":%s}]}\n\n' % (i, finish)))
        else:
            if (req.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
                t.write(_chunk(b"data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                                       "choices": [], "usage": usage}).encode() + b"\n\n"))
        t.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


class FakeServer:
    """The server on 127.0.0.1; `start_in_thread()` for tests, `serve_forever()` for a process of its own.

    Args:
        port: 0 picks a free port (see `.port` once started).
        ttft_s: delay before the first event.
        itl_s: delay between events.
    """

    def __init__(self, port: int = 0, *, ttft_s: float = 0.0, itl_s: float = 0.0) -> None:
        self.port, self.ttft_s, self.itl_s = port, ttft_s, itl_s
        self.requests = 0
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
        if loop is None or self._server is None:
            return

        async def close() -> None:
            self._server.close()
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
    a = p.parse_args()
    try:
        asyncio.run(FakeServer(a.port, ttft_s=a.ttft_ms / 1e3, itl_s=a.itl_ms / 1e3).serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
