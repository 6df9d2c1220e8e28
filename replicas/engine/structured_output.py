"""Structured outputs: what a request constrains its output to, compiled once, enforced token by token.

Owns: the llguidance tokenizer built from tokenizer.json (`build_guidance_tokenizer`), `GrammarSpec` (JSON object,
JSON schema, regex, choice, Lark grammar, or a qwen3_coder tool call) built from OpenAI `response_format`, vLLM
`structured_outputs` and `tool_choice`, the bounds on every grammar input (a violation is a ValueError: HTTP 400 /
gRPC INVALID_ARGUMENT), `GrammarCache` (compile once, LRU, compile-time bound), `GrammarMatcher` (per-sequence
bitmask / accept / rollback) and `apply_bitmask` (pure torch).
Must not: import transformers or xgrammar (llguidance is Rust with no Python dependencies); sample
(model_shards/sampling.py samples from the logits `apply_bitmask` leaves).
Tests: tests/replicas/test_structured_output.py (random-token generation checked with jsonschema, re.fullmatch and
an independent qwen3_coder parser).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard

import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer as BackendTokenizer

from model_shards.sampling import apply_bitmask  # noqa: F401  # the mask's consumer lives with sampling
from replicas.engine.json_schema_types import schema_types

MODEL_VOCAB_SIZE = 248_320  # logits width; ids from the tokenizer's size up to here are padding, never allowed
KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "tool_call")

# Bounds on request inputs (reliability.md §1.3): sizes are UTF-8 bytes of the spec's payload.
MAX_SCHEMA_BYTES = 64 * 1024
MAX_REGEX_BYTES = 4 * 1024
MAX_CHOICES = 256
MAX_CHOICES_BYTES = 64 * 1024
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 64 * 1024
MAX_LARK_REGEX_OPERATORS = 8  # `&` / `~` in a user Lark grammar: 18 intersections already take seconds to compile
COMPILE_TIMEOUT_S = 5.0
MAX_CONCURRENT_COMPILES = 2
GRAMMAR_CACHE_ENTRIES = 128
_PAYLOAD_LIMITS = {
    "json_object": 0,
    "json_schema": MAX_SCHEMA_BYTES,
    "regex": MAX_REGEX_BYTES,
    "choice": MAX_CHOICES_BYTES,
    "grammar": MAX_GRAMMAR_BYTES,
    "tool_call": MAX_TOOLS_BYTES,
}

# JSON output: at most 40 whitespace characters between two JSON tokens (a newline and indentation), never the
# endless whitespace run an unbounded pattern lets a model fall into.
JSON_WHITESPACE_PATTERN = r"[\x20\x0A\x0D\x09]{0,40}"
# Non-string tool-call arguments are JSON written as the chat template writes them (json.dumps defaults).
TOOL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Reasoning: free text closed by the `</think>` token, then the blank line the chat template puts after it.
_THINK = r'/(?s:.*)/ </think> "\n\n"'
# A string argument is raw text up to "\n</parameter>\n" with no call markup in it, so no qwen3_coder parser can
# misread where it ends. Extra checks are intersected with this flat expression, never with a nested terminal:
# `.*` nested in an intersection with a counted repetition exhausts llguidance's lexer ("too many expressions").
_STRING_EXCLUSION = r"~/(?s:.*)(<\/parameter>|<parameter=|<\/function>|<\/?tool_call>)(?s:.*)/"
_PARAMETER_CLOSE = r'"\n</parameter>\n"'
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_PARAMETER_NAME = re.compile(r"[^\s<>{}\"']{1,256}")  # what replicas/api/tool_parser.py reads as a name
_CALL_MARKERS = ("</parameter>", "<parameter=", "</function>", "<tool_call>", "</tool_call>")
# Skips Lark strings, /regexes/ and comments; what is left of `&` and `~` (not `~ N` repetition) are regex operators.
_LARK_OPERATOR_SCAN = re.compile(r'"(?:\\.|[^"\\])*"|/(?:\\.|[^/\\\n])+/[a-z]*|//[^\n]*|#[^\n]*|&|~(?!\s*\d)')


class GrammarViolation(RuntimeError):
    """A sequence left its grammar: a disallowed token was accepted, or the grammar hit a runtime limit."""


class GrammarCompileBusy(RuntimeError):
    """Too many grammars are compiling at once; retry later (HTTP 503 / gRPC UNAVAILABLE, not a bad request)."""


# ----------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class GuidanceTokenizer:
    """The llguidance view of the checkpoint's tokenizer (building it takes about 1.5 s and 200 MB: one per replica).

    Attributes:
        ll: the llguidance tokenizer (token bytes, token trie).
        vocab_size: the model's vocabulary (logits width, 248320 for Qwen3.5); bitmasks have ceil(vocab_size/32) words.
        text_vocab_size: tokens the tokenizer knows (248077); ids from here to vocab_size are never allowed.
        eos_ids: the eos ids llguidance was built with (the model's defaults). A request's own eos ids replace them in
            `GrammarMatcher`, so one tokenizer serves every request.
    """

    ll: llguidance.LLTokenizer
    vocab_size: int
    text_vocab_size: int
    eos_ids: tuple[int, ...]


def build_guidance_tokenizer(
    path: str | Path, *, eos_ids: Sequence[int], vocab_size: int = MODEL_VOCAB_SIZE
) -> GuidanceTokenizer:
    """Build the llguidance tokenizer from a checkpoint's tokenizer.json (no transformers).

    Args:
        path: the checkpoint folder, or its tokenizer.json.
        eos_ids: the model's eos ids (generation_config.json's `eos_token_id`, e.g. (248046, 248044)).
        vocab_size: the model's vocabulary size (logits width), at least the tokenizer's size.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: no tokenizer.json there.
        ValueError: no eos id, an eos id outside the tokenizer, or a vocabulary smaller than the tokenizer.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}: structured outputs need the checkpoint's tokenizer")
    text = file.read_text(encoding="utf-8")
    text_vocab_size = BackendTokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    if text_vocab_size > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {text_vocab_size} tokens")
    eos = tuple(dict.fromkeys(int(e) for e in eos_ids))
    if not eos or not all(0 <= e < text_vocab_size for e in eos):
        raise ValueError(f"eos_ids must be one or more token ids below {text_vocab_size}, got {list(eos_ids)}")
    ll = llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos))
    return GuidanceTokenizer(ll=ll, vocab_size=vocab_size, text_vocab_size=text_vocab_size, eos_ids=eos)


