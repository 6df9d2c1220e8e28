"""Fuzzing the public APIs (docs/reliability.md goal R6): no input may produce a server error.

HTTP: Schemathesis 4 cases from the app's OpenAPI document (`APIOperation.as_strategy`, positive and
negative modes, Hypothesis `derandomize` so every run sends the same cases), checked with
`not_a_server_error` plus conformance to the documented statuses, content types and bodies, and
`negative_data_rejection` (what the document forbids must be refused). gRPC: Hypothesis strategies
over the proto fields (random strings, out-of-range numbers, token ids, nested chat messages, tools
with random JSON schemas, response formats); allowed status codes are the documented ones, never
INTERNAL / UNKNOWN, and UNAVAILABLE only without a group failure: the group's epoch must not move over the
whole run (no client input may fail a step). Hostile shapes (issue 12): JSON nested past the depth cap,
lone UTF-16 surrogates, non-numeric strings and NaN / Infinity in numeric fields must all be a 400 with
the error body; raw and mutated bytes on gRPC must be INVALID_ARGUMENT or parse. A canary completion must
succeed every CANARY_EVERY cases and after each fuzz run (a wedged engine with a green /health is a failure too).
The app is small on purpose (max_model_len 256, default_max_tokens 2, max_n 2) so cases stay cheap.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402  # after the importorskip
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from replicas.api.grpc_client import EpserveClient  # noqa: E402
from replicas.api.ingress import build_api  # noqa: E402
from replicas.proto import epserve_pb2 as pb  # noqa: E402

pytestmark = pytest.mark.timeout(900)

APP, PREFIX, KEY, MODEL = "fuzz", "/fuzz", "fuzz-key", "fuzz-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
HTTP_CASES = int(os.environ.get("EPSERVE_FUZZ_CASES", "100"))  # Hypothesis examples per operation and mode
HTTP_CASES_NO_INPUT = 20  # positive cases of an operation without inputs: the same request each time
GRPC_CASES = HTTP_CASES  # per RPC
HOSTILE_CASES = 2 * HTTP_CASES // 3  # hostile HTTP shapes; raw gRPC bytes per RPC
CANARY_EVERY = 100
MAX_MODEL_LEN = 256
HTTP_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
GRPC_ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)

# (api, operation) -> Counter of outcomes (HTTP status or gRPC code name); printed by the canary tests.
STATS: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
REJECTED: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)  # 400 by param


@pytest.fixture(scope="module")
def fuzz_app(serve_ports, embedded_model_dir: Path):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    http, grpc_target = serve_ports
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name=MODEL,
        dtype="float32",
        num_kv_blocks=64,
        block_size=16,
        max_num_seqs=8,
        max_model_len=MAX_MODEL_LEN,
        default_max_tokens=2,
        max_n=2,
        api_key=KEY,
        collective_deadline_s=30,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    client = EpserveClient(grpc_target, api_key=KEY, application=APP, timeout_s=60)
    yield SimpleNamespace(
        base=http + PREFIX, client=client, engine=serve.get_deployment_handle("EpserveEngine", app_name=APP)
    )
    client.close()
    serve.delete(APP)


def http_canary(base: str) -> None:
    r = requests.post(
        base + "/v1/completions",
        headers=AUTH,
        timeout=60,
        json={"model": MODEL, "prompt": "canary", "max_tokens": 1, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def grpc_canary(client: EpserveClient) -> None:
    out = client.complete(text="canary", max_tokens=1, temperature=0)
    assert len(out.token_ids) == 1 and out.finish_reason


def group_epoch(fuzz_app) -> int:  # noqa: ANN001
    """Bumped by every group rebuild: stays 0 while no input has failed a step."""
    return fuzz_app.engine.group_epoch.remote().result()


def _report(api: str) -> str:
    rows = [
        f"{op}: {sum(c.values())} cases {dict(sorted(c.items(), key=str))}\n"
        f"    400 by param: {dict(REJECTED[(a, op)].most_common(8))}"
        for (a, op), c in sorted(STATS.items())
        if a == api
    ]
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- HTTP


def test_openapi_document_describes_every_route() -> None:
    """Every route of build_api() is documented, every POST has a JSON body schema, and the document is valid
    OpenAPI 3.1 with every $ref resolving (no pydantic `$defs` left behind)."""
    from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

    api = build_api()
    doc = api.openapi()
    errors = [str(e) for e in OPENAPI_31_VALIDATOR.iter_errors(doc)]
    assert errors == []
    text = json.dumps(doc)
    assert "$defs" not in text
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in doc["components"]["schemas"], ref
    for route in api.routes:
        if route.path == api.openapi_url:
            continue
        for method in route.methods - {"HEAD"}:
            op = doc["paths"][route.path][method.lower()]
            assert "200" in op["responses"], (method, route.path)
            if route.path != "/health":
                assert "401" in op["responses"], (method, route.path)
            if method == "POST":
                assert op["requestBody"]["required"] is True
                assert "application/json" in op["requestBody"]["content"]
                assert "400" in op["responses"]
    assert doc["paths"]["/health"]["get"]["security"] == []


# The document the app serves is built by build_api() without a replica (test_served_document_is_this_one
# checks that), so the operations are known at collection time and each (operation, mode) is its own test.
# Cases come from `APIOperation.as_strategy` under our own @given: schemathesis' pytest plugin
# (`@schema.parametrize`, `from_fixture`) does not name or run items correctly on pytest 9.2 (`_nodeid`).
HTTP_SCHEMA = schemathesis.openapi.from_dict(
    build_api().openapi(), config=schemathesis.Config.from_dict({"generation": {"allow-x00": True}})
)
HTTP_OPERATIONS = [r.ok() for r in HTTP_SCHEMA.get_all_operations()]
# Negative mode needs something to negate: a body, or the Authorization header of the bearer scheme.
HTTP_RUNS = [
    (op.label, mode)
    for op in HTTP_OPERATIONS
    for mode in ("positive", "negative")
    if mode == "positive" or op.body or op.definition.raw.get("security") != []
]


def test_served_document_is_this_one(fuzz_app) -> None:  # noqa: ANN001
    served = requests.get(fuzz_app.base + "/openapi.json", headers=AUTH, timeout=30).json()
    assert served.pop("servers") == [{"url": PREFIX}]
    assert served == json.loads(json.dumps(build_api().openapi()))


VOCAB = 248320  # the embedded model's


def _valid_message(message: Any) -> bool:  # noqa: ANN401  # a generated JSON value
    from pydantic import ValidationError

    from replicas.api.openai_protocol import ChatMessage

    try:
        ChatMessage.model_validate(message)
    except ValidationError:
        return False
    return True


def _ids(values: list[int]) -> list[int]:
    return [t % VOCAB for t in values] or [9707]


def plausible(body: dict[str, Any]) -> dict[str, Any]:
    """A positive-mode body nudged past the checks the schema cannot express (served model, renderable
    messages, ids inside the vocabulary, cross-field rules, this server's max_n and context), so the other
    generated fields (sampling, stop, tools, formats, template kwargs) reach rendering, grammars and the engine.
    """
    b = dict(body)
    b["model"] = MODEL
    if isinstance(b.get("messages"), list):
        b["messages"] = [m if _valid_message(m) else {"role": "user", "content": "hi"} for m in b["messages"]] or [
            {"role": "user", "content": "hi"}
        ]
    prompt = b.get("prompt")
    if isinstance(prompt, list):
        if not prompt:
            b["prompt"] = "hi"
        elif all(isinstance(x, int) for x in prompt):
            b["prompt"] = _ids(prompt)
        elif all(isinstance(x, list) for x in prompt):
            b["prompt"] = [_ids(x) for x in prompt][:2]
    if isinstance(b.get("tokens"), list):
        b["tokens"] = _ids(b["tokens"])
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(b.get(field), int):
            b[field] = b[field] % 8 + 1
    if isinstance(b.get("min_tokens"), int):
        b["min_tokens"] = min(b["min_tokens"], 1)
    if isinstance(b.get("n"), int):
        b["n"] = b["n"] % 2 + 1
    if isinstance(b.get("stop_token_ids"), list):
        b["stop_token_ids"] = _ids(b["stop_token_ids"])[:64]
    if isinstance(b.get("stop"), list):
        b["stop"] = [x for x in b["stop"] if 0 < len(x) <= 256][:16] or None
    for field in ("suffix", "best_of"):
        b.pop(field, None)
    if b.get("echo") and b.get("stream"):
        b["echo"] = False
    if b.get("top_logprobs") is not None and "messages" in b:
        b["logprobs"] = True
    return b


@pytest.mark.parametrize("label,mode", HTTP_RUNS, ids=[f"{label}-{mode}" for label, mode in HTTP_RUNS])
def test_http_fuzz(fuzz_app, label: str, mode: str) -> None:  # noqa: ANN001
    """Generated requests (valid and invalid) never get a 5xx, and responses match the document.

    Operations with a body get the right key (the body is what is fuzzed); the others keep the generated
    Authorization header in negative mode, which fuzzes the auth check itself. Half the positive bodies go
    through `plausible` first.
    """
    operation = HTTP_SCHEMA.find_operation_by_label(label)
    generation = schemathesis.GenerationMode(mode)
    positive = generation == schemathesis.GenerationMode.POSITIVE
    counter = STATS[("http", f"{label} {mode}")]
    headers = AUTH if operation.body or positive else None

    @settings(max_examples=HTTP_CASES if operation.body or not positive else HTTP_CASES_NO_INPUT, **SETTINGS)
    @given(case=operation.as_strategy(generation_mode=generation), nudge=st.booleans())
    def run(case: Any, nudge: bool) -> None:  # noqa: ANN401  # schemathesis.Case
        if positive and isinstance(case.body, dict):
            if nudge:
                case.body = plausible(case.body)
            elif "model" in case.body:
                case.body["model"] = MODEL  # a random name is a 404 before anything else
            for field in ("max_tokens", "max_completion_tokens"):  # output length is not what is fuzzed here:
                value = case.body.get(field)  # keep the 400s of values past the context, shorten the rest
                if isinstance(value, int) and 8 < value < MAX_MODEL_LEN:
                    case.body[field] = value % 8 + 1
        try:
            response = case.call_and_validate(base_url=fuzz_app.base, headers=headers, checks=HTTP_CHECKS, timeout=60)
        except BaseException:
            counter["FAILED"] += 1
            raise
        counter[response.status_code] += 1
        if response.status_code == 400:
            REJECTED[("http", f"{label} {mode}")][response.json()["error"]["param"]] += 1
        if sum(counter.values()) % CANARY_EVERY == 0:
            http_canary(fuzz_app.base)

    run()


# What the fuzzers found (shrunk), kept as fixed cases: (id, path, body, allowed statuses).
FINDINGS = [
    # 500: TokenizeRequest allowed what the ChatCompletionRequest it is rendered through rejects.
    ("tokenize-empty-messages", "/tokenize", {"messages": []}, {400}),
    (
        "tokenize-huge-template-kwargs",
        "/tokenize",
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"k": "x" * 5000}},
        {400},
    ),
    # 503 and the whole expert-parallel group failed: logits / 5e-324 -> inf, no finite sampling candidate
    # (IndexError in the trunk rank's sampler).
    (
        "repetition-penalty-denormal",
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": "\u00dd\u00ea\u00e4",
            "frequency_penalty": 1.8,
            "ignore_eos": True,
            "max_tokens": 2,
            "repetition_penalty": 5e-324,
            "top_k": 2,
        },
        {400},
    ),
    (
        "temperature-denormal",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "temperature": 5e-324, "top_k": 2, "max_tokens": 2},
        {200},
    ),
    (
        "temperature-1e-40-chat",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 1e-40, "max_tokens": 2},
        {200},
    ),
    # A grammar that is complete while min_tokens still bans eos: every logit is -inf.
    (
        "grammar-complete-under-min-tokens",
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": "hi",
            "structured_outputs": {"choice": ["a"]},
            "min_tokens": 3,
            "max_tokens": 4,
            "temperature": 1.0,
        },
        {200, 400},
    ),
    # Accepted although the document says integer (pydantic's lax coercion): the models are strict now.
    ("detokenize-bool-token", "/detokenize", {"tokens": [True]}, {400}),
    ("completion-string-temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "0.5"}, {400}),
]


@pytest.mark.parametrize("name,path,body,allowed", FINDINGS, ids=[f[0] for f in FINDINGS])
def test_fuzz_findings_stay_fixed(
    fuzz_app,  # noqa: ANN001
    name: str,
    path: str,
    body: dict,
    allowed: set[int],
) -> None:
    r = requests.post(fuzz_app.base + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code in allowed, (r.status_code, r.text[:500])
    http_canary(fuzz_app.base)


# ------------------------------------------------------------------ hostile shapes (HTTP), issue 12 item 5

HOSTILE_BASES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    "/tokenize": {"prompt": "hi"},
}
NUMERIC_FIELDS = {
    "/v1/chat/completions": [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "min_tokens",
        "top_logprobs",
    ],
    "/v1/completions": [
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "n",
        "logprobs",
        "seed",
        "best_of",
        "repetition_penalty",
    ],
    "/tokenize": [],
}
DEEP = "__DEEP__"
# Where a hostile value goes: a body field, or a place inside the messages / tools / formats.
SLOTS = {
    "/v1/chat/completions": [
        "messages.0.content",
        "metadata",
        "user",
        "response_format",
        "tools",
        "chat_template_kwargs",
        "stop",
        "messages.0.name",
        "structured_outputs",
    ],
    "/v1/completions": ["prompt", "metadata", "user", "stop", "structured_outputs"],
    "/tokenize": ["prompt", "chat_template_kwargs"],
}
non_numeric = st.one_of(
    st.sampled_from(
        ["abc", "nan", "NaN", "inf", "-inf", "1e999", "", " 1", "0x10", "1_000", "\u0031", "true", "null", "٣"]
    ),
    st.text(max_size=8),
)
lone_surrogates = st.builds(
    lambda pre, s, post: pre + s + post, st.text(max_size=5), st.characters(categories=["Cs"]), st.text(max_size=5)
)


def _deep_json(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * depth + "1" + closer * depth


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """(path, raw JSON body, shape): one hostile value in an otherwise valid body; every shape is a 400."""
    path = draw(st.sampled_from(sorted(HOSTILE_BASES)))
    body = json.loads(json.dumps(HOSTILE_BASES[path]))
    shapes = ["deep", "surrogate", "nan-literal"] + (["non-numeric"] if NUMERIC_FIELDS[path] else [])
    shape = draw(st.sampled_from(shapes))
    deep_text = None
    if shape == "non-numeric":
        body[draw(st.sampled_from(NUMERIC_FIELDS[path]))] = draw(non_numeric)
    elif shape == "nan-literal":
        field = draw(st.sampled_from(NUMERIC_FIELDS[path] or ["prompt"]))
        body[field] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    else:
        slot = draw(st.sampled_from(SLOTS[path]))
        if shape == "deep":
            value: Any = DEEP
            depth = draw(st.one_of(st.integers(130, 3000), st.just(100_000)))
            deep_text = _deep_json(depth, draw(st.sampled_from(["[", '{"a":'])))
        else:
            value = draw(lone_surrogates)
        if slot.startswith("messages.0."):
            body["messages"][0][slot.split(".")[-1]] = value
        elif slot in ("response_format", "structured_outputs", "chat_template_kwargs", "metadata"):
            body[slot] = (
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [value]}}}
                if slot == "response_format"
                else {"k": value}
            )
        elif slot == "tools":
            body[slot] = [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"p": {"description": value}}},
                    },
                }
            ]
        elif slot == "stop":
            body[slot] = [value]
        else:
            body[slot] = value
    raw = json.dumps(body, allow_nan=True)  # ensure_ascii: surrogates travel as \udXXX escapes
    if deep_text is not None:
        raw = raw.replace(json.dumps(DEEP), deep_text)
    return path, raw.encode(), shape


def test_http_hostile_shapes_fuzz(fuzz_app) -> None:  # noqa: ANN001
    """Deep nesting, lone surrogates, non-numeric strings and NaN / Infinity in numeric fields, anywhere in a
    valid body: a 400 with the OpenAI error body every time (never a 500, never served)."""
    epoch = group_epoch(fuzz_app)

    @settings(max_examples=HOSTILE_CASES, **SETTINGS)
    @given(case=hostile_bodies())
    @example(case=("/v1/completions", b'{"model": "fuzz-tiny", "prompt": "\\ud800"}', "surrogate"))
    @example(case=("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "deep"))
    def run(case: tuple[str, bytes, str]) -> None:
        path, raw, shape = case
        counter = STATS[("http", f"hostile {shape}")]
        r = requests.post(
            fuzz_app.base + path, data=raw, timeout=60, headers={**AUTH, "Content-Type": "application/json"}
        )
        counter[r.status_code] += 1
        assert r.status_code == 400, (path, shape, r.status_code, r.text[:300], raw[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err

    run()
    http_canary(fuzz_app.base)
    assert group_epoch(fuzz_app) == epoch


def test_http_canary_after_fuzzing(fuzz_app) -> None:  # noqa: ANN001
    http_canary(fuzz_app.base)
    print("\nHTTP fuzz cases per operation and mode:\n" + _report("http"))
    for label, mode in HTTP_RUNS:
        if label.startswith("POST") or mode == "negative":
            counter = STATS[("http", f"{label} {mode}")]
            assert sum(counter.values()) >= HTTP_CASES, (label, mode, counter)
    r = requests.get(fuzz_app.base + "/health", timeout=30)
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------------------- gRPC

# Each strategy mixes a plausible branch (reaches rendering, grammars, generation) with a wild one (random
# strings, out-of-range numbers, malformed JSON), so both the deep paths and the validation are exercised.
U32 = 2**32 - 1
small_u32 = st.one_of(st.integers(0, 4), st.integers(0, U32))
texts = st.text(max_size=40)
words = st.text(alphabet="abcdefghij XYZ", min_size=1, max_size=20)
names = st.one_of(st.sampled_from(["get_weather", "search", "f"]), st.text(max_size=12))


def _json_values() -> st.SearchStrategy:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )


REGEXES = st.one_of(
    st.sampled_from(
        [
            "[a-z]{1,5}",
            "(yes|no)",
            "\\d{3}-\\d{4}",
            "(a+)+$",
            "(a|aa)*b",
            ".*",
            "[",
            "a{1000000}",
            "((a*)*)*",
            "(?=a)",
            "\\",
            "[^\\x00-\\x{10FFFF}]",
            "a{2,1}",
            "(?P<x>a)(?P=x)",
            "&~",
            "",
        ]
    ),
    st.text(alphabet="ab()[]{}*+?|^$\\.-,0123456789&~", max_size=20),
)

PLAIN_SCHEMAS = st.sampled_from(
    [
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}},
        {"type": "object", "properties": {}},
        {"type": "string", "pattern": "[a-z]{1,3}"},
        True,
    ]
)


def _json_schemas() -> st.SearchStrategy:
    """Dicts built from JSON-Schema keywords with random (often wrong) values, nested."""
    types = st.one_of(
        st.sampled_from(["object", "string", "integer", "number", "boolean", "array", "null"]),
        st.lists(st.sampled_from(["string", "integer", "null", "bogus"]), max_size=3),
        _json_values(),
    )

    def node(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.fixed_dictionaries(
            {},
            optional={
                "type": types,
                "properties": st.dictionaries(st.text(max_size=8), children, max_size=3),
                "required": st.one_of(st.lists(st.text(max_size=8), max_size=3), _json_values()),
                "items": children,
                "enum": st.lists(_json_values(), max_size=3),
                "const": _json_values(),
                "pattern": REGEXES,
                "minLength": st.integers(-5, 2**40),
                "maxLength": st.integers(-5, 2**40),
                "minimum": _json_values(),
                "maximum": _json_values(),
                "anyOf": st.lists(children, max_size=3),
                "oneOf": st.lists(children, max_size=2),
                "allOf": st.lists(children, max_size=2),
                "$ref": st.sampled_from(["#", "#/$defs/x", "#/definitions/y", "http://example.invalid/s.json"]),
                "$defs": st.dictionaries(st.sampled_from(["x", "z"]), children, max_size=1),
                "additionalProperties": st.one_of(st.booleans(), children),
                "format": st.text(max_size=10),
                "minItems": st.integers(-5, 2**40),
                "maxItems": st.integers(-5, 2**40),
            },
        )

    return st.recursive(st.one_of(st.booleans(), node(st.just({}))), node, max_leaves=6)


json_texts = st.one_of(
    PLAIN_SCHEMAS.map(json.dumps),
    _json_schemas().map(json.dumps),
    _json_values().map(json.dumps),
    texts,
    st.just(""),
    # hostile JSON text (issue 12): past the depth cap, lone surrogate escapes
    st.integers(129, 5000).map(lambda d: _deep_json(d, '{"a":')),
    lone_surrogates.map(lambda s: json.dumps({"type": "string", "enum": [s]})),
)
object_schemas = st.one_of(
    PLAIN_SCHEMAS.filter(lambda x: isinstance(x, dict) and x["type"] == "object"),
    _json_schemas().map(lambda x: {**x, "type": "object"} if isinstance(x, dict) else x),
)
parameters_json = st.one_of(object_schemas.map(json.dumps), json_texts)

plain_sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2, width=32),
        "top_p": st.floats(0.125, 1, width=32),
        "top_k": st.integers(-1, 50),
        "seed": st.integers(0, 2**31),
        "max_tokens": st.integers(1, 3),
        "ignore_eos": st.booleans(),
        "stop": st.lists(words, max_size=3),
        "n": st.integers(0, 2),
        "logprobs": st.integers(0, 3),
    },
).map(lambda kw: pb.SamplingParams(**kw))
wild_sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(width=32),
        "top_p": st.floats(width=32),
        "top_k": st.integers(-(2**31), 2**31 - 1),
        "min_p": st.floats(width=32),
        "presence_penalty": st.floats(width=32),
        "frequency_penalty": st.floats(width=32),
        "repetition_penalty": st.floats(width=32),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "max_tokens": st.one_of(st.integers(0, 6), st.integers(0, U32)),
        "min_tokens": small_u32,
        "stop": st.lists(texts, max_size=20),
        "stop_token_ids": st.lists(small_u32, max_size=70),
        "ignore_eos": st.booleans(),
        "n": st.one_of(st.integers(0, 3), st.integers(0, U32)),
        "logprobs": st.one_of(st.integers(0, 25), st.integers(0, U32)),
        "skip_special_tokens": st.booleans(),
    },
).map(lambda kw: pb.SamplingParams(**kw))
sampling = st.one_of(st.just(pb.SamplingParams(max_tokens=1)), plain_sampling, wild_sampling)

images = st.builds(
    pb.Image, data=st.binary(max_size=64), mime_type=st.one_of(st.sampled_from(["image/png", "image/jpeg", ""]), texts)
)
parts = st.one_of(st.builds(pb.ContentPart, text=texts), st.builds(pb.ContentPart, image=images))
tool_calls = st.builds(pb.ToolCall, id=texts, name=names, arguments=st.one_of(st.just('{"city": "Paris"}'), json_texts))
plain_messages = st.one_of(
    st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "developer"]), content=words),
    st.builds(
        pb.ChatMessage, role=st.just("assistant"), content=words, reasoning_content=st.one_of(st.just(""), words)
    ),
    st.builds(pb.ChatMessage, role=st.just("assistant"), tool_calls=st.lists(tool_calls, min_size=1, max_size=2)),
    st.builds(pb.ChatMessage, role=st.just("tool"), content=words, tool_call_id=words),
    st.builds(pb.ChatMessage, role=st.just("user"), parts=st.lists(parts, min_size=1, max_size=2)),
)
wild_messages = st.builds(
    pb.ChatMessage,
    role=st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), texts),
    content=texts,
    parts=st.lists(parts, max_size=3),
    tool_calls=st.lists(tool_calls, max_size=2),
    tool_call_id=texts,
    reasoning_content=texts,
    name=texts,
)
conversations = st.one_of(
    st.lists(plain_messages, min_size=1, max_size=3).map(lambda m: [pb.ChatMessage(role="user", content="hi"), *m]),
    st.lists(st.one_of(plain_messages, wild_messages), max_size=4),
)
models = st.one_of(st.just(""), st.just(MODEL), texts)
token_ids = st.lists(st.one_of(st.integers(0, 248319), st.integers(0, U32)), max_size=20)
tools = st.one_of(
    st.just([]),
    st.lists(
        st.builds(
            pb.Tool,
            name=st.sampled_from(["get_weather", "search", "f"]),
            description=words,
            parameters_json=parameters_json,
        ),
        max_size=3,
        unique_by=lambda t: t.name,
    ),
    st.lists(st.builds(pb.Tool, name=names, description=texts, parameters_json=json_texts), max_size=3),
)
response_formats = st.one_of(
    st.just(pb.ResponseFormat()),
    st.builds(pb.ResponseFormat, json_object=st.booleans()),
    st.builds(pb.ResponseFormat, json_schema=json_texts),
    st.builds(pb.ResponseFormat, regex=REGEXES),
    st.builds(
        pb.ResponseFormat, choice=st.one_of(st.lists(words, min_size=1, max_size=4), st.lists(texts, max_size=5))
    ),
    st.builds(
        pb.ResponseFormat,
        json_object=st.booleans(),
        json_schema=json_texts,
        regex=REGEXES,
        choice=st.lists(texts, max_size=3),
    ),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=draw(models), sampling=draw(sampling))
    kind = draw(st.sampled_from(["token_ids", "text", "messages", None]))
    if kind == "token_ids":
        req.token_ids.ids.extend(draw(token_ids))
    elif kind == "text":
        req.text = draw(st.text(max_size=200))
    elif kind == "messages":
        req.messages.messages.extend(draw(conversations))
    return req


@st.composite
def chat_requests(draw: st.DrawFn) -> pb.ChatRequest:
    tool_list = draw(tools)
    tool_choice = draw(
        st.one_of(
            st.sampled_from(["", "auto", "none", "required"]),
            names,
            st.sampled_from([t.name for t in tool_list] or [""]),
        )
    )
    req = pb.ChatRequest(
        model=draw(models),
        messages=draw(conversations),
        sampling=draw(sampling),
        tools=tool_list,
        tool_choice=tool_choice,
        response_format=draw(response_formats),
    )
    thinking = draw(st.one_of(st.none(), st.booleans()))
    if thinking is not None:
        req.enable_thinking = thinking
    return req


def _call_grpc(fuzz_app, rpc: str, request: Any) -> None:  # noqa: ANN001, ANN401  # a proto request
    counter = STATS[("grpc", rpc)]
    stub = fuzz_app.client.stub
    try:
        list(getattr(stub, rpc)(request, timeout=60, metadata=fuzz_app.client.metadata))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    counter[code.name] += 1
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        REJECTED[("grpc", rpc)][re.sub(r"[^a-z_ .]", "", details.split(":")[0].lower())[:40]] += 1
    assert code in GRPC_ALLOWED, f"{rpc} -> {code.name}: {details}\nrequest: {request}"
    if code == grpc.StatusCode.UNAVAILABLE:
        print(f"UNAVAILABLE from {rpc}: {details}")
    if sum(counter.values()) % CANARY_EVERY == 0:
        grpc_canary(fuzz_app.client)


def test_grpc_generate_fuzz(fuzz_app) -> None:  # noqa: ANN001
    @settings(max_examples=GRPC_CASES, **SETTINGS)
    @given(request=generate_requests())
    @example(
        request=pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=1e-40, top_k=2, max_tokens=2))
    )
    @example(request=pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(repetition_penalty=1e-40, top_k=2)))
    def run(request: pb.GenerateRequest) -> None:
        _call_grpc(fuzz_app, "Generate", request)

    run()


def test_grpc_chat_fuzz(fuzz_app) -> None:  # noqa: ANN001
    @settings(max_examples=GRPC_CASES, **SETTINGS)
    @given(request=chat_requests())
    @example(
        request=pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="hi")],
            sampling=pb.SamplingParams(min_tokens=3, max_tokens=4, temperature=1.0),
            response_format=pb.ResponseFormat(choice=["a"]),
        )
    )
    def run(request: pb.ChatRequest) -> None:
        _call_grpc(fuzz_app, "Chat", request)

    run()


def test_grpc_model_info_and_health_fuzz(fuzz_app) -> None:  # noqa: ANN001
    from grpc_health.v1 import health_pb2

    assert fuzz_app.client.model_info().max_model_len == MAX_MODEL_LEN

    @settings(max_examples=50, **SETTINGS)
    @given(service=st.one_of(st.just(""), st.just("epserve.v1.Epserve"), st.text(max_size=30)))
    def run(service: str) -> None:
        try:
            status = fuzz_app.client.health(service)
            assert status == health_pb2.HealthCheckResponse.SERVING
            STATS[("grpc", "Health.Check")]["OK"] += 1
        except grpc.RpcError as err:
            STATS[("grpc", "Health.Check")][err.code().name] += 1
            assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()

    run()


VALID_GENERATE = pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=1, logprobs=2))
VALID_CHAT = pb.ChatRequest(
    messages=[pb.ChatMessage(role="user", content="hi")],
    sampling=pb.SamplingParams(max_tokens=1),
    response_format=pb.ResponseFormat(json_schema='{"type": "string"}'),
)


@st.composite
def raw_messages(draw: st.DrawFn, valid: bytes) -> bytes:
    """Random bytes, or a valid request with bytes flipped, cut or spliced in (often still parses)."""
    kind = draw(st.sampled_from(["random", "flip", "cut", "splice"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    data = bytearray(valid)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@pytest.mark.parametrize("rpc,valid", [("Generate", VALID_GENERATE), ("Chat", VALID_CHAT)])
def test_grpc_raw_bytes_fuzz(fuzz_app, rpc: str, valid: Any) -> None:  # noqa: ANN001, ANN401
    """Raw garbage on the wire: INVALID_ARGUMENT (the proxy's parse error, replicas/api/grpc_decode.py) or, when
    the bytes still parse, whatever the request deserves; never UNKNOWN / INTERNAL."""
    call = fuzz_app.client.channel.unary_stream(
        f"/epserve.v1.Epserve/{rpc}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    counter = STATS[("grpc", f"{rpc} raw bytes")]

    @settings(max_examples=HOSTILE_CASES, **SETTINGS)
    @given(data=raw_messages(valid.SerializeToString()))
    @example(data=b"\xff\xff\xff\xff")
    @example(data=b"\x1a\x03\xff\xfe\xfd")  # a string field holding invalid UTF-8
    def run(data: bytes) -> None:
        try:
            list(call(data, timeout=60, metadata=fuzz_app.client.metadata))
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
        counter[code.name] += 1
        assert code in GRPC_ALLOWED, f"{rpc} raw {data[:80]!r} -> {code.name}: {details}"

    run()
    grpc_canary(fuzz_app.client)


def test_grpc_canary_after_fuzzing(fuzz_app) -> None:  # noqa: ANN001
    started = time.monotonic()
    grpc_canary(fuzz_app.client)
    assert group_epoch(fuzz_app) == 0, "some fuzzed input failed a group step (the group was rebuilt)"
    print(f"\ngRPC fuzz cases per RPC (canary {time.monotonic() - started:.2f} s):\n" + _report("grpc"))
    for rpc in ("Generate", "Chat"):
        assert sum(STATS[("grpc", rpc)].values()) >= GRPC_CASES, STATS[("grpc", rpc)]
