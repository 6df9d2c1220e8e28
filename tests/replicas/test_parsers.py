"""Known-answer tests for replicas/api/reasoning_parser.py and replicas/api/tool_parser.py.

Every expected result below is written by hand. Each case is also streamed cut at every position (short
texts: every single cut, every pair of cuts, one character at a time; long texts: random cuts with a fixed
seed), and the joined deltas must give the same hand-written answer. A last group renders assistant turns
with our chat template and parses them back (round trip).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import pytest

from model_shards.chat_template import ChatTemplate
from model_shards.tokenizer_files import chat_template_text
from replicas.api.reasoning_parser import ReasoningSplit, ReasoningStream, split_reasoning
from replicas.api.tool_parser import (
    ToolCallStream,
    convert_value,
    make_tool_call_id,
    parse_tool_calls,
    tools_by_name,
)

ID_PATTERN = re.compile(r"call_[0-9a-f]{24}")

TOOL_LIST = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "typed",
            "parameters": {
                "type": "object",
                "properties": {
                    "s": {"type": "string"},
                    "i": {"type": "integer"},
                    "n": {"type": "number"},
                    "b": {"type": "boolean"},
                    "z": {"type": "null"},
                    "o": {"type": "object"},
                    "a": {"type": "array", "items": {"type": "integer"}},
                    "ns": {"type": ["string", "null"]},
                    "ni": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                    "u": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "e": {"enum": ["1", "2"]},
                    "free": {},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
    {"type": "function", "function": {"name": "no_schema"}},
]
TOOLS = tools_by_name(TOOL_LIST)


def xml_call(name: str, *params: tuple[str, str]) -> str:
    """A call as the model writes it (input builder only; expected answers are written out)."""
    body = "".join(f"<parameter={key}>\n{raw}\n</parameter>\n" for key, raw in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# ---------------------------------------------------------------------------------------------------------
# Ways to cut a text into deltas


def every_cut(text: str) -> Iterator[list[str]]:
    """One piece, one character at a time, every single cut, and (for short texts) every pair of cuts."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    if len(text) <= 90:
        for i, j in itertools.combinations(range(1, len(text)), 2):
            yield [text[:i], text[i:j], text[j:]]


def random_cuts(text: str, *, tries: int = 30, seed: int = 0) -> Iterator[list[str]]:
    """Random pieces of 1 to 12 characters, with a fixed seed."""
    rng = random.Random(seed)
    for _ in range(tries):
        pieces, pos = [], 0
        while pos < len(text):
            size = rng.randint(1, 12)
            pieces.append(text[pos : pos + size])
            pos += size
        yield pieces


def cuts(text: str) -> Iterator[list[str]]:
    return every_cut(text) if len(text) <= 400 else itertools.chain([[text], list(text)], random_cuts(text))


# ---------------------------------------------------------------------------------------------------------
# Reasoning


def stream_reasoning(pieces: Sequence[str], *, thinking: bool) -> ReasoningSplit:
    stream = ReasoningStream(thinking=thinking)
    outs = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    return ReasoningSplit("".join(o.reasoning for o in outs), "".join(o.content for o in outs))