# ----------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. Hashable: the `GrammarCache` key.

    kind and payload:
        json_object: "" (any JSON object).
        json_schema: the schema as compact JSON text; key order is kept (it is the order properties are written).
        regex: a regex in Rust `regex` syntax that the whole output matches (no look-around, no backreferences).
        choice: a JSON list of strings; the output is exactly one of them.
        grammar: a Lark grammar in llguidance syntax (`start` is the whole output).
        tool_call: compact JSON {"functions": [{"name", "parameters"}, ...], "parallel": bool}: the output is
            qwen3_coder tool calls and nothing else (see `from_tool_choice`).
    reasoning: the generation prompt leaves the model inside `<think>` (thinking on): the output first has free
        reasoning text closed by the `</think>` token and a blank line, and the constraint applies after it. Without
        it the constraint applies from the first generated token (thinking off, or reasoning handled elsewhere).
    JSON outputs allow at most 40 whitespace characters between JSON tokens. Eos (the request's eos ids) is allowed
    once the output is complete.
    """

    kind: str
    payload: str = ""
    reasoning: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.payload, str):
            raise ValueError(f"{self.kind}: the payload must be text, got {type(self.payload).__name__}")
        size, limit = len(self.payload.encode("utf-8")), _PAYLOAD_LIMITS[self.kind]
        if size > limit:
            raise ValueError(f"{self.kind} is {size} bytes, over the limit of {limit} bytes")
        if self.kind == "json_schema":
            schema = _parse_json(self.payload, "json_schema")
            if schema is False or not isinstance(schema, (dict, bool)):
                raise ValueError(f"json_schema must be a JSON object or true, got {self.payload[:100]}")
        elif self.kind == "choice":
            _check_choices(_parse_json(self.payload, "choice"))
        elif self.kind == "grammar":
            operators = sum(m.group() in ("&", "~") for m in _LARK_OPERATOR_SCAN.finditer(self.payload))
            if operators > MAX_LARK_REGEX_OPERATORS:
                raise ValueError(
                    f"grammar uses {operators} `&`/`~` regex operators, over the limit of "
                    f"{MAX_LARK_REGEX_OPERATORS} (they make compilation exponential)"
                )

    def with_reasoning(self, reasoning: bool = True) -> GrammarSpec:
        """The same constraint, applied after a reasoning block (see the class docstring)."""
        return replace(self, reasoning=reasoning)

    @classmethod
    def for_json_schema(cls, schema: Mapping[str, Any] | bool | str) -> GrammarSpec:
        """A JSON-schema spec from a schema (a mapping, a boolean schema, or its JSON text)."""
        return cls("json_schema", _schema_text(schema, "json_schema"))

    @classmethod
    def for_regex(cls, regex: str) -> GrammarSpec:
        """A spec whose output fully matches `regex`."""
        if not isinstance(regex, str):
            raise ValueError(f"regex must be a string, got {type(regex).__name__}")
        return cls("regex", regex)

    @classmethod
    def for_choice(cls, choices: Sequence[str]) -> GrammarSpec:
        """A spec whose output is exactly one of `choices`."""
        if isinstance(choices, str) or not isinstance(choices, Sequence):
            raise ValueError(f"choice must be a list of strings, got {type(choices).__name__}")
        if len(choices) > MAX_CHOICES:  # checked before serialising a huge list
            raise ValueError(f"choice has {len(choices)} entries, over the limit of {MAX_CHOICES}")
        _check_choices(list(choices))
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))

    @classmethod
    def for_grammar(cls, lark: str) -> GrammarSpec:
        """A spec from a Lark grammar in llguidance syntax."""
        if not isinstance(lark, str):
            raise ValueError(f"grammar must be a string, got {type(lark).__name__}")
        return cls("grammar", lark)

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> GrammarSpec | None:
        """The spec of an OpenAI `response_format`; None for absent or {"type": "text"}.

        {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}: only the schema shapes
        the grammar; `strict` is accepted and has no effect (constrained output always follows the schema).
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object")
        if kind == "json_schema":
            body = response_format.get("json_schema")
            if not isinstance(body, Mapping) or body.get("schema") is None:
                raise ValueError('response_format of type "json_schema" needs json_schema.schema (a JSON schema)')
            return cls("json_schema", _schema_text(body["schema"], "response_format.json_schema.schema"))
        raise ValueError(f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}')

    @classmethod
    def from_structured_outputs(cls, structured_outputs: Mapping[str, Any] | None) -> GrammarSpec | None:
        """The spec of vLLM's `structured_outputs` (exactly one of json, regex, choice, grammar, json_object).

        Keys set to None (or json_object false) are ignored; other keys (structural_tag, backend options) raise.
        """
        if structured_outputs is None:
            return None
        if not isinstance(structured_outputs, Mapping):
            raise ValueError(f"structured_outputs must be an object, got {type(structured_outputs).__name__}")
        given = {k: v for k, v in structured_outputs.items() if v is not None and (k, v) != ("json_object", False)}
        supported = ("json", "regex", "choice", "grammar", "json_object")
        unknown = sorted(set(given) - set(supported))
        if unknown:
            raise ValueError(f"structured_outputs: unsupported field(s) {unknown}; supported: {', '.join(supported)}")
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(supported)}, got {sorted(given)}")
        ((key, value),) = given.items()
        if key == "json":
            return cls.for_json_schema(value)
        if key == "regex":
            return cls.for_regex(value)
        if key == "choice":
            return cls.for_choice(value)
        if key == "grammar":
            return cls.for_grammar(value)
        if value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {value!r}")
        return cls("json_object")

    @classmethod
    def from_tool_choice(
        cls,
        tool_choice: str | Mapping[str, Any] | None,
        tools: Sequence[Mapping[str, Any]] | None,
        *,
        parallel_tool_calls: bool | None = None,
    ) -> GrammarSpec | None:
        """The spec that forces tool calls; None for tool_choice absent, "auto" or "none".

        The output is only calls in the qwen3_coder format the chat template renders, with no text before or after:
        `<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n...</function>\\n</tool_call>`,
        calls separated by "\\n", then eos. Parameters come in the order of the schema's `properties`; the
        required ones are present, others optional; no undeclared ones. A parameter whose types, null aside, are
        only string (as replicas/api/tool_parser.py reads them) is raw text without call markup; its top-level enum,
        const, pattern, minLength and maxLength are enforced (format and constraints inside anyOf branches are
        not). Every other parameter is JSON as the chat template writes it (", " and ": " separators) matching
        its sub-schema; the tool schema's `$defs` stay resolvable.

        Args:
            tool_choice: "required" (any of the tools, one or more calls unless parallel_tool_calls is false) or
                {"type": "function", "function": {"name": NAME}} (exactly one call of NAME).
            tools: the request's tools, [{"type": "function", "function": {"name", "parameters", ...}}].
            parallel_tool_calls: false allows a single call under "required".
        """
        if tool_choice is None or tool_choice in ("auto", "none"):
            return None
        functions = _functions(tools)
        if tool_choice == "required":
            chosen, parallel = functions, parallel_tool_calls is not False
        elif isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
            function = tool_choice.get("function")
            name = function.get("name") if isinstance(function, Mapping) else None
            chosen, parallel = [f for f in functions if f["name"] == name], False
            if not chosen:
                raise ValueError(
                    f"tool_choice names function {name!r}, which is not among the tools "
                    f"({', '.join(f['name'] for f in functions)})"
                )
        else:
            raise ValueError(
                f'tool_choice must be "auto", "none", "required" or {{"type": "function", '
                f'"function": {{"name": ...}}}}, got {tool_choice!r}'
            )
        return cls("tool_call", _compact_json({"functions": chosen, "parallel": parallel}, "tools"))


