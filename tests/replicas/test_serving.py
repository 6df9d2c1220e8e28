"""The real app (Ray Serve on a 3-node local cluster, D=1 x X=1, fp32 tiny model) through the `openai` client.

Oracles: `epserve generate` (single process) for greedy text, the single-process model's
log-softmax for logprobs, /tokenize for prompt usage, the engine's pool counters for freed caches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import requests
import torch

pytestmark = pytest.mark.timeout(900)

APP = "main"
PREFIX = "/main"


@pytest.fixture(scope="module")
def app(serve_http: str, embedded_model_dir: Path):  # noqa: ANN201
    from ray import serve

    from replicas.serving.app import build_app
    from replicas.serving.app_args import AppArgs, AutoscalingArgs

    args = AppArgs(
        model=str(embedded_model_dir),
        served_model_name="tiny",
        dtype="float32",
        trunk_ranks=1,
        expert_ranks=1,
        num_kv_blocks=160,
        block_size=16,
        max_num_seqs=24,
        max_model_len=2048,
        collective_deadline_s=30,
        ingress_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
        engine_autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=1),
    )
    serve.run(build_app(args), name=APP, route_prefix=PREFIX)
    base = serve_http + PREFIX
    yield SimpleNamespace(
        base=base,
        model="tiny",
        folder=embedded_model_dir,
        client=openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120),
        engine=serve.get_deployment_handle("EpserveEngine", app_name=APP),
    )
    serve.delete(APP)


def _chat(app, content: str = "Tell me about expert parallelism.", **kw):  # noqa: ANN001, ANN003, ANN202
    """Thinking off: the random weights never close <think>, so with it on every output is reasoning."""
    kw["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}, **kw.get("extra_body", {})}
    return app.client.chat.completions.create(model=app.model, messages=[{"role": "user", "content": content}], **kw)


def test_models_health_tokenize(app) -> None:  # noqa: ANN001
    models = app.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert requests.get(app.base + "/health").status_code == 200
    r = requests.post(app.base + "/tokenize", json={"prompt": "Hello world"})
    from model_shards.tokenizer import Tokenizer

    assert r.json()["tokens"] == Tokenizer.from_dir(app.folder).encode("Hello world")
    d = requests.post(app.base + "/detokenize", json={"tokens": r.json()["tokens"]})
    assert d.json()["prompt"] == "Hello world"


def test_chat_stream_equals_non_stream_and_usage_is_exact(app) -> None:  # noqa: ANN001
    full = _chat(app, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    prompt_len = requests.post(
        app.base + "/tokenize",
        json={
            "messages": [{"role": "user", "content": "Tell me about expert parallelism."}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ).json()["count"]
    assert full.usage.prompt_tokens == prompt_len
    chunks = list(
        _chat(
            app,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) == 12, "one SSE event per token"
    assert "".join(c.choices[0].delta.content or "" for c in token_chunks) == full.choices[0].message.content
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == prompt_len


def test_completions_stream_and_not(app) -> None:  # noqa: ANN001
    full = app.client.completions.create(
        model=app.model, prompt="The capital of France is", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    parts = list(
        app.client.completions.create(
            model=app.model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert len(parts) == 8 and full.usage.completion_tokens == 8


def test_greedy_equals_epserve_generate(app, epserve_cache: Path) -> None:  # noqa: ANN001
    prompt = "Write one sentence about the sea."
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "epserve.cli",
            "generate",
            "--model",
            str(app.folder),
            "--prompt",
            prompt,
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--dtype",
            "float32",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "EPSERVE_CACHE_DIR": str(epserve_cache)},
    )
    assert proc.returncode == 0, proc.stderr
    want = json.loads(proc.stdout)
    got = app.client.completions.create(
        model=app.model, prompt=prompt, max_tokens=16, temperature=0, extra_body={"skip_special_tokens": False}
    )
    assert got.choices[0].text == want["text"]
    assert got.usage.completion_tokens == len(want["token_ids"])


def test_n_choices(app) -> None:  # noqa: ANN001
    out = _chat(app, n=3, max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    assert len({c.message.content for c in out.choices}) > 1, "choices should be sampled independently"


def test_stop_string(app) -> None:  # noqa: ANN001
    base = (
        app.client.completions.create(
            model=app.model, prompt="Once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(
        base[i : i + 3] for i in range(6, len(base) - 3) if base[i : i + 3].strip() and base.find(base[i : i + 3]) == i
    )
    cut = app.client.completions.create(
        model=app.model,
        prompt="Once upon a time",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in app.client.completions.create(
            model=app.model,
            prompt="Once upon a time",
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == base[: base.index(stop)]


def _greedy_ids(folder: Path, prompt: list[int], n: int) -> list[int]:
    """The single-process model's greedy continuation of `prompt` (n tokens, eos ignored)."""
    from model_shards.batch import SeqChunk, StepBatch
    from model_shards.model import LocalModel

    model = LocalModel.load(folder, dtype="float32")
    ids = list(prompt)
    table = tuple(range(8))
    pools = model.allocate(num_blocks=len(table), block_size=16, num_slots=1)
    batch = StepBatch.build([SeqChunk(tuple(ids), 0, 0, table)], block_size=16)
    for _ in range(n):
        ids.append(int(model.forward(batch, pools).logits_RV[0].argmax()))
        batch = StepBatch.build([SeqChunk((ids[-1],), len(ids) - 1, 0, table)], block_size=16)
    return ids[len(prompt) :]


