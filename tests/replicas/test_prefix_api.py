"""The prefix cache's front end, without a server: `cache_salt` validation (HTTP models and the gRPC mapping), the
chat prompt's cache hints rendered with the real template, usage with `prompt_tokens_details.cached_tokens` as the
openai client reads it, the prefix-cache metrics' exposition, and `epserve reset-prefix-cache` when the server
cannot be reached. The real server's side is in tests/replicas/test_serving.py and tests/replicas/test_grpc.py.

Oracles: the rendered text's own `<|im_start|>` positions (tokenizing the text before one gives its index in the ids),
the openai package's response types, prometheus_client's parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from replicas.api.openai_protocol import (
    MAX_CACHE_SALT_LEN,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)

pytestmark = pytest.mark.timeout(300)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


# ----------------------------------------------------------------------------------------------- cache_salt


@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
@pytest.mark.parametrize("salt", ["tenant-a", "x", "é" * MAX_CACHE_SALT_LEN])
def test_cache_salt_accepted(body: dict, salt: str) -> None:
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    assert model.model_validate({**body, "cache_salt": salt}).cache_salt == salt
    assert model.model_validate(body).cache_salt is None


def _refusal(model: type, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
@pytest.mark.parametrize("salt", ["", "x" * (MAX_CACHE_SALT_LEN + 1), 7, ["a"], True])
def test_bad_cache_salt_is_a_400_naming_it(body: dict, salt: object) -> None:
    model = ChatCompletionRequest if "messages" in body else CompletionRequest
    err = _refusal(model, {**body, "cache_salt": salt})
    assert err.status == 400 and err.param == "cache_salt" and "cache_salt" in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_grpc_cache_salt_goes_through_the_same_validation() -> None:
    from replicas.api.grpc_service import chat_fields
    from replicas.proto import epserve_pb2 as pb

    msg = [pb.ChatMessage(role="user", content="hi")]
    assert "cache_salt" not in chat_fields(pb.ChatRequest(messages=msg), default_model="m")
    fields = chat_fields(pb.ChatRequest(messages=msg, cache_salt="t1"), default_model="m")
    assert ChatCompletionRequest.model_validate(fields).cache_salt == "t1"
    # an explicitly empty salt is set (proto3 optional), so it is refused like HTTP's ""
    fields = chat_fields(pb.ChatRequest(messages=msg, cache_salt=""), default_model="m")
    assert _refusal(ChatCompletionRequest, fields).param == "cache_salt"
    # the wire: old clients' messages parse unchanged (new field numbers only)
    old = pb.GenerateRequest(model="m", text="x").SerializeToString()
    assert not pb.GenerateRequest.FromString(old).HasField("cache_salt")


# ----------------------------------------------------------------------------------------------- cache hints


@pytest.fixture(scope="module")
def ctx(embedded_model_dir: Path):  # noqa: ANN201  # ModelContext of the embedded model (its real template)
    from replicas.api.request_builder import ModelContext

    return ModelContext.load(
        str(embedded_model_dir),
        name="m",
        max_model_len=4096,
        cache_tokens=4096,
        default_max_tokens=None,
        max_n=4,
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def _index_of(ctx: Any, text: str, char_pos: int) -> int:  # noqa: ANN401
    """Index in the ids of the token that starts at `char_pos` of the rendered text (tokenizing the text before it:
    the ChatML special tokens split tokenization, so the prefix tokenizes the same alone)."""
    return len(ctx.tokenizer.encode(text[:char_pos]))


def _expected_hints(ctx: Any, req: ChatCompletionRequest) -> tuple[int, ...]:  # noqa: ANN401
    """From the rendered text: the last turn start, and the turn start after the system/tools preamble."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    text = ctx.tokenizer.apply_chat_template(
        messages, tools=req.tools, add_generation_prompt=True, **(req.chat_template_kwargs or {})
    )
    starts = [i for i in range(len(text)) if text.startswith("<|im_start|>", i)]
    hints = {_index_of(ctx, text, starts[-1])}
    if messages[0]["role"] == "system" or req.tools:
        # the preamble is the first system turn (tools and the first system message together), plus any further
        # leading system messages, each a turn of its own
        lead = next(i for i, m in enumerate(messages) if m["role"] != "system")
        hints.add(_index_of(ctx, text, starts[max(lead, 1)]))
    return tuple(sorted(h for h in hints if h > 0))