def _parse_json(text: str, what: str) -> Any:  # noqa: ANN401
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None


def _schema_text(schema: Any, what: str) -> str:  # noqa: ANN401
    if isinstance(schema, str):
        if len(schema.encode("utf-8")) > MAX_SCHEMA_BYTES:
            raise ValueError(f"{what} is over the limit of {MAX_SCHEMA_BYTES} bytes")
        schema = _parse_json(schema, what)
    if not isinstance(schema, (Mapping, bool)):
        raise ValueError(f"{what} must be a JSON object (or a boolean schema), got {type(schema).__name__}")
    text = _compact_json(schema, what)
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise ValueError(f"{what} is {len(text.encode('utf-8'))} bytes as JSON, over the limit of {MAX_SCHEMA_BYTES}")
    return text


def _compact_json(value: Any, what: str) -> str:  # noqa: ANN401
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"{what} cannot be written as JSON: {err}") from None


def _check_choices(choices: Any) -> None:  # noqa: ANN401
    if not isinstance(choices, list) or not choices:
        raise ValueError("choice must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise ValueError(f"choice has {len(choices)} entries, over the limit of {MAX_CHOICES}")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ValueError(f"choice entries must be strings, got {bad[0]!r}")


def _functions(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """[{"name", "parameters"}] of the request's tools, checked so that the call grammar can be written."""
    if not tools or isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError('tool_choice "required" or a named function needs a non-empty tools list')
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"{len(tools)} tools, over the limit of {MAX_TOOLS}")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name must be 1-128 characters of A-Z a-z 0-9 _ . : -, got {name!r}")
        parameters = function.get("parameters")
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        _check_parameters(parameters, f"tools[{i}] ({name})")
        functions.append({"name": name, "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return functions


def _check_parameters(parameters: Any, where: str) -> None:  # noqa: ANN401
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValueError(f"{where}: parameters must be a JSON schema of type object")
    properties = parameters.get("properties", {})
    if not isinstance(properties, Mapping):
        raise ValueError(f"{where}: parameters.properties must be an object")
    for arg, schema in properties.items():
        if not _PARAMETER_NAME.fullmatch(arg):
            raise ValueError(
                f"{where}: parameter name {arg!r} must be 1-256 characters without whitespace, quotes, braces, < or >"
            )
        if schema is False or not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"{where}: the schema of parameter {arg!r} must be an object or true")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}: parameters.required must be a list of names")
    missing = [r for r in required if r not in properties]
    if missing:
        raise ValueError(f"{where}: required parameters {missing} are not in parameters.properties")


# ----------------------------------------------------------------------------------------------- grammar text


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec: Lark text, or llguidance's JSON form when a user grammar needs wrapping.

    Raises:
        ValueError: the spec cannot be written as a grammar (e.g. a tool parameter schema of the wrong shape).
    """
    if spec.kind == "grammar":
        if not spec.reasoning:
            return spec.payload
        wrapper = {"lark_grammar": f"start: {_THINK} @body"}
        return json.dumps({"grammars": [wrapper, {"name": "body", "lark_grammar": spec.payload}]})
    if spec.kind in ("json_object", "json_schema"):
        schema = _parse_json(spec.payload, "json_schema") if spec.kind == "json_schema" else {"type": "object"}
        body = f"body: %json {_json_with_options(schema)}"
    elif spec.kind == "regex":
        body = f"body: /{llguidance.regex_to_lark(spec.payload, '')}/" if spec.payload else 'body: ""'
    elif spec.kind == "choice":
        body = "body: " + " | ".join(json.dumps(c) for c in json.loads(spec.payload))
    else:
        body = _tool_call_rules(json.loads(spec.payload))
    start = f"start: {_THINK} body" if spec.reasoning else "start: body"
    return f"%llguidance {{}}\n{start}\n{body}\n"


def _json_with_options(schema: Mapping[str, Any] | bool, options: Mapping[str, Any] | None = None) -> str:
    """Schema JSON text carrying llguidance options in "x-guidance"; by default the bounded whitespace."""
    schema = {} if schema is True else dict(schema)  # type: ignore[arg-type]  # False is refused in GrammarSpec
    user: Mapping[str, Any] = schema["x-guidance"] if isinstance(schema.get("x-guidance"), Mapping) else {}
    if options is None:  # the user's own whitespace choice wins; otherwise bounded whitespace
        options = (
            {}
            if {"whitespace_flexible", "whitespace_pattern"} & set(user)
            else {"whitespace_pattern": JSON_WHITESPACE_PATTERN}
        )
    schema["x-guidance"] = {**user, **options}
    return json.dumps(schema, ensure_ascii=False)


def _tool_call_rules(payload: Mapping[str, Any]) -> str:
    """Lark rules for `body`: qwen3_coder calls of the payload's functions (see `GrammarSpec.from_tool_choice`)."""
    rules = ['body: call ("\\n" call)*' if payload["parallel"] else "body: call"]
    functions = payload["functions"]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(functions))))
    for i, function in enumerate(functions):
        parameters = function["parameters"]
        required = set(parameters.get("required", []))
        defs = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
        parts = []
        for j, (arg, schema) in enumerate(parameters.get("properties", {}).items()):
            head = json.dumps(f"<parameter={arg}>\n", ensure_ascii=False)
            rules.append(f"p_{i}_{j}: {head} {_value_rule(schema, defs, f'{i}_{j}', rules)}")
            parts.append(f"p_{i}_{j}" + ("" if arg in required else "?"))
        head = json.dumps(f"\n<function={function['name']}>\n")
        rules.append(f'call_{i}: <tool_call> {head} {" ".join(parts)} "</function>\\n" </tool_call>')
    rules.append(f"STRING_VALUE: (/(?s:.*)/ & {_STRING_EXCLUSION}) {_PARAMETER_CLOSE}")
    return "\n".join(rules)


