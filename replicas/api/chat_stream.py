"""One chat choice's text -> reasoning, content and tool calls, for the HTTP and gRPC chat APIs.

Owns: chaining the reasoning split (replicas/api/reasoning_parser.py) and the qwen3_coder tool-call
parser (replicas/api/tool_parser.py) over text deltas, and the finish reason OpenAI reports
("tool_calls" when calls were made). Must not: know about HTTP or proto formats.
Tests: tests/replicas/test_chat_features.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from replicas.api.reasoning_parser import ReasoningStream
from replicas.api.tool_parser import ToolCallStream, ToolSchemas


@dataclass
class ChatDelta:
    """What one piece of model text adds to a choice (any part may be empty)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, other: ChatDelta) -> ChatDelta:
        return ChatDelta(
            self.content + other.content, self.reasoning + other.reasoning, self.tool_calls + other.tool_calls
        )


def thinking_open(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the model inside `<think>` (Qwen3.5's default)."""
    return prompt_text.rstrip().endswith("<think>")


class ChatChoiceStream:
    """Text deltas of one choice in, chat deltas out.

    Args:
        thinking: the prompt opened `<think>` (reasoning comes first).
        tools: schemas of the request's tools when tool calls are parsed, else None.
    """

    def __init__(self, *, thinking: bool, tools: ToolSchemas | None) -> None:
        self._reasoning = ReasoningStream(thinking=thinking)
        self._tools = ToolCallStream(tools) if tools is not None else None
        self.total = ChatDelta()

    def feed(self, text: str) -> ChatDelta:
        split = self._reasoning.feed(text)
        return self._record(ChatDelta(reasoning=split.reasoning) + self._content(split.content, final=False))

    def finish(self) -> ChatDelta:
        split = self._reasoning.finish()
        return self._record(ChatDelta(reasoning=split.reasoning) + self._content(split.content, final=True))

    def _content(self, text: str, *, final: bool) -> ChatDelta:
        if self._tools is None:
            return ChatDelta(content=text)
        deltas = self._tools.feed(text) if text else []
        if final:
            deltas += self._tools.finish()
        out = ChatDelta()
        for d in deltas:  # OpenAI delta objects: {"content": ...} or {"tool_calls": [...]}
            out.content += d.get("content") or ""
            out.tool_calls += d.get("tool_calls") or []
        return out

    def _record(self, delta: ChatDelta) -> ChatDelta:
        self.total = self.total + ChatDelta(delta.content, delta.reasoning)
        return delta

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The complete calls (valid after `finish`)."""
        return self._tools.tool_calls if self._tools is not None else []

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason is not None and self.tool_calls and engine_reason == "stop":
            return "tool_calls"
        return engine_reason