REASONING_CASES = [
    # id, text, thinking, expected reasoning, expected content
    ("close-then-answer", "Let me think.\n</think>\n\nThe answer is 4.", True, "Let me think.", "The answer is 4."),
    ("no-newlines", "R</think>A", True, "R", "A"),
    ("answer-keeps-inner-and-final-newlines", "R\n</think>\n\nline 1\n\nline 2\n", True, "R", "line 1\n\nline 2\n"),
    ("answer-keeps-leading-spaces", "R</think>\n  indented", True, "R", "  indented"),
    ("reasoning-keeps-inner-newlines", "a\n\nb\n\n</think>\n\nc", True, "a\n\nb", "c"),
    ("truncated", "Still thinking\nabout it\n", True, "Still thinking\nabout it\n", ""),
    ("truncated-inside-marker", "Thinking</thi", True, "Thinking</thi", ""),
    ("reopened", "<think>\nR\n</think>\n\nA", True, "\nR", "A"),
    ("reopened-midway", "a <think>b</think>c", True, "a b", "c"),
    ("second-close-is-content", "R</think>A</think>B", True, "R", "A</think>B"),
    ("think-in-content-kept", "R</think>A <think> B", True, "R", "A <think> B"),
    ("only-close", "</think>\n\n", True, "", ""),
    ("empty", "", True, "", ""),
    ("not-a-marker", "a </thinking> b", True, "a </thinking> b", ""),
    (
        "implicit-end-at-tool-call",
        "I will call it.\n\n<tool_call>\n<function=f>\n</function>\n</tool_call>",
        True,
        "I will call it.",
        "<tool_call>\n<function=f>\n</function>\n</tool_call>",
    ),
    ("tool-call-mentioned", "Use <tool_call> tags.\n</think>\n\nOK", True, "Use <tool_call> tags.", "OK"),
    ("tool-call-at-end-truncated", "Plan <tool_call>\n<func", True, "Plan <tool_call>\n<func", ""),
    ("tool-call-then-close", "a<tool_call>\n</think>b", True, "a<tool_call>", "b"),
    ("thinking-off", "Hello.\n</think>\n\nWorld <think>", False, "", "Hello.\n</think>\n\nWorld <think>"),
    ("thinking-off-empty", "", False, "", ""),
]


@pytest.mark.parametrize(
    ("text", "thinking", "reasoning", "content"),
    [case[1:] for case in REASONING_CASES],
    ids=[case[0] for case in REASONING_CASES],
)
def test_reasoning_known_answers_whole_and_streamed(text: str, thinking: bool, reasoning: str, content: str) -> None:
    expected = ReasoningSplit(reasoning, content)
    assert split_reasoning(text, thinking=thinking) == expected
    for pieces in cuts(text):
        assert stream_reasoning(pieces, thinking=thinking) == expected, pieces


def test_reasoning_stream_holds_back_partial_markers() -> None:
    stream = ReasoningStream(thinking=True)
    assert stream.feed("abc\n</thi") == ("abc", "")
    assert stream.feed("nk>\n") == ("", "")  # the newline after </think> may be followed by more
    assert stream.feed("\nX") == ("", "X")
    assert stream.feed("</think>") == ("", "</think>")
    assert stream.finish() == ("", "")


def test_reasoning_stream_holds_back_tool_call_until_function() -> None:
    stream = ReasoningStream(thinking=True)
    assert stream.feed("plan\n<tool_call>") == ("plan", "")
    assert stream.feed("\n<function=") == ("", "<tool_call>\n<function=")
    stream = ReasoningStream(thinking=True)
    assert stream.feed("plan <tool_call>") == ("plan ", "")
    assert stream.feed(" is a tag") == ("<tool_call> is a tag", "")


def test_reasoning_long_text_random_cuts() -> None:
    thought = "".join(f"step {i}: consider <b>{i}</b> and </thin k>\n" for i in range(60))
    text = f"{thought}\n</think>\n\nDone: {'x' * 300}"
    expected = ReasoningSplit(thought.rstrip("\n"), f"Done: {'x' * 300}")
    assert split_reasoning(text) == expected
    for pieces in random_cuts(text):
        assert stream_reasoning(pieces, thinking=True) == expected


# ---------------------------------------------------------------------------------------------------------
# Tool calls: helpers


class Call(NamedTuple):
    name: str
    arguments: dict[str, Any]


def calls_of(tool_calls: list[dict[str, Any]]) -> list[Call]:
    """Check the OpenAI shape of each call and return (name, parsed arguments)."""
    out = []
    for call in tool_calls:
        assert set(call) == {"id", "type", "function"}
        assert ID_PATTERN.fullmatch(call["id"]), call["id"]
        assert call["type"] == "function"
        assert set(call["function"]) == {"name", "arguments"}
        out.append(Call(call["function"]["name"], json.loads(call["function"]["arguments"])))
    return out


