"""The gRPC API through Ray Serve's gRPC proxy: generated stubs and a reflection-based client.

The app runs with an API key, so every data-plane call here also checks authentication (HTTP and
gRPC). Oracles: the HTTP API for greedy output, the engine's pool counters for freed caches.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import openai
import pytest
import requests
from grpc_health.v1 import health_pb2

from replicas.api.grpc_client import EpserveClient
from replicas.proto import epserve_pb2 as pb

pytestmark = pytest.mark.timeout(900)

APP = "grpcapp"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def app(serve_ports, embedded_model_dir: Path):  # noqa: ANN001, ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs

    http, grpc_target = serve_ports
    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="gtiny",
        dtype="float32",
        num_kv_blocks=160,
        max_num_seqs=16,
        max_model_len=2048,
        api_key=KEY,
    )
    serve.run(build_app(args), name=APP, route_prefix="/g")
    client = EpserveClient(grpc_target, api_key=KEY, application=APP, timeout_s=120)
    yield SimpleNamespace(
        http=http + "/g",
        target=grpc_target,
        client=client,
        oai=openai.OpenAI(base_url=http + "/g/v1", api_key=KEY, max_retries=0, timeout=120),
        engine=serve.get_deployment_handle("EpserveEngine", app_name=APP),
    )
    client.close()
    serve.delete(APP)


def _wait_baseline(app, baseline) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and app.engine.pool_state.remote().result() != baseline:
        time.sleep(0.1)
    assert app.engine.pool_state.remote().result() == baseline


def test_health_serving_and_model_info(app) -> None:  # noqa: ANN001
    assert app.client.health() == health_pb2.HealthCheckResponse.SERVING
    assert app.client.health("epserve.v1.Epserve") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        app.client.health("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    mi = app.client.model_info()
    assert mi.model == "gtiny" and mi.vocab_size == 248320 and mi.max_model_len == 2048
    assert list(mi.eos_token_ids) == [248046, 248044]


def test_streaming_generate_equals_http_greedy(app) -> None:  # noqa: ANN001
    msgs = list(
        app.client.generate(text="The history of the Roman empire", max_tokens=12, temperature=0, ignore_eos=True)
    )
    tokens = [m for m in msgs if not m.HasField("usage")]
    assert len(tokens) == 12 and all(len(m.token_ids) == 1 for m in tokens)
    assert tokens[-1].finish_reason == "length"
    assert msgs[-1].usage.completion_tokens == 12
    http = app.oai.completions.create(
        model="gtiny",
        prompt="The history of the Roman empire",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert "".join(m.text for m in tokens) == http.choices[0].text
    assert msgs[-1].usage.prompt_tokens == http.usage.prompt_tokens
    by_ids = app.client.complete(token_ids=[248045, 846, 198], max_tokens=4, temperature=0, ignore_eos=True)
    assert len(by_ids.token_ids) == 4 and by_ids.usage.prompt_tokens == 3


def test_chat_messages_prompt(app) -> None:  # noqa: ANN001
    out = app.client.complete(
        messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=5, temperature=0, ignore_eos=True
    )
    http = app.oai.chat.completions.create(
        model="gtiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "skip_special_tokens": True},
    )
    assert out.usage.prompt_tokens == http.usage.prompt_tokens
    assert len(out.token_ids) == 5


def test_cancel_mid_stream_frees_slots(app) -> None:  # noqa: ANN001
    baseline = app.engine.pool_state.remote().result()
    call = app.client.generate(text="Tell a long story", max_tokens=400, temperature=0, ignore_eos=True)
    for i, _ in enumerate(call):
        if i == 2:
            break
    assert app.engine.pool_state.remote().result() != baseline
    call.cancel()
    _wait_baseline(app, baseline)


def test_deadline_exceeded_and_slots_freed(app) -> None:  # noqa: ANN001
    baseline = app.engine.pool_state.remote().result()
    with pytest.raises(grpc.RpcError) as info:
        for _ in app.client.generate(
            text="Tell a long story", max_tokens=400, temperature=0, ignore_eos=True, timeout_s=1.0
        ):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_baseline(app, baseline)


@pytest.mark.parametrize(
    "kwargs,code",
    [
        (dict(text="x", temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(text="x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(token_ids=[1, 2, 999999999]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(token_ids=[5] * 2100), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(text="x", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(text="x", n=100), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(text="x", model="nope"), grpc.StatusCode.NOT_FOUND),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["temperature", "top_p", "vocab", "too-long", "max-tokens", "n", "unknown-model", "no-prompt"],
)
def test_bad_inputs_invalid_argument(app, kwargs: dict, code: grpc.StatusCode) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        list(app.client.generate(**kwargs))
    assert info.value.code() == code, info.value.details()
    assert info.value.details()


def test_api_key_required_everywhere(app) -> None:  # noqa: ANN001
    anon = EpserveClient(app.target, application=APP)
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(anon.generate(text="x", max_tokens=2))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            anon.model_info()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert anon.health() == health_pb2.HealthCheckResponse.SERVING  # health is open
    finally:
        anon.close()
    assert requests.get(app.http + "/v1/models").status_code == 401
    assert requests.get(app.http + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(app.http + "/health").status_code == 200
    assert requests.get(app.http + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_reflection_client_streams_generate(app) -> None:  # noqa: ANN001
    """A client with no stubs: discover the service by reflection, build the request dynamically."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(app.target)
    try:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "epserve.v1.Epserve" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("epserve.v1.Epserve").FindMethodByName("Generate")
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        req = req_cls(text="Reflection works", sampling={"max_tokens": 3, "temperature": 0, "ignore_eos": True})
        call = channel.unary_stream(
            "/epserve.v1.Epserve/Generate",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        msgs = list(call(req, timeout=60, metadata=[("authorization", f"Bearer {KEY}"), ("application", APP)]))
        assert sum(len(m.token_ids) for m in msgs) == 3
    finally:
        channel.close()


def test_image_bytes_over_grpc(app) -> None:  # noqa: ANN001
    """gRPC carries image bytes; a bad image is INVALID_ARGUMENT."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    msg = pb.ChatMessage(
        role="user",
        parts=[
            pb.ContentPart(image=pb.Image(data=buf.getvalue(), mime_type="image/png")),
            pb.ContentPart(text="describe"),
        ],
    )
    out = app.client.complete(messages=[msg], max_tokens=3, temperature=0, ignore_eos=True)
    assert out.usage.prompt_tokens > 64 and len(out.token_ids) == 3
    bad = pb.ChatMessage(role="user", parts=[pb.ContentPart(image=pb.Image(data=b"not an image"))])
    with pytest.raises(grpc.RpcError) as info:
        app.client.complete(messages=[bad], max_tokens=3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cache_salt_validated_and_cached_tokens_in_usage(app) -> None:  # noqa: ANN001
    """cache_salt: INVALID_ARGUMENT naming it when empty or too long (Generate and Chat); a valid one is accepted,
    and Usage.cached_tokens is 0 for a prompt in a salt namespace nothing was cached in."""
    msgs = [pb.ChatMessage(role="user", content="hi")]
    for bad in ("", "s" * 257):
        with pytest.raises(grpc.RpcError) as info:
            list(app.client.generate(text="x", max_tokens=1, cache_salt=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(app.client.chat(msgs, max_tokens=1, cache_salt=bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in info.value.details()
    salt = f"fresh-{time.monotonic_ns()}"
    out = app.client.complete(token_ids=[7] * 150, max_tokens=1, cache_salt=salt)
    assert out.usage is not None and out.usage.prompt_tokens == 150 and out.usage.cached_tokens == 0
    last = list(app.client.chat(msgs, max_tokens=1, cache_salt=salt))[-1]
    assert last.HasField("usage") and last.usage.cached_tokens == 0 and last.usage.prompt_tokens > 0
