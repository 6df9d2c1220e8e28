"""Bad input is the client's error, on both APIs, and never the group's (issue 12, items 2 and 5).

A real app (Serve HTTP + gRPC proxies, an engine group) gets the inputs an adversarial run found to
produce 500 / INTERNAL / UNKNOWN or to fail the expert-parallel group, and each must be answered
400 with the OpenAI error body / INVALID_ARGUMENT. The group's epoch (bumped by every rebuild) must
not move, and a stream running beside the bad requests must finish untouched. Oracles: the status
and body contract, the epoch, the whole-text tokenizer for the piecewise one.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2

from replicas.api.grpc_client import EpserveClient
from replicas.proto import epserve_pb2 as pb

pytestmark = pytest.mark.timeout(600)

APP, PREFIX, KEY, MODEL = "limits", "/limits", "limits-key", "limits-tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN, MAX_N, MAX_FANOUT = 256, 4, 8
VOCAB = 248320


@pytest.fixture(scope="module")
def app(serve_ports, embedded_model_dir: Path):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    http, grpc_target = serve_ports
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name=MODEL,
        dtype="float32",
        num_kv_blocks=48,
        max_num_seqs=8,
        max_model_len=MAX_MODEL_LEN,
        default_max_tokens=1,
        max_n=MAX_N,
        max_fanout=MAX_FANOUT,
        api_key=KEY,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    client = EpserveClient(grpc_target, api_key=KEY, application=APP, timeout_s=60)
    channel = grpc.insecure_channel(grpc_target)
    yield SimpleNamespace(
        base=http + PREFIX,
        client=client,
        channel=channel,
        engine=serve.get_deployment_handle("EpserveEngine", app_name=APP),
    )
    channel.close()
    client.close()
    serve.delete(APP)


def _openai_error(r: requests.Response, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def _post(app, path: str, raw: bytes | str) -> requests.Response:  # noqa: ANN001
    data = raw.encode() if isinstance(raw, str) else raw
    return requests.post(app.base + path, data=data, timeout=60, headers={**AUTH, "Content-Type": "application/json"})


def _deep(depth: int, leaf: str = '"x"') -> str:
    return '{"a":' * depth + leaf + "}" * depth


def _frame() -> str:
    return "data:image/png;base64,iVBORw0KGgo="  # never decoded: fps is checked first


CHAT = '{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": %%s}]}' % MODEL
# (id, path, raw JSON body, param the 400 must name or None for any)
HTTP_CASES = [
    ("chat-lone-surrogate", "/v1/chat/completions", CHAT % '"hi \\ud800"', "messages.0.content"),
    (
        "chat-lone-low-surrogate-in-part",
        "/v1/chat/completions",
        CHAT % '[{"type": "text", "text": "\\udc00"}]',
        "messages.0.content.0.text",
    ),
    (
        "completion-lone-surrogate",
        "/v1/completions",
        '{"model": "%s", "prompt": "\\ud83d", "max_tokens": 1}' % MODEL,
        "prompt",
    ),
    ("tokenize-lone-surrogate", "/tokenize", '{"prompt": "a\\udfffb"}', "prompt"),
    ("body-nested-100000", "/v1/completions", "[" * 100_000 + "]" * 100_000, None),
    (
        "metadata-nested-100000",
        "/v1/completions",
        '{"model": "%s", "prompt": "x", "metadata": %s}' % (MODEL, _deep(100_000)),
        None,
    ),
    (
        "metadata-nested-500",
        "/v1/chat/completions",
        '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "metadata": %s}' % (MODEL, _deep(500)),
        None,
    ),
    (
        "json-schema-nested-3000",
        "/v1/chat/completions",
        '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema",'
        ' "json_schema": {"name": "r", "schema": %s}}}' % (MODEL, _deep(3000, '{"type": "string"}')),
        None,
    ),
    (
        "video-fps-abc",
        "/v1/chat/completions",
        CHAT % json.dumps([{"type": "video_url", "video_url": {"frames": [_frame()], "fps": "abc"}}]),
        "messages",
    ),
    (
        "video-fps-nan-string",
        "/v1/chat/completions",
        CHAT % json.dumps([{"type": "video_url", "video_url": {"frames": [_frame()], "fps": "nan"}}]),
        "messages",
    ),
    (
        "video-fps-nan",
        "/v1/chat/completions",
        CHAT % ('[{"type": "video_url", "video_url": {"frames": ["%s"], "fps": NaN}}]' % _frame()),
        "messages",
    ),
    (
        "tool-call-arguments-surrogate-escape",
        "/v1/chat/completions",
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "\\ud800"}'}}
                        ],
                    },  # JSON text the template parses
                    {"role": "tool", "tool_call_id": "c", "content": "y"},
                ],
            }
        ),
        "messages",
    ),
    ("logprobs-over-cap", "/v1/completions", '{"model": "%s", "prompt": "x", "logprobs": 300000}' % MODEL, "logprobs"),
    (
        "top-logprobs-over-cap",
        "/v1/chat/completions",
        '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}' % MODEL,
        "top_logprobs",
    ),
    (
        "temperature-string",
        "/v1/completions",
        '{"model": "%s", "prompt": "x", "temperature": "abc"}' % MODEL,
        "temperature",
    ),
    (
        "max-tokens-string-nan",
        "/v1/completions",
        '{"model": "%s", "prompt": "x", "max_tokens": "nan"}' % MODEL,
        "max_tokens",
    ),
]


@pytest.mark.parametrize("name,path,raw,param", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input_is_a_400_with_the_openai_body(
    app,  # noqa: ANN001
    name: str,
    path: str,
    raw: str,
    param: str | None,
) -> None:
    err = _openai_error(_post(app, path, raw))
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err


def test_unknown_route_and_wrong_method_use_the_openai_body(app) -> None:  # noqa: ANN001
    err = _openai_error(requests.get(app.base + "/v1/no-such-route", headers=AUTH, timeout=30), 404)
    assert err["code"] == "not_found" and "/v1/no-such-route" in err["message"]
    r = requests.get(app.base + "/v1/chat/completions", headers=AUTH, timeout=30)
    err = _openai_error(r, 405)
    assert err["code"] == "method_not_allowed" and r.headers.get("allow") == "POST"


def test_fanout_cap_names_the_limit(app) -> None:  # noqa: ANN001
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d", "e"], "n": 2, "max_tokens": 1}
    r = requests.post(app.base + "/v1/completions", json=body, headers=AUTH, timeout=60)
    err = _openai_error(r)
    assert "max_fanout" in err["message"] and str(MAX_FANOUT) in err["message"] and err["param"] == "prompt"
    body["prompt"] = ["a", "b", "c", "d"]  # 4 x 2 = the cap itself: served
    r = requests.post(app.base + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == MAX_FANOUT
    out = app.client  # gRPC: one prompt, so n alone; max_n is the same limit as HTTP
    with pytest.raises(grpc.RpcError) as info:
        out.complete(text="x", n=MAX_N + 1, max_tokens=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n must be at most" in info.value.details()


def test_prompt_longer_than_the_context_is_refused_before_or_while_tokenizing(app) -> None:  # noqa: ANN001
    huge = "word " * 3_000_000  # 15 MB: over max_model_len x the longest token, refused by its length
    t0 = time.monotonic()
    err = _openai_error(
        requests.post(app.base + "/v1/completions", json={"model": MODEL, "prompt": huge}, headers=AUTH, timeout=120)
    )
    assert "maximum context length" in err["message"] and err["param"] == "prompt"
    print(f"\n15 MB prompt refused in {time.monotonic() - t0:.2f} s")
    mid = "a b " * 8000  # 32 KB, ~16,000 tokens: under the length bound, refused while tokenizing
    err = _openai_error(
        requests.post(app.base + "/v1/completions", json={"model": MODEL, "prompt": mid}, headers=AUTH, timeout=60)
    )
    assert "maximum context length" in err["message"]


def test_large_tokenization_does_not_stall_other_requests(app) -> None:  # noqa: ANN001
    """/tokenize of a 4 MB text (seconds of tokenizer work) runs while small requests keep answering."""
    big = "The quick brown fox jumps over the lazy dog. " * 90_000
    done: dict[str, float] = {}

    def tokenize_big() -> None:
        t0 = time.monotonic()
        r = requests.post(app.base + "/tokenize", json={"prompt": big}, headers=AUTH, timeout=300)
        assert r.status_code == 200
        done["count"] = r.json()["count"]
        done["s"] = time.monotonic() - t0

    worker = threading.Thread(target=tokenize_big)
    worker.start()
    time.sleep(0.3)
    latencies = []
    while worker.is_alive():
        t0 = time.monotonic()
        r = requests.post(app.base + "/tokenize", json={"prompt": "hello"}, headers=AUTH, timeout=60)
        assert r.status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.05)
    worker.join()
    print(
        f"\nbig /tokenize {done['s']:.2f} s ({done['count']} tokens); small /tokenize during it: "
        f"{len(latencies)} calls, max {max(latencies, default=0):.3f} s"
    )
    assert done["count"] == 900_001  # the whole text, tokenized in pieces: 10 tokens per sentence + 1
    assert done["s"] > 1.0 and len(latencies) >= 3, "the big request ended before the small ones overlapped it"
    assert max(latencies) < 1.0


def test_tokenizer_pieces_equal_the_whole_text(embedded_model_dir: Path) -> None:
    """`encode_pieces` concatenates to exactly `encode` (oracle: the whole text in one call)."""
    import random

    from model_shards.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(embedded_model_dir)
    words = [
        "hello",
        "world",
        "naïve",
        "café",
        "日本語",
        "Ωμέγα",
        "don't",
        "I'M",
        "<|im_start|>",
        "<think>",
        "\n\n",
        "  ",
        "123",
        "e\u0301",
        "x\u0301y",
        "a  b",
        "...",
        "\t",
        "😀",
        "ß",
        " ",
        "Ǆ",
        "ﬁ",
    ]
    rng = random.Random(0)
    for trial in range(20):
        text = "".join(rng.choice(words) + rng.choice([" ", "", " ", "\n"]) for _ in range(rng.randint(50, 3000)))
        whole = tok.encode(text)
        for piece_chars in (5, 64, 1000):
            assert [t for p in tok.encode_pieces(text, piece_chars) for t in p] == whole, (trial, piece_chars)


def test_trunk_refusal_ends_one_request_and_the_engine_keeps_serving(embedded_model_dir: Path) -> None:
    """In-process (the real TrunkRank with local experts), the engine's own admission check off: a sequence
    the trunk rank refuses before its forward ends alone with a non-retriable 400; the request stepped beside
    it gets the same greedy tokens as alone (the oracle), the engine never fails and the pools come back."""
    import asyncio

    import torch

    from model_shards.model import LocalModel
    from model_shards.sampling import SamplingParams
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.engine_types import GenerateRequest
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = LocalModel.load(embedded_model_dir, dtype="float32", with_mtp=False)
    runner = LocalRunner(model, CacheSizes(num_blocks=16, block_size=16, num_slots=4))

    def request(rid: str, logprobs: int | None) -> GenerateRequest:
        return GenerateRequest(
            request_id=rid,
            prompt_ids=(9707, 11, 1879),
            max_tokens=4,
            ignore_eos=True,
            params=SamplingParams(temperature=0.0, logprobs=logprobs),
        )

    async def collect(engine: Engine, req: GenerateRequest) -> tuple[list[int], list]:
        tokens, errors = [], []
        async for item in engine.generate(req):
            for ev in item.outputs:
                tokens += ev.token_ids
                if ev.error is not None:
                    errors.append(ev.error)
        return tokens, errors

    async def main():  # noqa: ANN202
        engine = Engine(
            runner,
            pools=[BlockPool(num_blocks=16, num_slots=4, block_size=16)],
            config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256),
        )
        engine.start()
        try:
            alone = await collect(engine, request("alone", 2))
            together = await asyncio.gather(
                collect(engine, request("good", 2)), collect(engine, request("bad", VOCAB + 1))
            )
            return alone, together, engine.failure, engine.pool_state()
        finally:
            await engine.stop()

    try:
        alone, (good, bad), failure, pools = asyncio.run(main())
    finally:
        torch.set_num_threads(threads)
    assert len(alone[0]) == 4 and not alone[1]
    assert good == alone
    assert bad[0] == [] and len(bad[1]) == 1
    err = bad[1][0]
    assert not err.retriable and err.status == 400 and "logprobs" in err.message, err
    assert failure is None
    assert pools == [{"free_blocks": 16, "num_blocks": 16, "free_slots": 4, "num_slots": 4}]


# ----------------------------------------------------------------------------------------------- gRPC


def _epoch(app) -> int:  # noqa: ANN001
    return app.engine.group_epoch.remote().result()


def _grpc_code(fn) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001
    try:
        out = fn()
        if not hasattr(out, "SerializeToString"):
            list(out)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def test_grpc_logprobs_over_the_cap_fail_alone(app) -> None:  # noqa: ANN001
    """The adversarial case: logprobs 300000 on Generate used to fail the trunk step (group rebuilt, every
    request 503, then retried). Now INVALID_ARGUMENT on every prompt kind and RPC; the epoch stays; a stream
    running beside them finishes with all its tokens."""
    epoch = _epoch(app)
    stream: dict[str, object] = {}

    def long_stream() -> None:
        msgs = list(app.client.generate(text="Tell a story", max_tokens=120, temperature=0, ignore_eos=True))
        stream["tokens"] = sum(len(m.token_ids) for m in msgs)
        stream["finish"] = [m.finish_reason for m in msgs if m.finish_reason]

    worker = threading.Thread(target=long_stream)
    worker.start()
    time.sleep(0.5)
    cases = [
        lambda: app.client.generate(text="x", logprobs=300000, max_tokens=2),
        lambda: app.client.generate(text="x", logprobs=21, max_tokens=2),
        lambda: app.client.generate(token_ids=[9707], logprobs=VOCAB, max_tokens=2),
        lambda: app.client.generate(messages=[pb.ChatMessage(role="user", content="x")], logprobs=300000),
        lambda: app.client.stub.Chat(
            pb.ChatRequest(
                messages=[pb.ChatMessage(role="user", content="x")],
                sampling=pb.SamplingParams(logprobs=300000, max_tokens=1),
            ),
            metadata=app.client.metadata,
            timeout=60,
        ),
    ]
    for i, case in enumerate(cases):
        code, details = _grpc_code(case)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (i, code, details)
        assert "logprobs" in details, details
    worker.join(timeout=120)
    assert stream.get("tokens") == 120 and stream.get("finish") == ["length"], stream
    assert _epoch(app) == epoch
    code, _ = _grpc_code(lambda: app.client.generate(text="x", logprobs=20, max_tokens=1))
    assert code == grpc.StatusCode.OK


def test_engine_refuses_what_would_fail_a_step_before_dispatch(app) -> None:  # noqa: ANN001
    """A request that skipped the ingress's checks (built by another path) is refused by the engine alone
    (RequestRejected), not by a failed step: the epoch stays."""
    from model_shards.sampling import SamplingParams
    from replicas.engine.engine_types import GenerateRequest

    epoch = _epoch(app)
    bad = [
        GenerateRequest(
            request_id="eng-logprobs", prompt_ids=(9707,), params=SamplingParams(logprobs=VOCAB + 1), max_tokens=2
        ),
        GenerateRequest(request_id="eng-ids", prompt_ids=(9707, VOCAB), params=SamplingParams(), max_tokens=2),
        GenerateRequest(
            request_id="eng-stop",
            prompt_ids=(9707,),
            params=SamplingParams(),
            max_tokens=2,
            stop_token_ids=(VOCAB + 5,),
        ),
        GenerateRequest(
            request_id="eng-nan", prompt_ids=(9707,), params=SamplingParams(temperature=float("nan")), max_tokens=2
        ),
    ]
    for req in bad:
        gen = app.engine.options(stream=True).generate.remote(req)
        with pytest.raises(Exception) as info:
            for _ in gen:
                pass
        assert "RequestRejected" in repr(info.value) or "RequestRejected" in str(info.value), info.value
    assert _epoch(app) == epoch


def _raw_call(app, method: str, payload: bytes, *, stream: bool, auth: bool = True):  # noqa: ANN001, ANN202
    path = method if method.startswith("/") else f"/epserve.v1.Epserve/{method}"
    kind = app.channel.unary_stream if stream else app.channel.unary_unary
    call = kind(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    meta = [("application", APP)] + ([("authorization", f"Bearer {KEY}")] if auth else [])
    return lambda: call(payload, timeout=60, metadata=meta)


GARBAGE = [
    ("corrupt-wire", b"\xff\xff\xff\xff"),
    ("bad-utf8-text", b"\x1a\x03\xff\xfe\xfd"),  # GenerateRequest.text (field 3) holding invalid UTF-8
    ("truncated", pb.GenerateRequest(text="hello there", model=MODEL).SerializeToString()[:-3]),
    ("random", bytes(range(256)) * 4),
]


@pytest.mark.parametrize("name,payload", GARBAGE, ids=[g[0] for g in GARBAGE])
def test_grpc_garbage_bytes_are_invalid_argument(app, name: str, payload: bytes) -> None:  # noqa: ANN001
    for method, stream in (("Generate", True), ("Chat", True), ("ModelInfo", False)):
        code, details = _grpc_code(_raw_call(app, method, payload, stream=stream))
        if name == "bad-utf8-text" and method == "ModelInfo":
            continue  # field 3 is unknown to ModelInfoRequest: parsed (and skipped) as protobuf allows
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "not a valid" in details, details
    code, details = _grpc_code(_raw_call(app, "/grpc.health.v1.Health/Check", b"\xff\xff", stream=False, auth=False))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    # garbage without the key is still refused for the key first (no parse error leaks to strangers)
    code, _ = _grpc_code(_raw_call(app, "Generate", payload, stream=True, auth=False))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def _chat(app, **fields) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001, ANN003
    fields.setdefault("messages", [pb.ChatMessage(role="user", content="x")])
    req = pb.ChatRequest(sampling=pb.SamplingParams(max_tokens=1), **fields)
    return _grpc_code(lambda: app.client.stub.Chat(req, metadata=app.client.metadata, timeout=60))


@pytest.mark.parametrize(
    "name,fields",
    [
        (
            "json-schema-nested-3000",
            dict(response_format=pb.ResponseFormat(json_schema=_deep(3000, '{"type": "string"}'))),
        ),
        (
            "json-schema-nested-100000",
            dict(response_format=pb.ResponseFormat(json_schema="[" * 100_000 + "]" * 100_000)),
        ),
        (
            "json-schema-lone-surrogate",
            dict(response_format=pb.ResponseFormat(json_schema='{"type": "string", "enum": ["\\ud800"]}')),
        ),
        (
            "tool-call-arguments-surrogate-escape",
            dict(
                messages=[
                    pb.ChatMessage(role="user", content="x"),
                    pb.ChatMessage(
                        role="assistant", tool_calls=[pb.ToolCall(id="c", name="f", arguments='{"a": "\\ud800"}')]
                    ),
                    pb.ChatMessage(role="tool", tool_call_id="c", content="y"),
                ]
            ),
        ),
        ("tool-parameters-nested", dict(tools=[pb.Tool(name="f", parameters_json=_deep(5000))])),
        (
            "tool-parameters-lone-surrogate",
            dict(
                tools=[
                    pb.Tool(
                        name="f", parameters_json='{"type": "object", "properties": {"\\udc00": {"type": "string"}}}'
                    )
                ]
            ),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_grpc_bad_json_fields_are_invalid_argument(app, name: str, fields: dict) -> None:  # noqa: ANN001
    code, details = _chat(app, **fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "deeper than" in details or "surrogate" in details, details


def test_group_still_serves_after_everything(app) -> None:  # noqa: ANN001
    assert app.client.health() == health_pb2.HealthCheckResponse.SERVING
    assert _epoch(app) == 0
    r = requests.post(
        app.base + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers=AUTH, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