def stream_tools(pieces: Sequence[str], tools: Any) -> tuple[str, list[dict[str, Any]]]:  # noqa: ANN401
    """Feed pieces, check each delta's OpenAI shape, and join the deltas into (content, tool_calls)."""
    stream = ToolCallStream(tools)
    deltas = [delta for piece in pieces for delta in stream.feed(piece)] + stream.finish()
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        assert len(delta) == 1, delta
        if "content" in delta:
            assert isinstance(delta["content"], str) and delta["content"], delta
            content.append(delta["content"])
            continue
        (item,) = delta["tool_calls"]
        if "id" in item:  # the announcement: index, id, type, name, empty arguments
            assert item["index"] == len(calls), delta
            assert item["type"] == "function" and item["function"]["arguments"] == "", delta
            calls.append({"id": item["id"], "type": "function", "function": dict(item["function"])})
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}, delta
            assert item["index"] == len(calls) - 1 and item["function"]["arguments"], delta
            calls[-1]["function"]["arguments"] += item["function"]["arguments"]
    assert [call["function"]["arguments"] for call in stream.tool_calls] == [
        call["function"]["arguments"] for call in calls
    ]
    return "".join(content), calls


def check_tools(text: str, tools: Any, content: str, calls: list[Call]) -> None:  # noqa: ANN401
    parsed = parse_tool_calls(text, tools)
    assert parsed.content == content
    assert calls_of(parsed.tool_calls) == calls
    arguments = [call["function"]["arguments"] for call in parsed.tool_calls]
    for pieces in cuts(text):
        streamed_content, streamed_calls = stream_tools(pieces, tools)
        assert streamed_content == content, pieces
        assert [call["function"]["arguments"] for call in streamed_calls] == arguments, pieces
        assert calls_of(streamed_calls) == calls


# ---------------------------------------------------------------------------------------------------------
# Tool calls: well-formed


def test_one_call_with_text_before() -> None:
    text = (
        "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == "Let me check."
    assert parsed.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}
    check_tools(text, TOOLS, "Let me check.", [Call("get_weather", {"city": "Paris", "days": 3})])


def test_no_call_is_all_content() -> None:
    check_tools("Plain answer,\nno tools.\n", TOOLS, "Plain answer,\nno tools.\n", [])
    check_tools("  \n", TOOLS, "  \n", [])
    check_tools("", TOOLS, "", [])


def test_several_calls_and_text_around_them() -> None:
    first = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    second = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"
    calls = [Call("get_weather", {"city": "Paris"}), Call("get_weather", {"city": "Rome"})]
    check_tools(f"{first}\n{second}", TOOLS, "", calls)
    check_tools(f"\n\n{first}\n\n{second}\n", TOOLS, "", calls)
    check_tools(f"A\n{first}\nB\n{second}\nC\n", TOOLS, "A\nB\nC\n", calls)


def test_call_without_parameters() -> None:
    text = "<tool_call>\n<function=no_schema>\n</function>\n</tool_call>"
    assert parse_tool_calls(text, TOOLS).tool_calls[0]["function"]["arguments"] == "{}"
    check_tools(text, TOOLS, "", [Call("no_schema", {})])


def test_every_json_type() -> None:
    text = xml_call(
        "typed",
        ("s", "two\n  lines"),
        ("i", "-42"),
        ("n", "2.5e-3"),
        ("b", "true"),
        ("z", "null"),
        ("o", '{"k": [1, {"deep": null}], "t": true}'),
        ("a", "[1, 2, 3]"),
        ("ns", "null"),
        ("ni", "7"),
        ("u", "12"),
        ("e", "2"),
        ("free", '{"x": 1}'),
    )
    expected = {
        "s": "two\n  lines",
        "i": -42,
        "n": 0.0025,
        "b": True,
        "z": None,
        "o": {"k": [1, {"deep": None}], "t": True},
        "a": [1, 2, 3],
        "ns": None,
        "ni": 7,
        "u": 12,
        "e": "2",
        "free": {"x": 1},
    }
    check_tools(text, TOOLS, "", [Call("typed", expected)])