def _chat(messages: list[dict], **kw: Any) -> ChatCompletionRequest:  # noqa: ANN401
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, **kw})


CASES = {
    "user-only": ([{"role": "user", "content": "Hello there"}], {}),
    "system": ([SYSTEM, {"role": "user", "content": "Hello there"}], {}),
    "tools-no-system": ([{"role": "user", "content": "Weather in Paris?"}], {"tools": TOOLS}),
    "tools-and-system": ([SYSTEM, {"role": "user", "content": "Weather in Paris?"}], {"tools": TOOLS}),
    "two-systems": ([SYSTEM, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {}),
    "thinking-off": ([SYSTEM, {"role": "user", "content": "Hi"}], {"chat_template_kwargs": {"enable_thinking": False}}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chat_hints_are_the_turn_starts_of_the_rendered_prompt(ctx, name: str) -> None:  # noqa: ANN001
    messages, kw = CASES[name]
    req = _chat(messages, **kw)
    chat = ctx.chat_prompt(req)
    im_start = ctx.tokenizer.token_to_id("<|im_start|>")
    assert chat.cache_hints == _expected_hints(ctx, req)
    assert all(chat.ids[h] == im_start for h in chat.cache_hints)
    # the last hint is the generation prompt's assistant header
    assert ctx.tokenizer.decode(chat.ids[chat.cache_hints[-1] :]).startswith("<|im_start|>assistant\n")
    assert len(chat.cache_hints) == (2 if messages[0]["role"] == "system" or "tools" in kw else 1)
    built = ctx.build(req, chat.ids, request_id="r", cache_hints=chat.cache_hints)
    assert built.cache_hints == chat.cache_hints and built.cache_salt is None


def test_multi_turn_chat_shares_the_prompt_up_to_the_previous_turns_last_header(ctx) -> None:  # noqa: ANN001
    """Turn k+1's prompt starts with turn k's prompt up to turn k's last hint (its assistant header), reasoning of
    earlier turns dropped by the template: the state kept there prefixes the next turn. The preamble hint is the
    same in every turn."""
    messages: list[dict[str, Any]] = [SYSTEM]
    previous: Any = None
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question number {turn}: " + "why? " * (turn * 7 + 3)})
        req = _chat(list(messages), tools=TOOLS)
        chat = ctx.chat_prompt(req)
        assert chat.cache_hints == _expected_hints(ctx, req)
        if previous is not None:
            last = previous.cache_hints[-1]
            assert chat.ids[:last] == previous.ids[:last]
            # where the previous turn's generation prompt began, this turn has that reply's header
            assert ctx.tokenizer.decode(chat.ids[last : last + 3]).startswith("<|im_start|>assistant\n")
            assert chat.cache_hints[0] == previous.cache_hints[0]  # the preamble's end does not move
            assert chat.cache_hints[-1] > last
        # the model's reply, with reasoning (dropped from the next turn's rendering)
        messages.append(
            {"role": "assistant", "content": f"Answer {turn}. " * 9, "reasoning_content": "Let me think. " * 6}
        )
        previous = chat


def test_completions_carry_no_hints_and_the_salt(ctx) -> None:  # noqa: ANN001
    req = CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "cache_salt": "t"})
    g = ctx.build(req, [1, 2, 3], request_id="r")
    assert g.cache_hints == () and g.cache_salt == "t"


def test_hints_without_a_turn_token_are_empty() -> None:
    from replicas.api.request_builder import chat_cache_hints

    assert chat_cache_hints([1, 2, 3], [{"role": "user"}], has_tools=False, turn_start=None) == ()
    assert chat_cache_hints([1, 2, 3], [{"role": "user"}], has_tools=False, turn_start=9) == ()


# ----------------------------------------------------------------------------------------------- usage


def test_usage_has_cached_tokens_as_the_openai_types_read_it() -> None:
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from replicas.api.openai_responses import ChoiceState, chat_response, completion_response, usage_chunk

    class Tok:
        def decode(self, ids: list[int]) -> str:
            return "".join(chr(97 + i % 26) for i in ids)

    choice = [ChoiceState(index=0, text="ok", finish_reason="stop", completion_tokens=2)]
    chat = chat_response("id", "m", choice, prompt_tokens=200, tok=Tok(), want_logprobs=False, cached_tokens=128)
    u = ChatCompletion.model_validate(chat).usage
    assert u is not None and u.prompt_tokens_details is not None
    assert (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens) == (200, 2, 128)
    plain = completion_response("id", "m", choice, prompt_tokens=10, tok=Tok(), want_logprobs=False)  # type: ignore[arg-type]  # a stand-in tokenizer
    u = Completion.model_validate(plain).usage
    assert u is not None and u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 0
    chunk = ChatCompletionChunk.model_validate(usage_chunk("id", "m", 0, "chat.completion.chunk", 300, 4, 256))
    assert chunk.usage is not None and chunk.usage.prompt_tokens_details is not None
    assert chunk.usage.prompt_tokens_details.cached_tokens == 256 and chunk.usage.total_tokens == 304


# ----------------------------------------------------------------------------------------------- metrics


def _families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict[str, Any], family: str) -> float:
    return sum(s.value for s in fams[family].samples if not s.name.endswith("_created"))


