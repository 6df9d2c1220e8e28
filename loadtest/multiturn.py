"""Multi-turn chat replay: conversations whose assistant turns are the server's own replies.

Each conversation is a system prompt and `turns` user messages (random words, seeded). Turn k sends the system
prompt, the earlier user messages with the server's replies to them, and user message k to
/v1/chat/completions (streaming, usage included), so each turn's prompt extends the last one's as a chat
client's would. Per turn it records the prompt and cached tokens (usage.prompt_tokens_details.cached_tokens),
TTFT, the engine replica (`x-epserve-engine`), and where the turn's own assistant header starts (the token count
of its messages rendered without the generation prompt, from the server's /tokenize): the prefix cache keeps a
state there, so from turn 2 on a turn should find at least that position of the previous turn, rounded down to
the 64-token grid, cached (issue 17). Must not: aggregate across runs (report.py).
Tests: tests/loadtest/test_prefix_stats.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from loadtest.http_client import ENGINE_HEADER, ERROR_BODY_CHARS, cached_tokens

GRID = 64  # the prefix cache's grid (replicas/engine/prefix_cache.py)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will what up out more can time about "
    "into them only some could other then its two may these first any new very our like over such year most made "
    "after also did many before must through back where much your way well down should because each just those "
    "people how too little state good world very still own see men work long get here between both life being under "
    "never day same another know while last might us great old year off come since against go came right used take"
).split()


@dataclass(frozen=True)
class Conversation:
    system: str
    users: tuple[str, ...]


@dataclass
class TurnRecord:
    """One turn of one conversation as the server answered it."""

    conversation: int
    turn: int  # 1-based
    header_start: int  # tokens of the turn's messages without the generation prompt: where its assistant header starts
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    ttft: float = math.nan
    engine: str = ""
    reply: str = ""
    error: str | None = None


def conversations(
    n: int, *, turns: int, system_words: int = 300, user_words: int = 60, seed: int = 0
) -> list[Conversation]:
    """`n` conversations of `turns` user messages; each conversation has its own system prompt."""
    if n < 1 or turns < 1:
        raise ValueError(f"multi-turn needs >= 1 conversation and >= 1 turn, got {n}, {turns}")
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=k))

    return [
        Conversation(f"You are assistant {c}. {text(system_words)}", tuple(text(user_words) for _ in range(turns)))
        for c in range(n)
    ]


class ChatReplayClient:
    """Streams /v1/chat/completions turns and asks /tokenize where each turn's assistant header starts."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        max_tokens: int,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.chat_url, self.tokenize_url = base + "/v1/chat/completions", base + "/tokenize"
        self.model, self.max_tokens, self.extra = model, max_tokens, extra or {}
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatReplayClient:
        self.session = aiohttp.ClientSession(timeout=self.timeout, headers=self.headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def header_start(self, messages: list[dict[str, str]]) -> int:
        assert self.session is not None, "use the client as `async with`"
        body = {"model": self.model, "messages": messages, "add_generation_prompt": False}
        async with self.session.post(self.tokenize_url, json=body) as resp:
            if resp.status != 200:
                raise ValueError(f"/tokenize returned HTTP {resp.status}: {(await resp.text())[:ERROR_BODY_CHARS]}")
            return int((await resp.json())["count"])

    async def turn(self, messages: list[dict[str, str]], rec: TurnRecord) -> None:
        """Send one turn; fills `rec` (reply text, usage, TTFT, engine or error)."""
        assert self.session is not None, "use the client as `async with`"
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self.extra,
        }
        t0 = time.perf_counter()
        parts: list[str] = []
        try:
            async with self.session.post(self.chat_url, json=body) as resp:
                rec.engine = resp.headers.get(ENGINE_HEADER, "")
                if resp.status != 200:
                    rec.error = f"http_{resp.status}: {(await resp.text())[:ERROR_BODY_CHARS]}"
                    return
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    ev = json.loads(line[5:])
                    if "error" in ev:
                        rec.error = json.dumps(ev["error"])[:ERROR_BODY_CHARS]
                        return
                    for ch in ev.get("choices") or []:
                        if math.isnan(rec.ttft):
                            rec.ttft = time.perf_counter() - t0
                        parts.append((ch.get("delta") or {}).get("content") or "")
                    usage = ev.get("usage")
                    if usage:
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.cached_tokens = cached_tokens(usage)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
        rec.reply = "".join(parts)


async def replay(client: ChatReplayClient, convs: Sequence[Conversation], *, concurrency: int) -> list[TurnRecord]:
    """Run every conversation turn by turn (at most `concurrency` conversations at once); a failed turn ends its
    conversation. Records in (conversation, turn) order."""
    sem = asyncio.Semaphore(concurrency)
    out: list[list[TurnRecord]] = [[] for _ in convs]

    async def one(c: int, conv: Conversation) -> None:
        async with sem:
            history: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
            for k, user in enumerate(conv.users, start=1):
                messages = [*history, {"role": "user", "content": user}]
                rec = TurnRecord(c, k, await client.header_start(messages))
                await client.turn(messages, rec)
                out[c].append(rec)
                if rec.error is not None:
                    return
                history = [*messages, {"role": "assistant", "content": rec.reply}]

    await asyncio.gather(*(one(c, conv) for c, conv in enumerate(convs)))
    return [r for recs in out for r in recs]


def turn_report(records: Sequence[TurnRecord]) -> list[dict[str, Any]]:
    """Per turn: mean prompt and cached tokens, the expected floor (the previous turn's assistant header start,
    rounded down to 64) and how many conversations reached it (turn 1 has no floor)."""
    by_conv: dict[int, dict[int, TurnRecord]] = {}
    for r in records:
        by_conv.setdefault(r.conversation, {})[r.turn] = r
    turns = sorted({r.turn for r in records})
    rows = []
    for k in turns:
        rs = [t[k] for t in by_conv.values() if k in t and t[k].error is None]
        floors = [(t[k - 1].header_start // GRID) * GRID for t in by_conv.values() if k in t and k - 1 in t]
        met = [
            (t[k].cached_tokens or 0) >= (t[k - 1].header_start // GRID) * GRID
            for t in by_conv.values()
            if k in t and k - 1 in t and t[k].error is None
        ]
        rows.append(
            {
                "turn": k,
                "conversations": len(rs),
                "mean_prompt_tokens": _mean([r.prompt_tokens or 0 for r in rs]),
                "mean_cached_tokens": _mean([r.cached_tokens or 0 for r in rs]),
                "mean_floor": _mean(floors) if k > 1 else math.nan,
                "reached_floor": f"{sum(met)}/{len(met)}" if k > 1 else "-",
                "median_ttft_ms": float(np.median([r.ttft for r in rs])) * 1e3 if rs else math.nan,
            }
        )
    return rows


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