def test_string_keeps_text_except_one_format_newline_each_side() -> None:
    text = xml_call("typed", ("s", "\n  padded  \n"), ("ns", "null "), ("e", " 1"))
    check_tools(text, TOOLS, "", [Call("typed", {"s": "\n  padded  \n", "ns": None, "e": " 1"})])
    one_line = "<tool_call><function=typed><parameter=s>same line</parameter></function></tool_call>"
    check_tools(one_line, TOOLS, "", [Call("typed", {"s": "same line"})])
    empty = "<tool_call>\n<function=typed>\n<parameter=s>\n</parameter>\n</function>\n</tool_call>"
    check_tools(empty, TOOLS, "", [Call("typed", {"s": ""})])


def test_strings_that_look_like_other_types_stay_strings() -> None:
    text = xml_call("typed", ("s", "123"), ("e", "1"), ("u", "twelve"))
    check_tools(text, TOOLS, "", [Call("typed", {"s": "123", "e": "1", "u": "twelve"})])
    string_null = xml_call("typed", ("s", "null"))
    check_tools(string_null, TOOLS, "", [Call("typed", {"s": "null"})])


def test_quotes_backslashes_and_unicode_in_strings() -> None:
    raw = 'He said "hi" and \'bye\' \\n not a newline, tab\there, é 漢字 \u2028 {"a": 1}'
    text = xml_call("write_file", ("path", "/tmp/q.txt"), ("content", raw))
    parsed = parse_tool_calls(text, TOOLS)
    assert '"He said \\"hi\\" and' in parsed.tool_calls[0]["function"]["arguments"]
    assert "漢字" in parsed.tool_calls[0]["function"]["arguments"]  # not \\u-escaped
    check_tools(text, TOOLS, "", [Call("write_file", {"path": "/tmp/q.txt", "content": raw})])


def test_xml_inside_string_values() -> None:
    raw = "<b>bold</b> and </function> and <tool_call> and </parameter> mid-line\n</tool_call> too"
    text = xml_call("write_file", ("path", "a.html"), ("content", raw))
    check_tools(text, TOOLS, "", [Call("write_file", {"path": "a.html", "content": raw})])
    raw = "a</parameter>\n<parameter=not a name>\nb\n</parameter>\n<parameter=>\nc"
    text = xml_call("write_file", ("content", raw), ("path", "b.txt"))
    check_tools(text, TOOLS, "", [Call("write_file", {"content": raw, "path": "b.txt"})])


def test_a_whole_example_call_inside_a_string_value() -> None:
    example = (
        "Example:\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>\nend"
    )
    text = xml_call("write_file", ("content", example), ("path", "doc.md"))
    check_tools(text, TOOLS, "", [Call("write_file", {"content": example, "path": "doc.md"})])


def test_conversion_rules() -> None:
    schema = TOOLS["typed"]["properties"]
    assert convert_value("5.0", schema["i"]) == 5 and isinstance(convert_value("5.0", schema["i"]), int)
    assert convert_value("5", schema["n"]) == 5
    assert convert_value("abc", schema["i"]) == "abc"  # not a number: the text, never an error
    assert convert_value("True", schema["b"]) is True  # the official template writes Python scalars
    assert convert_value("False", schema["b"]) is False
    assert convert_value("yes", schema["b"]) == "yes"  # not coerced to false
    assert convert_value("None", schema["ni"]) is None
    assert convert_value("NaN", schema["n"]) == "NaN"  # JSON has no NaN
    assert convert_value("1e999", schema["n"]) == "1e999"
    assert convert_value("{'a': True, 'b': [1, None]}", schema["o"]) == {"a": True, "b": [1, None]}
    assert convert_value("{'a': {1, 2}}", schema["o"]) == "{'a': {1, 2}}"  # a set is not JSON
    assert convert_value("[1, 2", schema["a"]) == "[1, 2"
    assert convert_value('"quoted"', schema["u"]) == "quoted"
    assert convert_value("9" * 5000, schema["i"]) == "9" * 5000  # too long for int(): the text
    assert convert_value("42", None) == 42  # no schema: JSON when it parses
    assert convert_value("Paris", None) == "Paris"
    assert convert_value("[1]", {"type": "weird"}) == [1]  # unknown type name: as without a schema
    assert convert_value("x", {"$ref": "#/defs/X"}) == "x"