def test_prefix_cache_metrics_have_vllms_names_and_never_go_down() -> None:
    from replicas.serving.metrics import MetricsHub, MetricsRegistry, record_prefix_cache

    a, b = MetricsRegistry(), MetricsRegistry()
    record_prefix_cache(a, {})  # an engine without the prefix cache: zeros, same families
    fams = _families(a.exposition())
    for name, kind in (
        ("epserve:prefix_cache_queries", "counter"),
        ("epserve:prefix_cache_hits", "counter"),
        ("epserve:prefix_cache_states_stored", "counter"),
        ("epserve:prefix_cache_states_evicted", "counter"),
        ("epserve:prefix_cache_states", "gauge"),
        ("epserve:prefix_cache_blocks", "gauge"),
    ):
        assert fams[name].type == kind and _value(fams, name) == 0, name
    assert "epserve:prefix_cache_hits_total" in a.exposition()  # vLLM's sample name, our prefix

    hub = MetricsHub("m")
    stats = {
        "prefix_cache_queries": 1000,
        "prefix_cache_hits": 640,
        "prefix_cache_states_stored": 3,
        "prefix_cache_states_evicted": 1,
        "prefix_cache_states": 2,
        "prefix_cache_blocks": 40,
    }
    record_prefix_cache(a, stats)
    hub.push("a", a.snapshot())
    record_prefix_cache(b, {**stats, "prefix_cache_hits": 64, "prefix_cache_states": 1})
    hub.push("b", b.snapshot())
    fams = _families(hub.exposition())
    assert _value(fams, "epserve:prefix_cache_hits") == 704
    assert _value(fams, "epserve:prefix_cache_queries") == 2000
    assert _value(fams, "epserve:prefix_cache_states") == 3
    assert all(s.labels["model_name"] == "m" for s in fams["epserve:prefix_cache_hits"].samples)
    # the engine's count restarts (a rebuilt engine): the exported counter carries on from where it was
    record_prefix_cache(a, {**stats, "prefix_cache_hits": 10})
    hub.push("a", a.snapshot())
    assert _value(_families(hub.exposition()), "epserve:prefix_cache_hits") == 640 + 10 + 64
    # a replica that goes away keeps its counts in the totals; its gauges leave
    hub.retire("b")
    fams = _families(hub.exposition())
    assert _value(fams, "epserve:prefix_cache_hits") == 714 and _value(fams, "epserve:prefix_cache_states") == 2