def _value_rule(schema: Mapping[str, Any] | bool, defs: Mapping[str, Any], tag: str, rules: list[str]) -> str:
    """The grammar item for one argument's value and its closing "\\n</parameter>\\n"; may append helper rules."""
    if schema is True or not _is_text_schema(schema):
        sub = {**defs, **schema} if isinstance(schema, Mapping) else {**defs}
        return f"%json {_json_with_options(sub, TOOL_JSON_OPTIONS)} {_PARAMETER_CLOSE}"
    literals = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if literals is not None:
        texts = [v for v in literals if isinstance(v, str)]
        bad = [v for v in texts if any(m in v for m in _CALL_MARKERS)]
        if not texts or bad:
            raise ValueError(f"tool parameter enum/const needs strings without tool-call markup, got {literals!r}")
        return f"({' | '.join(json.dumps(v) for v in texts)}) {_PARAMETER_CLOSE}"
    checks = _string_checks(schema)
    if not checks:
        return "STRING_VALUE"
    rules.append(f"V_{tag}: ({' & '.join(checks)} & {_STRING_EXCLUSION}) {_PARAMETER_CLOSE}")
    return f"V_{tag}"


def _is_text_schema(schema: Mapping[str, Any] | bool) -> TypeGuard[Mapping[str, Any]]:
    """Whether an argument is written as raw text: its types, null aside, are just string. Mirrors how
    replicas/api/tool_parser.py reads values (`type`, a list of types, anyOf/oneOf branches, a string-only enum)."""
    types = schema_types(schema)
    return types is not None and types - {"null"} == {"string"}