def test_unknown_parameter_and_schema_less_tool() -> None:
    text = xml_call("get_weather", ("city", "42"), ("extra", "42"), ("note", "free text"), ("opts", '{"a": [1]}'))
    expected = {"city": "42", "extra": 42, "note": "free text", "opts": {"a": [1]}}
    check_tools(text, TOOLS, "", [Call("get_weather", expected)])
    text = xml_call("no_schema", ("n", "1.5"), ("flag", "false"), ("s", "hello"))
    check_tools(text, TOOLS, "", [Call("no_schema", {"n": 1.5, "flag": False, "s": "hello"})])


def test_without_tool_list_any_function_is_accepted() -> None:
    text = xml_call("anything", ("x", "1"), ("y", "two"))
    check_tools(text, None, "", [Call("anything", {"x": 1, "y": "two"})])


def test_repeated_parameter_keeps_the_first_value() -> None:
    text = xml_call("get_weather", ("city", "Paris"), ("city", "Rome"))
    check_tools(text, TOOLS, "", [Call("get_weather", {"city": "Paris"})])


# ---------------------------------------------------------------------------------------------------------
# Tool calls: malformed or cut off (never raises; what is not a call is content)


MALFORMED_CASES = [
    # id, text, expected content, expected calls
    (
        "unknown-function-is-content",
        "Try:\n<tool_call>\n<function=launch>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
        "Try:\n<tool_call>\n<function=launch>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
        [],
    ),
    (
        "template-placeholder-name-is-content",
        "<tool_call>\n<function={{ name }}>\n</function>\n</tool_call>",
        "<tool_call>\n<function={{ name }}>\n</function>\n</tool_call>",
        [],
    ),
    ("tool-call-tag-in-text", "Wrap calls in <tool_call> tags.", "Wrap calls in <tool_call> tags.", []),
    ("cut-after-tool-call-tag", "Sure.\n<tool_call>", "Sure.\n<tool_call>", []),
    ("cut-in-function-name", "Sure.\n<tool_call>\n<function=get_wea", "Sure.\n<tool_call>\n<function=get_wea", []),
    ("cut-in-tool-call-tag", "Sure. <tool_ca", "Sure. <tool_ca", []),
    (
        "cut-after-function-name",
        "<tool_call>\n<function=get_weather>\n",
        "",
        [Call("get_weather", {})],
    ),
    (
        "cut-in-value",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        "",
        [Call("get_weather", {"city": "Par"})],
    ),
    (
        "cut-in-closing-parameter-tag",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</param",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "cut-in-parameter-name",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=da",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "cut-in-closing-function-tag",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</func",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "missing-closing-tool-call",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "missing-closing-function",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "missing-parameter-close-between-parameters",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n2\n</parameter>\n"
        "</function>\n</tool_call>",
        "",
        [Call("get_weather", {"city": "Paris", "days": 2})],
    ),
    (
        "missing-parameter-close-before-function-close",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
        "",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "missing-closing-tool-call-between-calls",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
        "",
        [Call("get_weather", {"city": "Paris"}), Call("get_weather", {"city": "Rome"})],
    ),
    (
        "new-call-inside-open-call",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
        "",
        [Call("get_weather", {"city": "Paris"}), Call("get_weather", {"city": "Rome"})],
    ),
    (
        "json-instead-of-parameters",
        '<tool_call>\n<function=get_weather>\n{"city": "Paris"}\n</function>\n</tool_call>',
        '\n{"city": "Paris"}\n</function>\n</tool_call>',
        [Call("get_weather", {})],
    ),
    (
        "broken-parameter-header",
        "<tool_call>\n<function=get_weather>\n<parameter=the city>\nParis\n</parameter>\n</function>\n</tool_call>",
        "\n<parameter=the city>\nParis\n</parameter>\n</function>\n</tool_call>",
        [Call("get_weather", {})],
    ),
    (
        "text-after-missing-closing-tool-call",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\nDone.",
        "\nDone.",
        [Call("get_weather", {"city": "Paris"})],
    ),
    (
        "literal-parameter-close-then-cut",
        "<tool_call>\n<function=write_file>\n<parameter=content>\na </parameter> b",
        "",
        [Call("write_file", {"content": "a </parameter> b"})],
    ),
]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [case[1:] for case in MALFORMED_CASES],
    ids=[case[0] for case in MALFORMED_CASES],
)
def test_malformed_known_answers_whole_and_streamed(text: str, content: str, calls: list[Call]) -> None:
    check_tools(text, TOOLS, content, calls)