# ----------------------------------------------------------------------------------------------- CLI


def test_reset_prefix_cache_cli_names_an_unreachable_server(capsys: pytest.CaptureFixture) -> None:
    from cluster.process_groups import free_port
    from epserve.cli import main

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["reset-prefix-cache", "--url", url, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epserve reset-prefix-cache: error: cannot reach ") and url in err
    assert main(["reset-prefix-cache", "--url", "127.0.0.1:8000"]) == 2
    assert "--url must start with http://" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- hints -> hits


def test_chat_hints_make_the_next_turn_hit_in_the_engine(ctx, embedded_model_dir: Path) -> None:  # noqa: ANN001
    """The requests the front end builds, run by the in-process engine with its prefix cache: turn 2 of a chat hits
    at least at turn 1's last hint rounded down to 64 (the state kept at the assistant header), a repeated prompt
    hits in its own salt only, and RequestOutput.cached_tokens is what the front end reads (EngineStream)."""
    import asyncio

    from model_shards.model import LocalModel
    from replicas.api.engine_client import EngineStream
    from replicas.engine.block_pool import BlockPool
    from replicas.engine.engine import Engine
    from replicas.engine.prefix_config import PrefixCacheConfig
    from replicas.engine.scheduler import SchedulerConfig
    from replicas.ep.actors import CacheSizes
    from replicas.ep.local_runner import LocalRunner

    model = LocalModel.load(embedded_model_dir, dtype="float32")
    sizes = CacheSizes(num_blocks=200, block_size=16, num_slots=4, state_checkpoints=8)
    engine = Engine(
        LocalRunner(model, sizes),
        pools=[BlockPool(num_blocks=200, num_slots=4, block_size=16, num_checkpoints=8)],
        config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256),
        max_waiting=8,
        prefix_cache=PrefixCacheConfig(),
    )
    assert engine.prefix_caches is not None

    def request(messages: list[dict], salt: str | None, rid: str) -> Any:  # noqa: ANN401  # GenerateRequest
        req = _chat(messages, max_tokens=2, temperature=0, cache_salt=salt, ignore_eos=True)
        chat = ctx.chat_prompt(req)
        return chat, ctx.build(req, chat.ids, request_id=rid, cache_hints=chat.cache_hints)

    async def run(greq: Any) -> int:  # noqa: ANN401
        gen = engine.generate(greq)
        stream = EngineStream(gen, await gen.__anext__(), greq)
        async for item in gen:
            stream.cached_tokens = max(stream.cached_tokens, item.cached_tokens)
        return stream.cached_tokens

    async def main() -> None:
        engine.start()
        try:
            turn1 = [SYSTEM, {"role": "user", "content": "Explain expert parallelism. " * 6}]
            chat1, g1 = request(turn1, "a", "t1")
            assert await run(g1) == 0
            turn2 = [
                *turn1,
                {"role": "assistant", "content": "It splits experts."},
                {"role": "user", "content": "Why?"},
            ]
            chat2, g2 = request(turn2, "a", "t2")
            hit = await run(g2)
            assert chat2.ids[: chat1.cache_hints[-1]] == chat1.ids[: chat1.cache_hints[-1]]
            assert hit % 64 == 0 and chat1.cache_hints[-1] // 64 * 64 <= hit < len(chat2.ids), (hit, chat1.cache_hints)
            _, g3 = request(turn2, "b", "t3")
            assert await run(g3) == 0  # another salt: nothing shared
            _, g4 = request(turn2, "a", "t4")
            assert await run(g4) >= hit
        finally:
            await engine.stop()

    asyncio.run(main())