def _string_checks(schema: Mapping[str, Any]) -> list[str]:
    """Lark regexes for a raw-text argument's minLength / maxLength / pattern (JSON Schema: an unanchored search)."""
    checks = []
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if not isinstance(low, int) or not (high is None or isinstance(high, int) and high >= low >= 0):
        raise ValueError(f"tool parameter minLength/maxLength must be integers with min <= max, got {low!r}, {high!r}")
    if low or high is not None:
        checks.append(f"/(?s:.){{{low},{'' if high is None else high}}}/")
    pattern = schema.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str) or len(pattern.encode("utf-8")) > MAX_REGEX_BYTES:
            raise ValueError(f"tool parameter pattern must be a string of at most {MAX_REGEX_BYTES} bytes")
        anchored_end = pattern.endswith("$") and not pattern.endswith("\\$")
        head = "" if pattern.startswith("^") else "(?s:.*)"
        tail = "" if anchored_end else "(?s:.*)"
        core = pattern[1 if not head else 0 : len(pattern) - 1 if anchored_end else None]
        checks.append(f"/{head}(?:{llguidance.regex_to_lark(core, 'dw')}){tail}/")
    return checks


# ----------------------------------------------------------------------------------------------- compile + cache


class CompiledGrammar:
    """A spec compiled for one tokenizer: an llguidance matcher in its start state, copied for each sequence.

    Warning: the copies share llguidance's lexer (that is what makes them cheap). When one sequence drives it past a
    limit ("too many expressions constructed"), every sequence of this grammar fails from then on: its matcher sets
    `failure`, and `GrammarCache` compiles the spec afresh for later requests.
    """

    def __init__(
        self, spec: GrammarSpec, tokenizer: GuidanceTokenizer, template: llguidance.LLMatcher, compile_s: float
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.compile_s = compile_s  # construction plus the first mask (where llguidance builds its lexer)
        self.failure: str | None = None  # set by a GrammarMatcher whose llguidance state failed
        self._template = template
        self._lock = threading.Lock()

    def new_ll_matcher(self) -> llguidance.LLMatcher:
        """A fresh llguidance matcher in the start state (a cheap copy that shares the built lexer)."""
        with self._lock:
            return self._template.deep_copy()


def compile_grammar(
    spec: GrammarSpec, tokenizer: GuidanceTokenizer, limits: llguidance.LLParserLimits | None = None
) -> CompiledGrammar:
    """Compile a spec (no cache, no time bound: `GrammarCache.get` adds both).

    Args:
        spec: the spec.
        tokenizer: the llguidance tokenizer.
        limits: llguidance's parser and lexer bounds (fuel, lexer states, grammar size); None: its defaults.

    Raises:
        ValueError: llguidance rejected the grammar (bad schema, unsupported schema feature, bad regex, bad Lark,
            resource limits), naming the problem.
    """
    text = grammar_text(spec)
    if limits is None:  # llguidance's default bounds, with short messages (no parser state or grammar dump)
        limits = llguidance.LLParserLimits(verbose_errors=False)
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(tokenizer.ll, text, log_level=0, limits=limits)
    if not matcher.is_error():
        first = torch.empty((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(first.data_ptr(), first.numel() * 4)
    if matcher.is_error():
        raise ValueError(f"invalid {spec.kind}: {_short(matcher.get_error())}")
    return CompiledGrammar(spec, tokenizer, matcher, time.perf_counter() - start)


def _short(message: str, limit: int = 1000) -> str:
    message = message.replace("<non-verbose/>", "").strip()
    return message if len(message) <= limit else message[:limit] + " ..."


class GrammarCache:
    """Compiles each spec once; keeps the last `max_entries` results (failures too, so a bad or slow grammar is
    rejected at once when it comes back). Thread-safe; concurrent requests for one spec share one compile.

    Compilation runs on its own daemon thread (llguidance releases the GIL), at most `max_concurrent_compiles` at a
    time; a caller waits at most `compile_timeout_s`. A compile that overruns cannot be interrupted: it finishes in
    the background, its spec is cached as rejected, and it holds its compile slot until then.
    """

    def __init__(
        self,
        tokenizer: GuidanceTokenizer,
        *,
        max_entries: int = GRAMMAR_CACHE_ENTRIES,
        compile_timeout_s: float = COMPILE_TIMEOUT_S,
        max_concurrent_compiles: int = MAX_CONCURRENT_COMPILES,
        limits: llguidance.LLParserLimits | None = None,
    ) -> None:
        if max_entries < 1 or compile_timeout_s <= 0 or max_concurrent_compiles < 1:
            raise ValueError(
                f"GrammarCache needs max_entries >= 1, compile_timeout_s > 0, max_concurrent_compiles "
                f">= 1; got {max_entries}, {compile_timeout_s}, {max_concurrent_compiles}"
            )
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.compile_timeout_s = compile_timeout_s
        self._limits = limits
        self._entries: OrderedDict[GrammarSpec, CompiledGrammar | ValueError] = OrderedDict()
        self._pending: dict[GrammarSpec, Future] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrent_compiles)
        self.hits = 0
        self.compiles = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def compiles_in_flight(self) -> int:
        """Compiles still running (including ones their callers gave up on): a health / metrics signal."""
        with self._lock:
            return len(self._pending)

    def get(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of `spec`, compiling it on first use.

        Raises:
            ValueError: the grammar is invalid, or compiling it takes longer than compile_timeout_s.
            GrammarCompileBusy: max_concurrent_compiles compiles are already running.
        """
        with self._lock:
            entry = self._entries.get(spec)
            if isinstance(entry, CompiledGrammar) and entry.failure is not None:
                del self._entries[spec]  # its shared lexer is broken: compile afresh
                entry = None
            if entry is not None:
                self._entries.move_to_end(spec)
                self.hits += 1
                return _unwrap(entry)
            future = self._pending.get(spec)
            if future is None:
                if not self._slots.acquire(blocking=False):
                    raise GrammarCompileBusy(f"{len(self._pending)} grammars are compiling; retry shortly")
                future = self._pending[spec] = Future()
                self.compiles += 1
                threading.Thread(target=self._compile, args=(spec, future), name="grammar-compile", daemon=True).start()
        try:
            return _unwrap(future.result(timeout=self.compile_timeout_s))
        except FutureTimeout:
            raise ValueError(
                f"{spec.kind}: compiling took longer than {self.compile_timeout_s:g} s; simplify the {spec.kind}"
            ) from None

    def _compile(self, spec: GrammarSpec, future: Future) -> None:
        try:
            try:
                compiled = compile_grammar(spec, self.tokenizer, self._limits)
                result: CompiledGrammar | ValueError = compiled
                if compiled.compile_s > self.compile_timeout_s:
                    result = ValueError(
                        f"{spec.kind}: compiling took {compiled.compile_s:.1f} s, over the limit of "
                        f"{self.compile_timeout_s:g} s; simplify the {spec.kind}"
                    )
            except ValueError as err:
                result = err
            except BaseException as err:  # noqa: BLE001  # a bug, not a bad request: the callers see it, the cache keeps nothing
                with self._lock:
                    self._pending.pop(spec, None)
                future.set_exception(err)
                return
            with self._lock:
                self._pending.pop(spec, None)
                self._entries[spec] = result
                self._entries.move_to_end(spec)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
            future.set_result(result)
        finally:
            self._slots.release()


def _unwrap(entry: CompiledGrammar | ValueError) -> CompiledGrammar:
    if isinstance(entry, ValueError):
        raise ValueError(str(entry))
    return entry


# ----------------------------------------------------------------------------------------------- matching


class GrammarMatcher:
    """The grammar state of one generated sequence.

    Per step: `bitmask()` → `apply_bitmask(logits, mask)` → sample → `accept(token)`. When `is_terminated()` the
    sequence is complete: finish it (finish_reason "stop") without sampling again.
    NOTE: the request's eos ids replace the tokenizer's: they are allowed exactly when the output is complete, and
    the tokenizer's other eos ids are never allowed. With no eos ids the engine stops on `is_terminated()`.
    """

    def __init__(self, grammar: CompiledGrammar, *, eos_ids: Sequence[int]) -> None:
        tokenizer = grammar.tokenizer
        self.spec = grammar.spec
        self._grammar = grammar
        self._eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        if not all(0 <= e < tokenizer.text_vocab_size for e in self._eos_ids):
            raise ValueError(f"eos ids must be below {tokenizer.text_vocab_size}, got {list(eos_ids)}")
        self._ll_eos = frozenset(tokenizer.eos_ids)
        self._text_vocab_size = tokenizer.text_vocab_size
        self._words = (tokenizer.vocab_size + 31) // 32
        self._matcher = grammar.new_ll_matcher()
        self._eos_accepted = False
        self.num_accepted = 0
        self.last_mask_s = 0.0  # time of the last bitmask(); llguidance fuel does not bound every grammar's steps

    def bitmask(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens allowed next.

        Args:
            out: optional int32 CPU tensor [ceil(vocab_size/32)] to fill (e.g. a row of a batch mask).

        Returns:
            int32 [ceil(vocab_size/32)]: bit i (word i // 32, bit i % 32) set iff token i is allowed. All zero once
            terminated by eos.

        Raises:
            GrammarViolation: the grammar hit an llguidance limit at this step, or allows no token at all.
        """
        if out is None:
            out = torch.empty(self._words, dtype=torch.int32)
        elif (
            out.shape != (self._words,)
            or out.dtype != torch.int32
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous int32 CPU tensor [{self._words}], got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}"
            )
        if self._eos_accepted:
            return out.zero_()
        start = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), self._words * 4)
        self.last_mask_s = time.perf_counter() - start
        if self._matcher.is_error():
            raise self._failed()
        bits = out.numpy().view(np.uint32)
        _set_bits(bits, self._ll_eos, False)
        full, rest = divmod(self._text_vocab_size, 32)  # padding ids are never allowed, whatever the grammar says
        bits[full + (rest > 0) :] = 0
        if rest:
            bits[full] &= np.uint32((1 << rest) - 1)
        if self._matcher.is_accepting():
            _set_bits(bits, self._eos_ids, True)
        if not bits.any() and not self.is_terminated():
            raise GrammarViolation(f"{self.spec.kind} grammar allows no token here (only padding ids?)")
        return out

    def accept(self, token_id: int) -> None:
        """Advance by one sampled token.

        Raises:
            GrammarViolation: the token was not allowed (the bitmask was not applied, or the sequence terminated).
        """
        token_id = int(token_id)
        if self._eos_accepted:
            raise GrammarViolation(f"token {token_id} after eos: the {self.spec.kind} output is already complete")
        if token_id in self._eos_ids:
            if not self._matcher.is_accepting():
                raise GrammarViolation(f"eos token {token_id} before the {self.spec.kind} output is complete")
            self._eos_accepted = True
        elif (
            token_id in self._ll_eos
            or not 0 <= token_id < self._text_vocab_size
            or self._matcher.try_consume_tokens([token_id]) != 1
        ):
            if self._matcher.is_error():
                raise self._failed()
            raise GrammarViolation(f"token {token_id} is not allowed here by the {self.spec.kind} grammar")
        self.num_accepted += 1

    def _failed(self) -> GrammarViolation:
        message = _short(self._matcher.get_error())
        self._grammar.failure = message
        return GrammarViolation(f"the {self.spec.kind} constraint hit an llguidance limit: {message}")

    def is_terminated(self) -> bool:
        """True once eos was accepted, or when the output is complete and nothing but eos may follow."""
        return self._eos_accepted or (self._matcher.is_stopped() and not self._matcher.is_error())

    @property
    def allowed_eos(self) -> tuple[int, ...]:
        """The request's eos ids if the output is complete now (eos allowed), else ()."""
        return () if self._eos_accepted or not self._matcher.is_accepting() else self._eos_ids

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (eos included), e.g. rejected speculative tokens.

        Raises:
            ValueError: more tokens than were accepted.
        """
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.num_accepted} were accepted")
        ll_tokens = num_tokens
        if num_tokens and self._eos_accepted:  # eos never reached llguidance
            self._eos_accepted, ll_tokens = False, num_tokens - 1
        if ll_tokens and not self._matcher.rollback(ll_tokens):
            raise GrammarViolation(f"rollback of {ll_tokens} tokens failed: {_short(self._matcher.get_error())}")
        self.num_accepted -= num_tokens


def _set_bits(bits: np.ndarray, ids: Sequence[int] | frozenset[int], value: bool) -> None:
    for token_id in ids:
        word, bit = divmod(token_id, 32)
        if value:
            bits[word] |= np.uint32(1 << bit)
        else:
            bits[word] &= np.uint32(~(1 << bit) & 0xFFFFFFFF)