def test_stream_never_sends_a_partial_tool_call_tag_as_content() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Answer <tool_c") == [{"content": "Answer"}]
    assert stream.feed("all>\n<func") == []
    (announce,) = stream.feed("tion=get_weather>\n<parameter=city>\nParis\n</parameter>\n")
    assert announce["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    # A parameter is sent once what follows its `</parameter>` shows that it really closed the value.
    assert stream.feed("<parameter=days>\n") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"'}}]}
    ]
    assert stream.feed("2\n</parameter>\n</function>\n</tool_call>") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ', "days": 2}'}}]}
    ]
    assert stream.finish() == []


def test_stream_announces_each_call_with_an_index() -> None:
    text = xml_call("get_weather", ("city", "Paris")) + "\n" + xml_call("no_schema")
    stream = ToolCallStream(TOOLS, new_id=iter(["call_a", "call_b"]).__next__)
    deltas = stream.feed(text) + stream.finish()
    announce_a = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    announce_b = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "no_schema", "arguments": ""}}
    assert deltas == [
        {"tool_calls": [announce_a]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]},
        {"tool_calls": [announce_b]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
    ]
    assert stream.tool_calls == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "no_schema", "arguments": "{}"}},
    ]


def test_long_value_random_cuts() -> None:
    code = "".join(f"def f{i}(x):\n    return '<tag>' + \"</b>\" + x  # </parameter> {i}\n" for i in range(300))
    text = "Writing it.\n\n" + xml_call("write_file", ("path", "big.py"), ("content", code))
    check_tools(text, TOOLS, "Writing it.", [Call("write_file", {"path": "big.py", "content": code})])


