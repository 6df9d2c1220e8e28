"""Choice deltas -> OpenAI JSON: chat and completion responses, stream chunks, logprobs, usage.

Pure functions over `ChoiceDelta`s (replicas/api/choice_text.py); the ingress decides when to send what.
Tests: tests/replicas/test_serving.py (through the openai client).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from model_shards.tokenizer import Tokenizer
from replicas.api.chat_stream import ChatDelta
from replicas.api.choice_text import ChoiceDelta
from replicas.engine.step_types import TokenLogprobs


@dataclass
class ChoiceState:
    """What has been produced for one choice (built up from its deltas)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is always there (0 without a prefix-cache hit),
    as OpenAI sends it, so clients need no None check."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _token_str(tok: Tokenizer, token_id: int) -> str:
    return tok.decode([token_id])


def chat_logprobs(tok: Tokenizer, ids: list[int], lps: list[TokenLogprobs]) -> dict[str, Any]:
    content = []
    for t, lp in zip(ids, lps):
        s = _token_str(tok, t)
        content.append(
            {
                "token": s,
                "logprob": lp.logprob,
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [
                    {"token": (a := _token_str(tok, i)), "logprob": v, "bytes": list(a.encode("utf-8"))}
                    for i, v in lp.top
                ],
            }
        )
    return {"content": content}


def completion_logprobs(tok: Tokenizer, ids: list[int], lps: list[TokenLogprobs], *, offset: int) -> dict[str, Any]:
    tokens, offsets, tops = [], [], []
    pos = offset
    for t, lp in zip(ids, lps):
        s = _token_str(tok, t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        top: dict[str, float] = {}
        for i, v in lp.top:
            top.setdefault(_token_str(tok, i), v)
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    ev: ChoiceDelta,
    delta: ChatDelta,
    *,
    first: bool,
    finish_reason: str | None,
    tok: Tokenizer | None,
    want_logprobs: bool,
) -> dict[str, Any]:
    """One streamed chat chunk: the choice's delta (content, reasoning_content, tool_calls) of one engine step."""
    out: dict[str, Any] = {"role": "assistant"} if first else {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        out["tool_calls"] = delta.tool_calls
        if delta.content:
            out["content"] = delta.content
    else:
        out["content"] = delta.content
    choice: dict[str, Any] = {"index": ev.index, "delta": out, "logprobs": None, "finish_reason": finish_reason}
    if want_logprobs and tok is not None and ev.logprobs:
        choice["logprobs"] = chat_logprobs(tok, list(ev.token_ids), list(ev.logprobs))
    if ev.stop_reason is not None:
        choice["stop_reason"] = ev.stop_reason
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    ev: ChoiceDelta,
    *,
    index: int,
    tok: Tokenizer | None,
    want_logprobs: bool,
    offset: int,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
    if want_logprobs and tok is not None and ev.logprobs:
        choice["logprobs"] = completion_logprobs(tok, list(ev.token_ids), list(ev.logprobs), offset=offset)
    if ev.stop_reason is not None:
        choice["stop_reason"] = ev.stop_reason
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(
    rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_response(
    rid: str,
    model: str,
    choices: list[ChoiceState],
    *,
    prompt_tokens: int,
    tok: Tokenizer,
    want_logprobs: bool,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        message: dict[str, Any] = {"role": "assistant", "content": c.text if (c.text or not c.tool_calls) else None}
        if c.reasoning:
            message["reasoning_content"] = c.reasoning
        if c.tool_calls:
            message["tool_calls"] = c.tool_calls
        item: dict[str, Any] = {
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(tok, c.token_ids, c.logprobs) if want_logprobs else None,
            "finish_reason": c.finish_reason,
        }
        if c.stop_reason is not None:
            item["stop_reason"] = c.stop_reason
        out.append(item)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices), cached_tokens),
    }


def completion_response(
    rid: str,
    model: str,
    choices: list[ChoiceState],
    *,
    prompt_tokens: int,
    tok: Tokenizer,
    want_logprobs: bool,
    echo_texts: dict[int, str] | None = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        prefix = (echo_texts or {}).get(c.index, "")
        item: dict[str, Any] = {
            "index": c.index,
            "text": prefix + c.text,
            "logprobs": completion_logprobs(tok, c.token_ids, c.logprobs, offset=len(prefix))
            if want_logprobs
            else None,
            "finish_reason": c.finish_reason,
        }
        if c.stop_reason is not None:
            item["stop_reason"] = c.stop_reason
        out.append(item)
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices), cached_tokens),
    }
