"""Parses Qwen3.5 tool calls (the qwen3_coder XML form) into OpenAI `tool_calls`, like vLLM's `qwen3_coder`.

Owns: the call grammar `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n
</tool_call>`, the rules for malformed or cut-off calls, converting values by the tool's JSON schema, and the
OpenAI streaming deltas. One scanner (`_Scanner`) serves both `parse_tool_calls` (whole text) and
`ToolCallStream` (text deltas cut anywhere), so both give the same calls and content for every split.
Must not: raise on model output, split reasoning (reasoning_parser.py runs first), or know the request
beyond the tool schemas.
Tests: tests/replicas/test_parsers.py (known answers, every split, malformed input, template round trip).
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from replicas.engine.json_schema_types import STRING_ONLY, schema_types

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"

_WHITESPACE = " \t\r\n"
_NAME = re.compile(r"[^\s<>{}\"']*")  # a function or parameter name runs up to `>`; these characters break it
_BODY_TAGS = (PARAMETER_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN)
_VALUE_FOLLOWERS = (FUNCTION_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN)  # after `</parameter>`, with PARAMETER_OPEN
_CLOSING_TAGS = (PARAMETER_CLOSE, FUNCTION_CLOSE, TOOL_CALL_CLOSE)

ToolSchemas = Mapping[str, Mapping[str, Any]]  # function name -> its `parameters` JSON schema


def tools_by_name(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Build the schema lookup from an OpenAI `tools` list.

    Args:
        tools: `[{"type": "function", "function": {"name", "parameters"?, ...}}, ...]`, or None.

    Returns:
        Function name -> its `parameters` schema ({} when absent).

    Raises:
        ValueError: a tool is not a function tool, has no name, or two tools share a name.
    """
    out: dict[str, Mapping[str, Any]] = {}
    for index, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{index}].function.name must be a non-empty string, got {name!r}")
        if name in out:
            raise ValueError(f"tools[{index}]: function name {name!r} is used twice; names must be unique")
        parameters = function.get("parameters")
        out[name] = parameters if isinstance(parameters, Mapping) else {}
    return out