def test_ids_are_fresh() -> None:
    ids = {make_tool_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(ID_PATTERN.fullmatch(i) for i in ids)


def test_tools_by_name() -> None:
    assert set(TOOLS) == {"get_weather", "typed", "write_file", "no_schema"}
    assert TOOLS["no_schema"] == {}
    assert TOOLS["get_weather"]["properties"]["days"] == {"type": "integer"}
    assert tools_by_name(None) == {}
    with pytest.raises(ValueError, match="used twice"):
        tools_by_name([TOOL_LIST[0], TOOL_LIST[0]])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        tools_by_name([{"type": "function", "function": {"parameters": {}}}])
    with pytest.raises(ValueError, match=r"tools\[0\] must be"):
        tools_by_name([{"type": "custom", "custom": {"name": "x"}}])


# ---------------------------------------------------------------------------------------------------------
# Reasoning, then tool calls on the content


def pipeline_whole(text: str, *, thinking: bool) -> tuple[str, str, list[Call]]:
    split = split_reasoning(text, thinking=thinking)
    parsed = parse_tool_calls(split.content, TOOLS)
    return split.reasoning, parsed.content, calls_of(parsed.tool_calls)


def pipeline_streamed(pieces: Sequence[str], *, thinking: bool) -> tuple[str, str, list[Call]]:
    reasoning_stream, tool_stream = ReasoningStream(thinking=thinking), ToolCallStream(TOOLS)
    reasoning: list[str] = []
    deltas: list[dict[str, Any]] = []
    for out in [reasoning_stream.feed(piece) for piece in pieces] + [reasoning_stream.finish()]:
        reasoning.append(out.reasoning)
        deltas += tool_stream.feed(out.content)
    deltas += tool_stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return "".join(reasoning), content, calls_of(tool_stream.tool_calls)


PIPELINE_CASES = [
    # id, text, thinking, reasoning, content, calls
    (
        "think-then-call",
        "Need the weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
        "</parameter>\n</function>\n</tool_call>",
        True,
        "Need the weather.",
        "",
        [Call("get_weather", {"city": "Oslo"})],
    ),
    (
        "think-text-call",
        "Hm.\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
        "</parameter>\n</function>\n</tool_call>",
        True,
        "Hm.",
        "Checking.",
        [Call("get_weather", {"city": "Oslo"})],
    ),
    (
        "call-inside-thinking",
        "Hm.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
        True,
        "Hm.",
        "",
        [Call("get_weather", {"city": "Oslo"})],
    ),
    (
        "thinking-off-call",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "",
        [Call("get_weather", {"city": "Oslo"})],
    ),
    ("thinking-off-answer", "Just an answer.", False, "", "Just an answer.", []),
    ("truncated-thinking", "Hmm, <tool_call> maybe", True, "Hmm, <tool_call> maybe", "", []),
]


@pytest.mark.parametrize(
    ("text", "thinking", "reasoning", "content", "calls"),
    [case[1:] for case in PIPELINE_CASES],
    ids=[case[0] for case in PIPELINE_CASES],
)
def test_reasoning_then_tools(text: str, thinking: bool, reasoning: str, content: str, calls: list[Call]) -> None:
    expected = (reasoning, content, calls)
    assert pipeline_whole(text, thinking=thinking) == expected
    for pieces in cuts(text):
        assert pipeline_streamed(pieces, thinking=thinking) == expected, pieces


# ---------------------------------------------------------------------------------------------------------
# Round trip through our chat template


ROUND_TRIP_ARGUMENTS: list[tuple[str, dict[str, Any]]] = [
    ("get_weather", {"city": "São Paulo", "days": 3, "unit": "c"}),
    (
        "typed",
        {
            "s": 'line one\n  <b>two</b> </parameter> "q"\n',
            "i": 0,
            "n": -1.25,
            "b": False,
            "z": None,
            "o": {"nested": {"list": [1, "two", None, True]}, "empty": {}},
            "a": [],
            "ns": None,
            "u": "text",
            "free": [{"k": "v"}],
        },
    ),
    ("write_file", {"path": "x.py", "content": "print('hi')\n"}),
    ("no_schema", {}),
]


@pytest.mark.parametrize("content", ["I'll look these up.", ""], ids=["with-content", "no-content"])
@pytest.mark.parametrize("json_string_arguments", [False, True], ids=["dict-args", "string-args"])
def test_template_round_trip(content: str, json_string_arguments: bool) -> None:
    assistant = {
        "role": "assistant",
        "content": content,
        "reasoning_content": "Several tools are needed.",
        "tool_calls": [
            {
                "id": f"call_{index}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args) if json_string_arguments else args},
            }
            for index, (name, args) in enumerate(ROUND_TRIP_ARGUMENTS)
        ],
    }
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Do it."}, assistant]
    prompt = ChatTemplate(chat_template_text()).render(messages, tools=TOOL_LIST, add_generation_prompt=False)
    # What the model generated: the assistant turn after the `<think>\n` the generation prompt opened.
    turn = prompt.split("<|im_start|>assistant\n")[-1]
    assert turn.startswith("<think>\n") and turn.endswith("<|im_end|>\n")
    generated = turn[len("<think>\n") : -len("<|im_end|>\n")]
    split = split_reasoning(generated, thinking=True)
    parsed = parse_tool_calls(split.content, TOOLS)
    assert split.reasoning == "Several tools are needed."
    assert parsed.content == content
    assert calls_of(parsed.tool_calls) == [Call(name, args) for name, args in ROUND_TRIP_ARGUMENTS]
    for pieces in random_cuts(generated, tries=10):
        assert pipeline_streamed(pieces, thinking=True) == (
            "Several tools are needed.",
            content,
            [Call(name, args) for name, args in ROUND_TRIP_ARGUMENTS],
        )
