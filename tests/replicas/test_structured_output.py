"""Structured outputs with the real Qwen3.5 tokenizer: random-token generation inside the grammar, checked by
independent oracles (jsonschema, re.fullmatch, ast, a small qwen3_coder parser written here), plus the bounds,
the cache and the matcher's bookkeeping. CPU only."""

from __future__ import annotations

import ast
import json
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from model_shards.tokenizer import Tokenizer
from replicas.engine.structured_output import (
    MAX_CHOICES,
    MAX_REGEX_BYTES,
    MAX_SCHEMA_BYTES,
    MODEL_VOCAB_SIZE,
    CompiledGrammar,
    GrammarCache,
    GrammarCompileBusy,
    GrammarMatcher,
    GrammarSpec,
    GrammarViolation,
    GuidanceTokenizer,
    apply_bitmask,
    build_guidance_tokenizer,
)

EOS = (248046, 248044)  # <|im_end|>, <|endoftext|> (generation_config.json)
TEXT_VOCAB = 248077
THINK_END = 248069
# Text the random sampler sometimes writes in one go (when its first token is allowed), so that strings, values
# and calls get closed; everything else is drawn uniformly among the allowed tokens.
SNIPPETS = ['"', "}", "]", ")", ",", "\n</parameter>\n", "</function>\n", "0", "7", "true", "null", " "]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "detailed": {"type": "boolean"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_db",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 40},
                    "filters": {"$ref": "#/$defs/filters"},
                    "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                },
                "required": ["query", "filters"],
                "$defs": {
                    "filters": {
                        "type": "object",
                        "properties": {
                            "year": {"type": "integer"},
                            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                        },
                        "required": ["year"],
                        "additionalProperties": False,
                    }
                },
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
SHAPE = {
    "anyOf": [
        {"type": "integer"},
        {
            "type": "object",
            "properties": {"kind": {"const": "point"}, "x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["kind", "x", "y"],
            "additionalProperties": False,
        },
    ]
}
LINKED = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
            },
            "required": ["value", "next"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(embedded_model_dir)


@pytest.fixture(scope="module")
def gtok(embedded_model_dir: Path) -> GuidanceTokenizer:
    return build_guidance_tokenizer(embedded_model_dir, eos_ids=EOS)


@pytest.fixture(scope="module")
def cache(gtok: GuidanceTokenizer) -> GrammarCache:
    return GrammarCache(gtok)


@pytest.fixture(scope="module")
def sampler(tokenizer: Tokenizer) -> RandomSampler:
    return RandomSampler(tokenizer)


class RandomSampler:
    """Draws random allowed tokens (fixed seed) with a bias towards eos, special tokens and closing snippets.

    Reads the bitmask with numpy (torch's elementwise kernels crawl on a loaded 2-core machine); `apply_bitmask`
    has its own tests."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.snippets = [tokenizer.encode(s) for s in SNIPPETS]

    def generate(
        self, grammar: CompiledGrammar, *, seed: int, eos_ids: tuple[int, ...] = EOS, max_tokens: int = 600
    ) -> tuple[str, list[int], GrammarMatcher]:
        gen = torch.Generator().manual_seed(seed)
        matcher = GrammarMatcher(grammar, eos_ids=eos_ids)
        ids: list[int] = []
        plan: list[int] = []
        while not matcher.is_terminated():
            assert len(ids) < max_tokens, f"no end after {max_tokens} tokens: {self.tokenizer.decode(ids)[-300:]!r}"
            allowed = np.unpackbits(matcher.bitmask().numpy().view(np.uint8), bitorder="little")
            padding = np.flatnonzero(allowed[TEXT_VOCAB:])
            assert not padding.size, f"padding ids allowed: {padding[:5] + TEXT_VOCAB}"
            token, plan = self._pick(allowed, matcher, plan, gen)
            matcher.accept(token)
            ids.append(token)
        text_ids = [t for t in ids if t not in eos_ids]
        assert len(text_ids) == len(ids) or (len(text_ids) == len(ids) - 1 and ids[-1] in eos_ids)
        return self.tokenizer.decode(text_ids), ids, matcher

    def _pick(
        self, allowed: np.ndarray, matcher: GrammarMatcher, plan: list[int], gen: torch.Generator
    ) -> tuple[int, list[int]]:
        def coin(p: float) -> bool:
            return torch.rand((), generator=gen).item() < p

        def one_of(items: Sequence) -> object:
            return items[int(torch.randint(len(items), (), generator=gen))]

        if matcher.allowed_eos and coin(0.5):
            return one_of(matcher.allowed_eos), []
        if plan and allowed[plan[0]]:
            return plan[0], plan[1:]
        special = [t for t in (np.flatnonzero(allowed[248044:TEXT_VOCAB]) + 248044).tolist() if t not in EOS]
        if special and coin(0.5):
            return one_of(special), []
        if coin(0.3):
            fitting = [s for s in self.snippets if allowed[s[0]]]
            if fitting:
                snippet = one_of(fitting)
                return snippet[0], snippet[1:]
        return int(one_of(np.flatnonzero(allowed))), []


# --------------------------------------------------------------------------- qwen3_coder oracle (independent)

_CALL = r"<tool_call>\n<function=([^>\n]+)>\n((?:<parameter=[^>\n]+>\n.*?\n</parameter>\n)*)</function>\n</tool_call>"
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>\n", re.S)


def parse_tool_calls(text: str) -> list[tuple[str, dict]]:
    """Calls in `text`, which must be nothing but calls separated by one newline."""
    assert re.fullmatch(f"{_CALL}(?:\n{_CALL})*", text, re.S), f"not a tool-call sequence: {text!r}"
    calls = []
    for match in re.finditer(_CALL, text, re.S):
        name, body = match.groups()
        params = list(_PARAM.finditer(body))
        assert "".join(m.group(0) for m in params) == body, f"bad parameters: {body!r}"
        calls.append((name, {m.group(1): m.group(2) for m in params}))
    return calls


def typed_arguments(raw: dict[str, str], parameters: dict) -> dict:
    """String-typed parameters keep their text; the others are JSON (the qwen3_coder convention)."""
    out = {}
    for name, value in raw.items():
        schema = parameters["properties"][name]
        is_text = schema.get("type") == "string" or ("type" not in schema and "enum" in schema)
        out[name] = value if is_text else json.loads(value)
    return out


def tool_parameters(name: str) -> dict:
    function = next(t["function"] for t in TOOLS if t["function"]["name"] == name)
    return function.get("parameters") or {"type": "object", "properties": {}}


# --------------------------------------------------------------------------- generation inside the grammar


@pytest.mark.parametrize("schema", [PERSON, SHAPE, LINKED], ids=["person", "any_of", "recursive_ref"])
def test_json_schema_outputs_validate(schema: dict, cache: GrammarCache, sampler: RandomSampler) -> None:
    grammar = cache.get(GrammarSpec.for_json_schema(schema))
    for seed in range(3):
        text, _, _ = sampler.generate(grammar, seed=seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_outputs_are_objects(cache: GrammarCache, sampler: RandomSampler) -> None:
    grammar = cache.get(GrammarSpec.from_response_format({"type": "json_object"}))
    for seed in range(2):
        text, _, _ = sampler.generate(grammar, seed=seed)
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize(
    "regex",
    [
        r"\d{3}-[a-z]{2,4}",
        r"(yes|no|maybe)!?",
        r"[A-Z][a-z]+( [A-Z][a-z]+){0,2}",
        r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?",
        r"héllo|wörld ☃",
        r"a/b",
    ],
)
def test_regex_outputs_fullmatch(regex: str, cache: GrammarCache, sampler: RandomSampler) -> None:
    grammar = cache.get(GrammarSpec.from_structured_outputs({"regex": regex}))
    for seed in range(3):
        text, _, _ = sampler.generate(grammar, seed=seed)
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_outputs_are_choices(cache: GrammarCache, sampler: RandomSampler) -> None:
    choices = ["yes", "no", "héllo ☃", 'say "hi"\n', ""]
    grammar = cache.get(GrammarSpec.from_structured_outputs({"choice": choices, "regex": None}))
    seen = {sampler.generate(grammar, seed=seed)[0] for seed in range(12)}
    assert seen <= set(choices) and len(seen) >= 3, seen


def test_lark_grammar_outputs_parse(cache: GrammarCache, sampler: RandomSampler) -> None:
    lark = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /0|[1-9][0-9]{0,2}/\n'
    grammar = cache.get(GrammarSpec.from_structured_outputs({"grammar": lark}))
    for seed in range(4):
        text, _, _ = sampler.generate(grammar, seed=seed)
        tree = ast.parse(text, mode="eval")  # only + - on integers: the oracle is Python's own parser
        ops = {type(node) for node in ast.walk(tree)} - {ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Constant}
        assert not ops and " " not in text, text


def test_reasoning_then_json(cache: GrammarCache, sampler: RandomSampler) -> None:
    spec = GrammarSpec.for_json_schema(SHAPE).with_reasoning()
    grammar = cache.get(spec)
    for seed in range(2):
        _, ids, _ = sampler.generate(grammar, seed=seed)
        assert ids.count(THINK_END) == 1
        answer = sampler.tokenizer.decode([t for t in ids[ids.index(THINK_END) + 1 :] if t not in EOS])
        assert answer.startswith("\n\n")
        jsonschema.validate(json.loads(answer), SHAPE)


def test_required_tool_calls_parse_and_validate(cache: GrammarCache, sampler: RandomSampler) -> None:
    grammar = cache.get(GrammarSpec.from_tool_choice("required", TOOLS))
    names = set()
    for seed in range(6):
        text, _, _ = sampler.generate(grammar, seed=seed, max_tokens=1500)
        for name, raw in parse_tool_calls(text):
            names.add(name)
            parameters = tool_parameters(name)
            jsonschema.validate(typed_arguments(raw, parameters), parameters)
    assert len(names) >= 2, names


def test_named_tool_call_is_one_call_of_it(cache: GrammarCache, sampler: RandomSampler) -> None:
    spec = GrammarSpec.from_tool_choice({"type": "function", "function": {"name": "search_db"}}, TOOLS)
    grammar = cache.get(spec)
    for seed in range(4):
        text, _, _ = sampler.generate(grammar, seed=seed, max_tokens=1500)
        ((name, raw),) = parse_tool_calls(text)
        assert name == "search_db"
        jsonschema.validate(typed_arguments(raw, tool_parameters(name)), tool_parameters(name))


def test_tool_calls_rendered_by_the_chat_template_are_accepted(tokenizer: Tokenizer, cache: GrammarCache) -> None:
    calls = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": {"city": "São Paulo\nBrazil", "days": 3, "unit": "celsius"},
            },
        },
        {
            "type": "function",
            "function": {
                "name": "search_db",
                "arguments": {"query": "rain", "filters": {"year": 2024, "tags": ["a", "b"]}, "code": "AB12"},
            },
        },
        {"type": "function", "function": {"name": "ping", "arguments": {}}},
    ]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prompt = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=False)
    rendered = prompt.split("</think>\n\n")[-1].removesuffix("<|im_end|>\n")
    matcher = GrammarMatcher(cache.get(GrammarSpec.from_tool_choice("required", TOOLS)), eos_ids=EOS)
    for token in tokenizer.encode(rendered):
        matcher.accept(token)
    assert matcher.allowed_eos == EOS
    assert [name for name, _ in parse_tool_calls(rendered)] == ["get_weather", "search_db", "ping"]


def test_single_call_when_parallel_tool_calls_is_false(tokenizer: Tokenizer, cache: GrammarCache) -> None:
    call = "<tool_call>\n<function=ping>\n</function>\n</tool_call>"
    grammar = cache.get(GrammarSpec.from_tool_choice("required", TOOLS, parallel_tool_calls=False))
    matcher = GrammarMatcher(grammar, eos_ids=EOS)
    for token in tokenizer.encode(call):
        matcher.accept(token)
    assert matcher.is_terminated() and matcher.allowed_eos == EOS


# --------------------------------------------------------------------------- validation and bounds


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GrammarSpec.for_json_schema({"type": "foo"}), "Invalid type"),
        (lambda: GrammarSpec.for_json_schema({"properties": 5}), "properties must be an object"),
        (lambda: GrammarSpec.for_json_schema({"type": "string", "format": "weird"}), "Unknown format"),
        (lambda: GrammarSpec.for_regex("(a"), "unclosed group"),
        (lambda: GrammarSpec.for_regex("a(?=b)"), "look-around"),
        (lambda: GrammarSpec.for_grammar("start: foo"), "unknown name"),
        (
            lambda: GrammarSpec.from_tool_choice(
                "required",
                [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": "a"}}},
                        },
                    }
                ],
            ),
            "invalid tool_call",
        ),
    ],
    ids=[
        "schema_type",
        "schema_properties",
        "schema_format",
        "regex_group",
        "regex_lookaround",
        "lark_name",
        "tool_schema",
    ],
)
def test_compile_errors_are_value_errors(make, message: str, cache: GrammarCache) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        cache.get(make())


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GrammarSpec.for_json_schema("{not json"), "not valid JSON"),
        (lambda: GrammarSpec.for_json_schema(5), "must be a JSON object"),
        (lambda: GrammarSpec.for_json_schema(False), "must be a JSON object or true"),
        (lambda: GrammarSpec("json_schema", "[1]"), "must be a JSON object or true"),
        (lambda: GrammarSpec.for_json_schema({"enum": ["x" * 1000] * 70}), f"limit of {MAX_SCHEMA_BYTES}"),
        (lambda: GrammarSpec.for_regex("a" * (MAX_REGEX_BYTES + 1)), f"limit of {MAX_REGEX_BYTES}"),
        (lambda: GrammarSpec.for_choice([]), "non-empty"),
        (lambda: GrammarSpec.for_choice(["x"] * (MAX_CHOICES + 1)), f"limit of {MAX_CHOICES}"),
        (lambda: GrammarSpec.for_choice(["a", 1]), "must be strings"),
        (lambda: GrammarSpec.for_grammar("start: X\n" + "// pad\n" * 10000), "over the limit"),
        (lambda: GrammarSpec.for_grammar("start: X\nX: " + " & ".join(["/a/"] * 12)), "regex operators"),
        (lambda: GrammarSpec("xml", "x"), "kind must be one of"),
        (lambda: GrammarSpec.from_response_format({"type": "xml"}), "response_format.type"),
        (
            lambda: GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}}),
            "json_schema.schema",
        ),
        (lambda: GrammarSpec.from_structured_outputs({"json": {}, "regex": "a"}), "exactly one"),
        (lambda: GrammarSpec.from_structured_outputs({"structural_tag": "x"}), "unsupported"),
        (lambda: GrammarSpec.from_tool_choice("required", None), "non-empty tools"),
        (
            lambda: GrammarSpec.from_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS),
            "not among the tools",
        ),
        (
            lambda: GrammarSpec.from_tool_choice(
                "required",
                [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {}, "required": ["x"]},
                        },
                    }
                ],
            ),
            "not in parameters.properties",
        ),
        (
            lambda: GrammarSpec.from_tool_choice(
                "required",
                [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a>b": {}}}},
                    }
                ],
            ),
            "parameter name",
        ),
        (
            lambda: GrammarSpec.from_tool_choice("required", [{"type": "function", "function": {"name": "a b"}}]),
            "function.name",
        ),
        (lambda: GrammarSpec.from_tool_choice("sometimes", TOOLS), "tool_choice must be"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_specs_raise_value_error(make, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=message):
        make()


def test_no_constraint_cases_return_none() -> None:
    assert GrammarSpec.from_response_format(None) is None
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_structured_outputs(None) is None
    assert GrammarSpec.from_tool_choice("auto", TOOLS) is None
    assert GrammarSpec.from_tool_choice("none", TOOLS) is None


def test_slow_compile_is_rejected_and_remembered(gtok: GuidanceTokenizer) -> None:
    cache = GrammarCache(gtok, compile_timeout_s=0.005, max_concurrent_compiles=1)
    slow = GrammarSpec.for_regex("(?:a{300}){300}")  # about 0.6 s: llguidance builds a huge lexer state
    with pytest.raises(ValueError, match="longer than"):
        cache.get(slow)
    with pytest.raises(GrammarCompileBusy):  # the slow compile still holds the only slot
        cache.get(GrammarSpec.for_regex("b"))
    deadline = time.monotonic() + 30
    while cache.compiles_in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(ValueError, match="compiling took"):  # cached as rejected: no second compile
        cache.get(slow)
    assert cache.compiles == 1


# --------------------------------------------------------------------------- cache


def test_cache_compiles_each_spec_once(gtok: GuidanceTokenizer) -> None:
    cache = GrammarCache(gtok)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    from_openai = GrammarSpec.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    from_vllm = GrammarSpec.from_structured_outputs({"json": json.dumps(schema)})
    assert from_openai == from_vllm and hash(from_openai) == hash(from_vllm)
    first = cache.get(from_openai)
    assert cache.get(from_vllm) is first and (cache.compiles, cache.hits) == (1, 1)
    assert cache.get(from_openai.with_reasoning()) is not first and cache.compiles == 2


def test_cache_lru_bound(gtok: GuidanceTokenizer) -> None:
    cache = GrammarCache(gtok, max_entries=2)
    a, b, c = (GrammarSpec.for_regex(r) for r in ("a+", "b+", "c+"))
    for spec in (a, b, c):
        cache.get(spec)
    assert len(cache) == 2 and cache.compiles == 3
    cache.get(c)
    assert cache.compiles == 3
    cache.get(a)  # evicted: compiled again
    assert cache.compiles == 4 and len(cache) == 2


def test_cache_concurrent_gets_share_one_compile(gtok: GuidanceTokenizer) -> None:
    cache = GrammarCache(gtok)
    spec = GrammarSpec.for_json_schema(PERSON)
    results: list[CompiledGrammar] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(spec))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(r is results[0] for r in results) and cache.compiles == 1


def test_grammar_broken_at_runtime_is_compiled_afresh(tokenizer: Tokenizer, gtok: GuidanceTokenizer) -> None:
    # `.*` nested inside an intersection with a counted repetition: llguidance's lexer runs out of expressions.
    lark = r"""start: "<p>\n" V
B: /(?s:.*)/ & ~/(?s:.*)(<\/parameter>|<parameter=|<\/function>|<\/?tool_call>)(?s:.*)/
V: (B & /(?s:.){0,40}/) "\n</parameter>\n"
"""
    cache = GrammarCache(gtok)
    spec = GrammarSpec.for_grammar(lark)
    broken = cache.get(spec)
    matcher = GrammarMatcher(broken, eos_ids=EOS)
    with pytest.raises(GrammarViolation, match="llguidance limit: lexer error"):
        for token in tokenizer.encode("<p>\n</parameter"):
            matcher.bitmask()
            matcher.accept(token)
        matcher.bitmask()
    assert broken.failure is not None
    assert cache.get(spec) is not broken and cache.compiles == 2


# --------------------------------------------------------------------------- matcher


def test_disallowed_tokens_and_early_eos_raise(tokenizer: Tokenizer, cache: GrammarCache) -> None:
    matcher = GrammarMatcher(cache.get(GrammarSpec.for_regex("ab")), eos_ids=EOS)
    with pytest.raises(GrammarViolation, match="eos token"):
        matcher.accept(EOS[0])
    with pytest.raises(GrammarViolation, match="not allowed"):
        matcher.accept(tokenizer.encode("x")[0])
    with pytest.raises(GrammarViolation, match="not allowed"):
        matcher.accept(248300)  # padding id
    for token in tokenizer.encode("ab"):  # still usable after a rejected token
        matcher.accept(token)
    assert matcher.is_terminated() and matcher.allowed_eos == EOS
    matcher.accept(EOS[1])
    assert matcher.is_terminated() and not matcher.bitmask().any()
    with pytest.raises(GrammarViolation, match="after eos"):
        matcher.accept(EOS[0])


def test_rollback_restores_masks(tokenizer: Tokenizer, cache: GrammarCache) -> None:
    matcher = GrammarMatcher(cache.get(GrammarSpec.for_json_schema(PERSON)), eos_ids=EOS)
    text = '{"name": "Ann", "age": 7, "address": {"zip": "12345"}}'
    masks = []
    for token in tokenizer.encode(text):
        masks.append(matcher.bitmask().clone())
        matcher.accept(token)
    masks.append(matcher.bitmask().clone())
    matcher.accept(EOS[0])
    assert matcher.is_terminated()
    matcher.rollback(1)  # the eos
    assert not matcher._eos_accepted and torch.equal(matcher.bitmask(), masks[-1])
    matcher.rollback(5)
    assert torch.equal(matcher.bitmask(), masks[-6]) and matcher.num_accepted == len(masks) - 6
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(matcher.num_accepted + 1)


def test_request_eos_ids_replace_the_tokenizer_eos(tokenizer: Tokenizer, cache: GrammarCache) -> None:
    matcher = GrammarMatcher(cache.get(GrammarSpec.for_choice(["ok"])), eos_ids=(248044,))
    assert not apply_bitmask(torch.zeros(MODEL_VOCAB_SIZE), matcher.bitmask()).isfinite()[list(EOS)].any()
    matcher.accept(tokenizer.encode("ok")[0])
    allowed = apply_bitmask(torch.zeros(MODEL_VOCAB_SIZE), matcher.bitmask()).isfinite()
    assert allowed.nonzero().flatten().tolist() == [248044] and matcher.allowed_eos == (248044,)
    with pytest.raises(GrammarViolation):
        matcher.accept(248046)
    no_eos = GrammarMatcher(cache.get(GrammarSpec.for_choice(["ok"])), eos_ids=())
    no_eos.accept(tokenizer.encode("ok")[0])
    assert no_eos.is_terminated() and not no_eos.bitmask().any()


def test_padding_ids_are_never_allowed(cache: GrammarCache) -> None:
    matcher = GrammarMatcher(cache.get(GrammarSpec.for_grammar('start: <[248300]> | "a"')), eos_ids=EOS)
    allowed = apply_bitmask(torch.zeros(MODEL_VOCAB_SIZE), matcher.bitmask()).isfinite()
    assert allowed.any() and not allowed[TEXT_VOCAB:].any()
    only_padding = GrammarMatcher(cache.get(GrammarSpec.for_grammar("start: <[248300]>")), eos_ids=EOS)
    with pytest.raises(GrammarViolation, match="allows no token"):
        only_padding.bitmask()


def test_apply_bitmask_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, words = 100, 4  # 28 columns past the logits width, and logits past nothing
    mask_BW = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    logits_BV = torch.randn(3, vocab, generator=gen)
    expected = logits_BV.clone()
    for b in range(3):
        for i in range(vocab):
            if not (int(mask_BW[b, i // 32]) >> (i % 32)) & 1:
                expected[b, i] = float("-inf")
    assert torch.equal(apply_bitmask(logits_BV.clone(), mask_BW), expected)
    assert torch.equal(apply_bitmask(logits_BV[1].clone(), mask_BW[1]), expected[1])
    wide = apply_bitmask(torch.zeros(200), torch.full((4,), -1, dtype=torch.int32))
    assert wide[:128].isfinite().all() and not wide[128:].isfinite().any()
