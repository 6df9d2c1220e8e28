"""Splits Qwen3.5 output into `reasoning_content` and `content`, like vLLM's `qwen3` reasoning parser.

Owns: the `<think>` / `</think>` rules, for a whole text (`split_reasoning`) and for a stream of text
deltas cut anywhere (`ReasoningStream`); both give the same result for every split of the same text.
Must not: parse tool calls (tool_parser.py does, on the content), look at token ids, or know the
request; the caller says whether thinking is on (the prompt ended with `<think>\\n`) or off (it ended
with `<think>\\n\\n</think>\\n\\n`).
Tests: tests/replicas/test_parsers.py (known answers, every split, reasoning followed by tool calls).
"""

from __future__ import annotations

import re
from typing import NamedTuple

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
FUNCTION_OPEN = "<function="

# Reasoning ends at the first `</think>`, or at a `<tool_call>` that really opens a call: Qwen3.5 sometimes
# starts a call without closing its thinking, and vLLM and SGLang end reasoning there too.
_END = re.compile(r"</think>|<tool_call>[ \t\r\n]*<function=")
_WHITESPACE = " \t\r\n"
_MARKERS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN)


class ReasoningSplit(NamedTuple):
    """Reasoning text and answer text; "" where there is none (the caller maps "" to null)."""

    reasoning: str
    content: str


def split_reasoning(text: str, *, thinking: bool = True) -> ReasoningSplit:
    """Split a whole generated text.

    Rules with thinking on (the prompt already opened `<think>`):
      1. Reasoning runs up to the first `</think>`, or up to a `<tool_call>` followed (after optional
         whitespace) by `<function=`. With neither, the output was cut short and all of it is reasoning.
      2. `<think>` inside the reasoning is removed (the model re-opened the block).
      3. Newlines at the end of the reasoning and, after `</think>`, at the start of the content are
         dropped: the chat template writes `\\n</think>\\n\\n` around them and strips them when it renders
         the turn back. After an implicit end the content starts at `<tool_call>`.
      4. The content is kept as it is, including any later `<think>` or `</think>`.
    With thinking off everything is content, unchanged.

    NOTE: vLLM's parser keeps those newlines (reasoning "R\\n", content "\\n\\nA"); we drop them so the
    fields hold only what the model said. Everything else matches vLLM's `qwen3` parser, except that an
    implicit end at `<tool_call>` wins over a later `</think>` (vLLM's streaming path does the same).

    Args:
        text: the generated text (after the prompt).
        thinking: whether the prompt left a `<think>` block open.

    Returns:
        The reasoning and the content.
    """
    if not thinking:
        return ReasoningSplit("", text)
    end = _END.search(text)
    if end is None:
        return ReasoningSplit(text.replace(THINK_OPEN, ""), "")
    reasoning = text[: end.start()].replace(THINK_OPEN, "").rstrip("\n")
    if end.group() == THINK_CLOSE:
        return ReasoningSplit(reasoning, text[end.end() :].lstrip("\n"))
    return ReasoningSplit(reasoning, text[end.start() :])


class ReasoningStream:
    """`split_reasoning` for text that arrives in pieces.

    Text that might still turn into a marker (a cut `</thi`, a `<tool_call>` not yet followed by
    `<function=`) or newlines that might precede `</think>` are held back until the next piece, so no
    partial marker is ever emitted. The pieces returned by `feed` and `finish`, joined, equal
    `split_reasoning` of the joined input, however the input was cut.
    """

    def __init__(self, *, thinking: bool = True) -> None:
        """Args:
        thinking: whether the prompt left a `<think>` block open (as in `split_reasoning`).
        """
        self._in_reasoning = thinking
        self._trim_newlines = False  # just passed `</think>`: drop the newlines that follow it
        self._held = ""

    def feed(self, delta: str) -> ReasoningSplit:
        """Take the next piece of generated text; return what can be emitted now."""
        return self._advance(delta, final=False)

    def finish(self) -> ReasoningSplit:
        """End of generation: return whatever was held back."""
        return self._advance("", final=True)

    def _advance(self, delta: str, *, final: bool) -> ReasoningSplit:
        text = self._held + delta
        reasoning: list[str] = []
        while self._in_reasoning:
            text, progressed = self._reasoning_step(text, reasoning, final=final)
            if not progressed:
                self._held = text
                return ReasoningSplit("".join(reasoning), "")
        if self._trim_newlines:
            text = text.lstrip("\n")
            self._trim_newlines = not text
        self._held = ""
        return ReasoningSplit("".join(reasoning), text)

    def _reasoning_step(self, text: str, reasoning: list[str], *, final: bool) -> tuple[str, bool]:
        """Consume up to the next marker. Returns (text left, whether to keep going)."""
        found = [(index, marker) for marker in _MARKERS if (index := text.find(marker)) != -1]
        if not found:
            keep = 0 if final else _held_suffix(text)
            reasoning.append(text[: len(text) - keep])
            return text[len(text) - keep :], False
        index, marker = min(found)
        before = text[:index].rstrip("\n")
        reasoning.append(before)
        newlines = text[len(before) : index]  # kept: they end the reasoning only if a marker follows
        after = text[index + len(marker) :]
        if marker == THINK_OPEN:
            return newlines + after, True
        if marker == THINK_CLOSE:
            self._in_reasoning = False
            self._trim_newlines = True
            return after, True
        opens = _opens_function(after)
        if opens:
            self._in_reasoning = False
            return text[index:], True
        if opens is None and not final:
            return newlines + text[index:], False
        reasoning.append(newlines + TOOL_CALL_OPEN)  # a `<tool_call>` mentioned in the reasoning
        return after, True


def _opens_function(after: str) -> bool | None:
    """Whether the text after a `<tool_call>` opens a function: True, False, or None (cannot tell yet)."""
    rest = after.lstrip(_WHITESPACE)
    if rest.startswith(FUNCTION_OPEN):
        return True
    return None if FUNCTION_OPEN.startswith(rest) else False


def _held_suffix(text: str) -> int:
    """Length of the tail to hold back: trailing newlines, then possibly the start of a marker."""
    keep = 0
    for size in range(min(len(text), max(map(len, _MARKERS)) - 1), 0, -1):
        if any(marker.startswith(text[-size:]) for marker in _MARKERS):
            keep = size
            break
    return len(text) - len(text[: len(text) - keep].rstrip("\n"))