def test_stop_string_counts_no_token_past_it(app) -> None:  # noqa: ANN001
    """The token that completes a stop string is the choice's last: text, logprobs and usage stop there, for every
    choice (n=2), streamed or not; the engine stops the choices (`finish_choice`, no abort) and frees their caches.
    Oracle: the single-process greedy tokens and `decode` of their prefixes."""
    from model_shards.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(app.folder)
    prompt = [248045, 846, 198, 9419, 248046, 198]
    ids = _greedy_ids(app.folder, prompt, 24)

    def text(k: int) -> str:
        return tok.decode(ids[:k], skip_special_tokens=True)

    # A stop string ending one character before the end of its token's text, so that token's last character is cut.
    stop = next(
        t[-3:-1]
        for k in range(4, 20)
        if len(t := text(k)) >= 3 and "\ufffd" not in t and t[-3:-1].strip() and t[-3:-1] not in text(k - 1)
    )
    k = next(k for k in range(1, 25) if stop in text(k))
    want = text(k)[: text(k).index(stop)]
    baseline = app.engine.pool_state.remote().result()
    aborted = app.engine.stats.remote().result()["aborted"]
    kw = dict(model=app.model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], logprobs=1)
    out = app.client.completions.create(n=2, extra_body={"ignore_eos": True}, **kw)
    assert out.usage.completion_tokens == 2 * k
    for c in out.choices:
        assert (c.text, c.finish_reason) == (want, "stop")
        assert c.logprobs.tokens == [tok.decode([t]) for t in ids[:k]]
    chunks = list(
        app.client.completions.create(
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices and c.choices[0].logprobs) == k
    assert chunks[-1].usage.completion_tokens == k
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and app.engine.pool_state.remote().result() != baseline:
        time.sleep(0.1)
    assert app.engine.pool_state.remote().result() == baseline
    assert app.engine.stats.remote().result()["aborted"] == aborted, "a stop string is a stop, not an abort"


def test_logprobs_equal_model_log_softmax(app) -> None:  # noqa: ANN001
    from model_shards.batch import SeqChunk, StepBatch
    from model_shards.model import LocalModel
    from model_shards.tokenizer import Tokenizer

    prompt = [248045, 846, 198, 9419, 248046, 198]
    out = app.client.completions.create(
        model=app.model, prompt=prompt, max_tokens=5, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    model = LocalModel.load(app.folder, dtype="float32")
    tok = Tokenizer.from_dir(app.folder)
    ids = list(prompt)
    pools = model.allocate(num_blocks=4, block_size=16, num_slots=1)
    logits = model.forward(StepBatch.build([SeqChunk(tuple(ids), 0, 0, (0, 1, 2, 3))], block_size=16), pools).logits_RV[
        0
    ]
    for step in range(5):
        ref = torch.log_softmax(logits, dim=-1)
        chosen = int(ref.argmax())
        assert lp.tokens[step] == tok.decode([chosen])
        assert abs(lp.token_logprobs[step] - float(ref[chosen])) < 1e-4
        top = sorted(lp.top_logprobs[step].values(), reverse=True)
        torch.testing.assert_close(torch.tensor(top), ref.topk(3).values, atol=1e-4, rtol=0)
        ids.append(chosen)
        logits = model.forward(
            StepBatch.build([SeqChunk((chosen,), len(ids) - 1, 0, (0, 1, 2, 3))], block_size=16), pools
        ).logits_RV[0]


def test_seed_reproducibility(app) -> None:  # noqa: ANN001
    def draw(seed: int) -> str:
        return (
            _chat(app, max_tokens=10, temperature=1.0, top_p=0.9, seed=seed, extra_body={"ignore_eos": True})
            .choices[0]
            .message.content
        )

    a, b, c = draw(123), draw(123), draw(124)
    assert a == b
    assert a != c


def test_twenty_concurrent_streams(app) -> None:  # noqa: ANN001
    results: dict[int, tuple[int, int, int, str | None]] = {}

    def run(i: int) -> None:
        chunks = list(
            _chat(
                app,
                f"Stream number {i}: say something.",
                max_tokens=10,
                temperature=0.7,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        token_chunks = [c for c in chunks if c.choices]
        results[i] = (
            len(token_chunks),
            chunks[-1].usage.completion_tokens,
            chunks[-1].usage.prompt_tokens,
            token_chunks[-1].choices[0].finish_reason,
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 20
    for i, (n_chunks, completion, prompt_tokens, finish) in results.items():
        expect_prompt = requests.post(
            app.base + "/tokenize",
            json={
                "messages": [{"role": "user", "content": f"Stream number {i}: say something."}],
                "chat_template_kwargs": {"enable_thinking": False},
            },
        ).json()["count"]
        assert (n_chunks, completion, prompt_tokens, finish) == (10, 10, expect_prompt, "length"), i


def test_disconnect_returns_blocks_and_slot(app) -> None:  # noqa: ANN001
    baseline = app.engine.pool_state.remote().result()
    with requests.post(
        app.base + "/v1/completions",
        json={"model": app.model, "prompt": "A long story:", "max_tokens": 400, "stream": True, "ignore_eos": True},
        stream=True,
        timeout=60,
    ) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                seen += 1
            if seen >= 3:
                break
        busy = app.engine.pool_state.remote().result()
        assert busy[0]["free_slots"] < baseline[0]["free_slots"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if app.engine.pool_state.remote().result() == baseline:
            break
        time.sleep(0.1)
    assert app.engine.pool_state.remote().result() == baseline


BAD = [
    ("invalid-json", "/v1/chat/completions", b"{not json", 400),
    ("not-an-object", "/v1/chat/completions", [1, 2], 400),
    ("missing-messages", "/v1/chat/completions", {"model": "tiny"}, 400),
    ("empty-messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    (
        "temperature-wrong-type",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
    ),
    (
        "negative-max-tokens",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
        400,
    ),
    ("n-zero", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}, 400),
    ("n-too-large", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 100}, 400),
    (
        "top-p-above-1",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5},
        400,
    ),
    ("negative-temperature", "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404),
    ("prompt-too-long", "/v1/completions", {"model": "tiny", "prompt": [5] * 2100}, 400),
    ("max-tokens-beyond-context", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400),
    ("unknown-field", "/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, 400),
    ("too-many-stops", "/v1/completions", {"model": "tiny", "prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400),
    (
        "top-logprobs-without-logprobs",
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
    ),
    ("logprobs-too-many", "/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 30}, 400),
    ("token-id-outside-vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 999999999]}, 400),
    ("bad-role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("min-tokens-over-max", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400),
    ("presence-penalty-range", "/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 5}, 400),
    ("suffix-unsupported", "/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400),
    ("detokenize-bad-ids", "/detokenize", {"tokens": [-1]}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_get_openai_errors(app, name: str, path: str, body, status: int) -> None:  # noqa: ANN001
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(app.base + path, data=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]


def test_server_still_serves_after_bad_inputs(app) -> None:  # noqa: ANN001
    """The same greedy request answers the same before and after refused ones (and the full length)."""

    def greedy() -> tuple[str | None, int, str | None]:
        out = _chat(app, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        return out.choices[0].message.content, out.usage.completion_tokens, out.choices[0].finish_reason

    before = greedy()
    assert before[1:] == (6, "length")
    for name, path, body, status in BAD:
        if name in ("invalid-json", "prompt-too-long", "token-id-outside-vocab", "max-tokens-beyond-context"):
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = requests.post(app.base + path, data=content, headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code == status, r.text
    assert greedy() == before


def test_metrics_are_prometheus_text(app) -> None:  # noqa: ANN001
    """/metrics parses as Prometheus text (prometheus_client's parser) with vLLM's names and types, and its
    counters grow by exactly what one request's usage says (the client's count is the oracle)."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> list:
        fams = list(text_string_to_metric_families(requests.get(app.base + "/metrics", timeout=30).text))
        for fam in fams:
            assert all(s.labels.get("model_name") == "tiny" for s in fam.samples), fam.name
        return fams

    def total(fams: list, sample: str, **labels: str) -> float:
        return sum(
            s.value
            for f in fams
            for s in f.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def grown(after: list, before: list) -> dict[str, float]:
        chat_ok = {"route": "/v1/chat/completions", "status": "200"}
        return {
            name: total(after, sample, **labels) - total(before, sample, **labels)
            for name, sample, labels in (
                ("generation", "epserve:generation_tokens_total", {}),
                ("prompt", "epserve:prompt_tokens_total", {}),
                ("http", "epserve:http_requests_total", chat_ok),
            )
        }

    time.sleep(2.5)  # earlier tests' last pushes (replicas push every second)
    before = scrape()
    out = _chat(app, max_tokens=3, temperature=0)
    want = {"generation": out.usage.completion_tokens, "prompt": out.usage.prompt_tokens, "http": 1}
    deadline = time.monotonic() + 15
    while True:
        time.sleep(1.0)
        after = scrape()
        if grown(after, before) == want or time.monotonic() > deadline:
            break
    assert grown(after, before) == want
    types = {f.name: f.type for f in after}
    for family, kind in (
        ("epserve:time_to_first_token_seconds", "histogram"),
        ("epserve:inter_token_latency_seconds", "histogram"),
        ("epserve:e2e_request_latency_seconds", "histogram"),
        ("epserve:request_queue_time_seconds", "histogram"),
        ("epserve:num_requests_running", "gauge"),
        ("epserve:num_requests_waiting", "gauge"),
        ("epserve:kv_cache_usage_perc", "gauge"),
        ("epserve:state_slot_usage_perc", "gauge"),
        ("epserve:prompt_tokens", "counter"),
        ("epserve:generation_tokens", "counter"),
        ("epserve:request_success", "counter"),
        ("epserve:http_requests", "counter"),
        ("epserve:expert_load_imbalance", "gauge"),
    ):
        assert types.get(family) == kind, family


# ----------------------------------------------------------------------------------------------- prefix cache (API)
# Last in this file: requests here may leave prefixes in the cache; the last test resets it.

SALT_SYSTEM = "You answer questions about distributed systems, briefly and precisely. " * 12


def _salted_chat(app, salt: str | None, **kw):  # noqa: ANN001, ANN003, ANN202
    body = {"cache_salt": salt} if salt is not None else {}
    return _chat(app, max_tokens=1, temperature=0, extra_body=body, **kw)


def test_cache_salt_is_validated_and_usage_has_cached_tokens(app) -> None:  # noqa: ANN001
    """A bad cache_salt is a 400 naming it (chat and completions); usage always has
    prompt_tokens_details.cached_tokens (non-streaming, streaming with include_usage, completions), a multiple of 64
    below the prompt length, and 0 for a prompt in a salt namespace nothing was cached in."""
    for bad in ("", "s" * 257, 5):
        with pytest.raises(openai.BadRequestError) as info:
            _salted_chat(app, bad)  # type: ignore[arg-type]  # a wrong type on purpose
        assert info.value.param == "cache_salt", info.value.body
        with pytest.raises(openai.BadRequestError) as info:
            app.client.completions.create(model=app.model, prompt="x", max_tokens=1, extra_body={"cache_salt": bad})
        assert info.value.param == "cache_salt", info.value.body
    fresh = f"fresh-{time.monotonic_ns()}"
    out = _salted_chat(app, fresh, content=SALT_SYSTEM)
    details = out.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == 0, out.usage
    chunks = list(
        _chat(
            app,
            content=SALT_SYSTEM,
            max_tokens=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"cache_salt": fresh + "-2"},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    done = app.client.completions.create(
        model=app.model, prompt=[7] * 150, max_tokens=1, extra_body={"cache_salt": fresh}
    )
    cached = done.usage.prompt_tokens_details.cached_tokens
    assert cached % 64 == 0 and 0 <= cached < done.usage.prompt_tokens


def _has_prefix_cache(app) -> bool:  # noqa: ANN001
    """Whether the served engine has a prefix cache (its reset says so; resetting here changes nothing the tests
    after it rely on)."""
    return bool(requests.post(app.base + "/reset_prefix_cache", timeout=60).json()["complete"])


def _scrape_total(app, family: str) -> float:  # noqa: ANN001
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(app.base + "/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == family for s in f.samples)


def test_reset_prefix_cache_reaches_the_engine(app, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """POST /reset_prefix_cache answers with the engine replica's own report, and the CLI exits by it."""
    from epserve.cli import main

    r = requests.post(app.base + "/reset_prefix_cache", timeout=60)  # no body, as vLLM's clients send it
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "prefix_cache_reset" and body["expected_replicas"] == 1
    (replica,) = body["replicas"]
    if body["complete"]:  # the engine's own answer: what it dropped
        assert set(replica) == {"replica", "states", "blocks"} and body["dropped"] == {
            "states": replica["states"],
            "blocks": replica["blocks"],
        }
    else:
        assert replica["error"] == "this engine has no prefix cache" and body["dropped"] == {}
    assert requests.post(app.base + "/reset_prefix_cache", json={"x": 1}, timeout=60).status_code == 400
    code = main(["reset-prefix-cache", "--url", app.base])
    out = capsys.readouterr().out
    assert code == (0 if body["complete"] else 1)
    assert "prefix cache reset on 1 of 1 engine replicas" in out


def test_cached_tokens_from_the_chat_hints_and_salts_apart(app) -> None:  # noqa: ANN001
    """With the engine's prefix cache: a repeated chat hits at least at its last hint (the assistant header, rounded
    down to 64), the hits show in /metrics, another salt hits nothing, and after a reset nothing is cached."""
    if not _has_prefix_cache(app):
        pytest.skip("this engine has no prefix cache")
    r = requests.post(
        app.base + "/tokenize",
        json={
            "messages": [{"role": "system", "content": SALT_SYSTEM}, {"role": "user", "content": "What is EP?"}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ).json()
    from model_shards.tokenizer import Tokenizer

    im_start = Tokenizer.from_dir(app.folder).token_to_id("<|im_start|>")
    last_header = max(i for i, t in enumerate(r["tokens"]) if t == im_start)
    assert last_header >= 128  # the system prompt spans several 64-token blocks

    def ask(salt: str) -> int:
        out = app.client.chat.completions.create(
            model=app.model,
            messages=[{"role": "system", "content": SALT_SYSTEM}, {"role": "user", "content": "What is EP?"}],
            max_tokens=1,
            temperature=0,
            extra_body={"cache_salt": salt, "chat_template_kwargs": {"enable_thinking": False}},
        )
        assert out.usage.prompt_tokens == r["count"]
        return out.usage.prompt_tokens_details.cached_tokens

    time.sleep(2.5)  # earlier pushes
    hits_before = _scrape_total(app, "epserve:prefix_cache_hits")
    assert ask("tenant-a") == 0
    second = ask("tenant-a")
    assert second >= last_header // 64 * 64 and second % 64 == 0
    assert ask("tenant-b") == 0
    deadline = time.monotonic() + 15
    while _scrape_total(app, "epserve:prefix_cache_hits") - hits_before != second and time.monotonic() < deadline:
        time.sleep(1.0)
    assert _scrape_total(app, "epserve:prefix_cache_hits") - hits_before == second
    body = requests.post(app.base + "/reset_prefix_cache", json={}, timeout=60).json()
    assert body["complete"] and sum(body["dropped"].values()) > 0, body
    assert ask("tenant-a") == 0
    requests.post(app.base + "/reset_prefix_cache", timeout=60)
