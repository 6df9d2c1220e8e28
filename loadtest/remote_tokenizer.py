"""The served model's tokenizer, asked over HTTP: POST /tokenize and /detokenize (epserve, vLLM and SGLang serve them).

`epserve bench` uses it to build text prompts of exact token counts when no `--tokenizer DIR` is given,
so the prompt lengths are the server's own. One persistent connection (http.client, standard
library), used before the benchmark starts: it never competes with the measured requests.
Must not: be used during a run. Tests: tests/loadtest/test_bench.py (against the real app).
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

ERROR_BODY_CHARS = 300


class RemoteTokenizerUnavailable(ValueError):
    """The server does not offer /tokenize and /detokenize (or refused them); the message says what to pass instead."""


class RemoteTokenizer:
    """encode/decode through the server's /tokenize and /detokenize routes.

    Args:
        base_url: the server, as `--base-url` takes it (a trailing /v1 is fine).
        model: the served model name (sent with every call).
        api_key: sent as `Authorization: Bearer KEY`.
        timeout_s: per call.
    """

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        base = base_url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--base-url {base_url!r} is not an http(s) URL")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path
        self.model = model
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request("POST", self.prefix + route, body=data, headers=self.headers)
                resp = conn.getresponse()
                text = resp.read().decode("utf-8", errors="replace")
                break
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        if resp.status != 200:
            raise RemoteTokenizerUnavailable(
                f"POST {self.prefix}{route} returned HTTP {resp.status}: {text[:ERROR_BODY_CHARS]}"
            )
        return json.loads(text)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._post("/tokenize", {"model": self.model, "prompt": text})["tokens"]]

    def decode(self, ids: list[int]) -> str:
        return str(self._post("/detokenize", {"model": self.model, "tokens": list(ids)})["prompt"])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