def make_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id, `call_` + 24 hex digits (vLLM's form)."""
    return f"call_{uuid.uuid4().hex[:24]}"


class ParsedToolCalls(NamedTuple):
    """Text outside calls ("" if none) and the calls, `[{id, type, function: {name, arguments}}]`."""

    content: str
    tool_calls: list[dict[str, Any]]


def parse_tool_calls(
    text: str, tools: ToolSchemas | None, *, new_id: Callable[[], str] = make_tool_call_id
) -> ParsedToolCalls:
    """Parse a whole generated text (the content, after reasoning was split off).

    Rules (the scanner's; `ToolCallStream` applies the same ones):
      - A call starts at `<tool_call>` followed, after optional whitespace, by `<function=NAME>`, where NAME
        has no whitespace, quotes, braces or angle brackets and, when `tools` is given, is one of them.
        Any other `<tool_call>` (unknown function, bad name, cut off before `>`) is content, like the
        text that follows it.
      - Parameters are `<parameter=ARG>` blocks. One newline after `>` and one before the closing tag are
        format and are removed. A value ends at a `</parameter>` followed (after whitespace) by
        `<parameter=ARG>`, `</function>`, `</tool_call>`, `<tool_call>` or the end of the text. Any other
        `</parameter>`, and one that closes a `<parameter=ARG>` opened at the start of a line inside the
        value, is part of the value (so values may hold XML, even a whole example call).
      - Missing `</parameter>`: the value ends before the next line-start `<parameter=ARG>` with a new name
        the schema knows, else at a `</function>` or `</tool_call>` that ends the call, else at the end of
        the text (a cut-off closing tag there is dropped).
      - Missing `</function>` or `</tool_call>`: the call ends at `</tool_call>`, at the next `<tool_call>`,
        or at the end of the text, and keeps the parameters parsed so far. Text inside a call that is none
        of the tags ends the call too, and from there on is content.
      - A parameter repeated in one call keeps its first value (a stream cannot take back a fragment).
      - Whitespace next to a call is dropped, except between a call and text that follows it. Other text
        before, between and after calls is content, in order.

    NOTE: where vLLM's `qwen3_coder` differs: it returns calls to functions not in `tools`, drops text
    after the last call when not streaming (but streams it), keeps the last of repeated parameters, keeps
    the whitespace before a call in the content, and turns a non-boolean for a boolean into false.

    Args:
        text: the generated text.
        tools: function name -> parameters schema (see `tools_by_name`); None accepts any function name and
            converts values without a schema.
        new_id: makes the id of each call.

    Returns:
        The content and the tool calls.
    """
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for kind, value in _Scanner(tools).advance(text, final=True):
        if kind == _TEXT:
            content.append(value)
        elif kind == _START:
            calls.append({"id": new_id(), "type": "function", "function": {"name": value, "arguments": ""}})
        else:
            calls[-1]["function"]["arguments"] += value
    return ParsedToolCalls("".join(content), calls)


class ToolCallStream:
    """`parse_tool_calls` for text that arrives in pieces, producing OpenAI `delta` objects.

    Each call is announced as soon as its name is complete with
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`; its
    arguments follow as `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`, one JSON
    fragment per parameter when the parameter closes and `}` when the call ends. Text outside calls comes
    as `{"content": text}`. Joined, the deltas equal `parse_tool_calls` of the joined input.
    """

    def __init__(self, tools: ToolSchemas | None, *, new_id: Callable[[], str] = make_tool_call_id) -> None:
        """Args:
        tools: as for `parse_tool_calls`.
        new_id: makes the id of each call.
        """
        self._scanner = _Scanner(tools)
        self._new_id = new_id
        self._calls: list[dict[str, Any]] = []

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls seen so far, arguments as streamed so far (complete after `finish`)."""
        return self._calls

    def feed(self, delta: str) -> list[dict[str, Any]]:
        """Take the next piece of text; return the deltas that can be sent now, in order."""
        return self._deltas(self._scanner.advance(delta, final=False))

    def finish(self) -> list[dict[str, Any]]:
        """End of generation: flush held text and close an unfinished call."""
        return self._deltas(self._scanner.advance("", final=True))

    def _deltas(self, events: list[_Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, value in events:
            if kind == _TEXT:
                if out and "content" in out[-1]:
                    out[-1]["content"] += value
                else:
                    out.append({"content": value})
            elif kind == _START:
                call = {"id": self._new_id(), "type": "function", "function": {"name": value, "arguments": ""}}
                self._calls.append(call)
                out.append({"tool_calls": [{"index": len(self._calls) - 1, **_copy_call(call)}]})
            else:
                self._calls[-1]["function"]["arguments"] += value
                last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
                if last is not None and "id" not in last:  # merge fragments, never into the announcement
                    last["function"]["arguments"] += value
                else:
                    out.append({"tool_calls": [{"index": len(self._calls) - 1, "function": {"arguments": value}}]})
        return out


def _copy_call(call: dict[str, Any]) -> dict[str, Any]:
    return {**call, "function": dict(call["function"])}


# ---------------------------------------------------------------------------------------------------------
# The scanner: a cursor over the text not yet consumed, deciding only what more text cannot change.

_TEXT, _START, _ARGUMENTS = "text", "start", "arguments"
_IN_TEXT, _IN_BODY, _AFTER_FUNCTION = "text", "body", "after_function"


class _Event(NamedTuple):
    kind: str  # _TEXT (content), _START (a call named `value`), _ARGUMENTS (a JSON fragment of its arguments)
    value: str


class _Scanner:
    """Turns text into events. `advance(final=False)` stops where more text could change a decision;
    `advance(final=True)` applies the end-of-text rules and consumes everything."""

    def __init__(self, tools: ToolSchemas | None) -> None:
        self._tools = tools
        self._text = ""
        self._pos = 0
        self._mode = _IN_TEXT
        self._after_call = False  # the text at _pos follows a call (for the whitespace rule)
        self._properties: Mapping[str, Any] | None = None  # schemas of the current call's parameters
        self._seen: set[str] = set()  # parameters of the current call already sent
        self._value_scan: tuple[int, int, int] | None = None  # unfinished value: (start, scanned up to, depth)

    def advance(self, delta: str, *, final: bool) -> list[_Event]:
        self._text += delta
        events: list[_Event] = []
        step = {_IN_TEXT: self._text_step, _IN_BODY: self._body_step, _AFTER_FUNCTION: self._after_function_step}
        while step[self._mode](events, final=final):
            pass
        # Keep only what is not consumed, so a long stream does not rescan its past.
        shift = self._pos
        self._text, self._pos = self._text[shift:], 0
        if self._value_scan is not None:
            start, scanned, depth = self._value_scan
            self._value_scan = (start - shift, scanned - shift, depth)
        return events

    # --- outside calls ---

    def _text_step(self, events: list[_Event], *, final: bool) -> bool:
        text, pos = self._text, self._pos
        start = text.find(TOOL_CALL_OPEN, pos)
        if start == -1:
            if final:
                if self._after_call and not text[pos:].strip(_WHITESPACE):
                    self._pos = len(text)  # whitespace after the last call
                else:
                    self._emit_text(events, len(text), keep_trailing_whitespace=True)
                return False
            self._emit_text(events, len(text) - _cut_tag_suffix(text, pos, (TOOL_CALL_OPEN,)))
            return False
        opening = self._call_opening(start, final=final)
        if opening is None:  # cannot tell yet whether this `<tool_call>` opens a call
            self._emit_text(events, start)
            return False
        if opening is False:  # a `<tool_call>` that is just text
            self._emit_text(events, start + len(TOOL_CALL_OPEN), keep_trailing_whitespace=True)
            return True
        name, body = opening
        self._emit_text(events, start)  # the whitespace before the call is skipped below
        events.append(_Event(_START, name))
        schema = self._tools.get(name) if self._tools is not None else None
        properties = schema.get("properties") if schema is not None else None
        self._properties = properties if isinstance(properties, Mapping) and properties else None
        self._seen = set()
        self._pos, self._mode = body, _IN_BODY
        return True

    def _emit_text(self, events: list[_Event], end: int, *, keep_trailing_whitespace: bool = False) -> None:
        """Emit text[_pos:end]; trailing whitespace stays unconsumed unless kept (it may precede a call)."""
        chunk = self._text[self._pos : end]
        if not keep_trailing_whitespace:
            chunk = chunk.rstrip(_WHITESPACE)
        if chunk:
            events.append(_Event(_TEXT, chunk))
            self._after_call = False
        self._pos += len(chunk)

    def _call_opening(self, start: int, *, final: bool) -> tuple[str, int] | Literal[False] | None:
        """At a `<tool_call>`: (name, body start) if it opens a known function, False if not, None if unsure."""
        text = self._text
        at = _skip_whitespace(text, start + len(TOOL_CALL_OPEN))
        if not text.startswith(FUNCTION_OPEN, at):
            return None if not final and _is_cut(text, at, FUNCTION_OPEN) else False
        name, end = _read_name(text, at + len(FUNCTION_OPEN))
        if name is None:
            return None if end == len(text) and not final else False
        if not name or (self._tools is not None and name not in self._tools):
            return False
        return name, end + 1

    # --- inside a call ---

    def _body_step(self, events: list[_Event], *, final: bool) -> bool:
        text = self._text
        at = _skip_whitespace(text, self._pos)
        if text.startswith(PARAMETER_OPEN, at):
            return self._parameter_step(events, at, final=final)
        if text.startswith(FUNCTION_CLOSE, at):
            self._pos, self._mode = at + len(FUNCTION_CLOSE), _AFTER_FUNCTION
            return True
        if text.startswith(TOOL_CALL_CLOSE, at):
            self._end_call(events, at + len(TOOL_CALL_CLOSE))
            return True
        if at == len(text) or any(_is_cut(text, at, tag) for tag in _BODY_TAGS):
            if final:
                self._end_call(events, len(text))  # cut off: drop the partial tag
            return False
        self._end_call(events, self._pos)  # unexpected text (or a new `<tool_call>`): it is not ours
        return True

    def _after_function_step(self, events: list[_Event], *, final: bool) -> bool:
        text = self._text
        at = _skip_whitespace(text, self._pos)
        if text.startswith(TOOL_CALL_CLOSE, at):
            self._end_call(events, at + len(TOOL_CALL_CLOSE))
            return True
        if at == len(text) or _is_cut(text, at, TOOL_CALL_CLOSE):
            if final:
                self._end_call(events, len(text))
            return False
        self._end_call(events, self._pos)  # `</tool_call>` missing
        return True

    def _end_call(self, events: list[_Event], resume: int) -> None:
        events.append(_Event(_ARGUMENTS, "}" if self._seen else "{}"))
        self._pos, self._mode, self._after_call = resume, _IN_TEXT, True

    def _parameter_step(self, events: list[_Event], at: int, *, final: bool) -> bool:
        text = self._text
        name, end = _read_name(text, at + len(PARAMETER_OPEN))
        if name is None and end == len(text):  # header cut off
            if final:
                self._end_call(events, len(text))
            return False
        if not name:  # a broken header: the call ends and the rest is content
            self._end_call(events, self._pos)
            return True
        start = end + 1
        if text.startswith("\n", start):  # format, not value (if it has not arrived, the next feed re-reads)
            start += 1
        found = self._value_end(start, name, final=final)
        if found is None:
            return False
        value_end, resume = found
        raw = text[start:value_end]
        if name not in self._seen:
            schema = self._properties.get(name) if self._properties is not None else None
            value = convert_value(raw[:-1] if raw.endswith("\n") else raw, schema)
            separator = ", " if self._seen else "{"
            self._seen.add(name)
            events.append(_Event(_ARGUMENTS, f"{separator}{_dumps(name)}: {_dumps(value)}"))
        self._pos = resume
        return True

    def _value_end(self, start: int, name: str, *, final: bool) -> tuple[int, int] | None:
        """Where the value starting at `start` ends and where scanning resumes; None if not known yet."""
        text = self._text
        pos, depth = start, 0
        if self._value_scan is not None and self._value_scan[0] == start:
            _, pos, depth = self._value_scan  # resume: a long value streamed in small pieces stays linear
        while (close := text.find(PARAMETER_CLOSE, pos)) != -1:
            nested = _find_line_start(text, PARAMETER_OPEN, pos, start)
            if nested != -1 and nested < close:
                if _read_name(text, nested + len(PARAMETER_OPEN))[0]:  # a well-formed `<parameter=NAME>`
                    depth += 1
                pos = nested + len(PARAMETER_OPEN)
                continue
            if depth:
                depth, pos = depth - 1, close + len(PARAMETER_CLOSE)  # closes a `<parameter=` inside the value
                continue
            verdict = _closes_value(text, close + len(PARAMETER_CLOSE), final=final)
            if verdict is None:
                self._value_scan = (start, close, depth)
                return None
            if verdict:
                self._value_scan = None
                return close, close + len(PARAMETER_CLOSE)
            pos = close + len(PARAMETER_CLOSE)
        if not final:
            self._value_scan = (start, *_scan_without_close(text, pos, depth, start))
            return None
        self._value_scan = None
        return self._value_end_without_close(start, name)

    def _value_end_without_close(self, start: int, name: str) -> tuple[int, int]:
        """End of text and no `</parameter>` closes the value: take the first boundary that could end it."""
        text = self._text
        cut = len(text) - _cut_tag_suffix(text, start, _CLOSING_TAGS)
        ends = [(cut, len(text))]
        pos = start
        while (nested := _find_line_start(text, PARAMETER_OPEN, pos, start)) != -1:
            other, _ = _read_name(text, nested + len(PARAMETER_OPEN))
            known = self._properties is None or other in self._properties
            if other and other != name and other not in self._seen and known:
                ends.append((nested, nested))
                break
            pos = nested + len(PARAMETER_OPEN)
        for tag, followers in ((FUNCTION_CLOSE, (TOOL_CALL_CLOSE,)), (TOOL_CALL_CLOSE, (TOOL_CALL_OPEN,))):
            pos = start
            while (found := text.find(tag, pos)) != -1:
                after = _skip_whitespace(text, found + len(tag))
                if after == len(text) or any(text.startswith(f, after) for f in followers):
                    ends.append((found, found))
                    break
                pos = found + len(tag)
        return min(ends)


def _scan_without_close(text: str, pos: int, depth: int, start: int) -> tuple[int, int]:
    """No `</parameter>` after `pos` yet: count the nested headers there and return (where to search next
    time, depth), so a long value fed in small pieces is scanned once."""
    while (nested := _find_line_start(text, PARAMETER_OPEN, pos, start)) != -1:
        name, end = _read_name(text, nested + len(PARAMETER_OPEN))
        if name is None and end == len(text):
            return nested, depth  # header not complete: read it again next time
        depth, pos = depth + bool(name), nested + len(PARAMETER_OPEN)
    # A tag that is cut at the end of the text starts at most len(tag) - 1 characters from it.
    return max(pos, len(text) - len(PARAMETER_CLOSE) + 1), depth


def _closes_value(text: str, after: int, *, final: bool) -> bool | None:
    """Whether the `</parameter>` ending at `after` closes the value: by what follows it (None: unsure)."""
    at = _skip_whitespace(text, after)
    if any(text.startswith(tag, at) for tag in _VALUE_FOLLOWERS):
        return True
    if text.startswith(PARAMETER_OPEN, at):
        name, end = _read_name(text, at + len(PARAMETER_OPEN))
        if name is None and end == len(text):
            return True if final else None
        return bool(name)
    if at == len(text) or any(_is_cut(text, at, tag) for tag in (PARAMETER_OPEN, *_VALUE_FOLLOWERS)):
        return True if final else None
    return False


def _read_name(text: str, start: int) -> tuple[str | None, int]:
    """A name from `start` up to `>`: (name, index of `>`), or (None, where it broke or len(text) if cut)."""
    match = _NAME.match(text, start)
    end = match.end() if match else start
    if end < len(text) and text[end] == ">":
        return text[start:end], end
    return None, end


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _is_cut(text: str, at: int, tag: str) -> bool:
    """Whether the text ends inside a `tag` starting at `at` (text[at:] is a proper prefix of it, maybe empty)."""
    return len(text) - at < len(tag) and tag.startswith(text[at:])


def _cut_tag_suffix(text: str, start: int, tags: Sequence[str]) -> int:
    """Length of the longest tail of text[start:] that is the start of one of `tags` (0 if none)."""
    longest = min(len(text) - start, max(map(len, tags)) - 1)
    for size in range(longest, 0, -1):
        tail = text[len(text) - size :]
        if any(tag.startswith(tail) for tag in tags):
            return size
    return 0


def _find_line_start(text: str, tag: str, pos: int, line_start: int) -> int:
    """First `tag` at or after `pos` that starts a line (or sits at `line_start`); -1 if none."""
    found = text.find(tag, pos)
    while found != -1 and found != line_start and text[found - 1] != "\n":
        found = text.find(tag, found + 1)
    return found


def _dumps(value: Any) -> str:  # noqa: ANN401
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------------------
# Values: the model writes strings as they are and everything else as JSON (or Python literals, as the
# official Qwen3.5 template renders scalars with `| string`: True, False, None).

_NOT_PARSED = object()
_JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array", "null"})


def convert_value(raw: str, schema: Any) -> Any:  # noqa: ANN401
    """Convert a parameter's text by its JSON schema; never raises, falls back to the text itself.

    string -> the text; integer / number -> the number (an integral float for an integer becomes an int);
    boolean -> true/false (also True/False); null (or a nullable type) -> None for null/None; object / array
    -> JSON, or a Python literal; a list of types or anyOf/oneOf -> the first type the value parses as, else
    the text if string is allowed. No schema, no usable type, or a parameter the schema does not list ->
    JSON if the text parses as JSON, else the text.

    Args:
        raw: the value as written, format newlines already removed.
        schema: the parameter's JSON schema, or None.

    Returns:
        A JSON-serialisable value.
    """
    types = schema_types(schema)
    stripped = raw.strip()
    if types is None or not types & _JSON_TYPES:
        parsed = _parse_json(stripped)
        return raw if parsed is _NOT_PARSED else parsed
    if "null" in types and stripped in ("null", "None"):
        return None
    wanted = types - {"null"}
    if wanted == STRING_ONLY:
        return raw
    if "boolean" in wanted and stripped in ("true", "false", "True", "False"):
        return stripped.lower() == "true"
    for parse in (_parse_json, _parse_python_literal):
        value = _as_type(parse(stripped), wanted)
        if value is not _NOT_PARSED:
            return value
    return raw


def _as_type(value: Any, wanted: frozenset[str]) -> Any:  # noqa: ANN401
    """`value` if its JSON type is one of `wanted` (an integral float counts as an integer), else _NOT_PARSED."""
    if value is _NOT_PARSED:
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {
        "string": isinstance(value, str),
        "integer": is_number and (isinstance(value, int) or value.is_integer()),
        "number": is_number,
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "null": value is None,
    }
    for name in ("boolean", "integer", "number", "string", "object", "array", "null"):
        if name in wanted and checks[name]:
            return int(value) if name == "integer" and "number" not in wanted else value
    return _NOT_PARSED


def _parse_json(text: str) -> Any:  # noqa: ANN401
    try:
        return json.loads(text, parse_constant=_reject, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return _NOT_PARSED


def _parse_python_literal(text: str) -> Any:  # noqa: ANN401
    # Only for containers a model wrote as a Python repr ({'a': True}); the result must be valid JSON.
    if not text.startswith(("{", "[")):
        return _NOT_PARSED
    try:
        value = ast.literal_eval(text)
        _dumps_strict(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_PARSED
    return value


def _dumps_strict(value: Any) -> str:  # noqa: ANN401
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _reject(constant: str) -> Any:  # noqa: ANN401
    raise ValueError(f"{constant} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a float")
    return value
