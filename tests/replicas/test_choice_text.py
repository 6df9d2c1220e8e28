"""The front end's text of a choice (replicas/api/choice_text.py): incremental decoding and stop strings.

Oracles: `Tokenizer.decode` of the whole id list (the deltas must join to it, random ids with split
multi-byte characters and special tokens, both skip_special_tokens settings), and `decode` of id
prefixes for stop strings (the first prefix whose text holds the stop string is where the choice
ends: its token ids, logprobs and completion_tokens stop there). Fast: tokenizer only, no model.
"""

from __future__ import annotations

import random

import pytest

from model_shards.tokenizer import Tokenizer
from model_shards.tokenizer_files import byte_to_unicode, write_tokenizer_files
from replicas.api.choice_text import ChoiceDelta, ChoiceText
from replicas.engine.engine_types import GenerateOutput
from replicas.engine.step_types import TokenLogprobs

NUM_TOKENS = 248_077
FIRST_SPECIAL_ID = 248_044

CORPUS = {
    "emoji": "Emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 and ❤️‍🔥 done",
    "cjk": "你好，世界！这是一个测试。日本語のテキストとカタカナ。한국어 문장입니다.",
    "mixed_scripts": "Привет мир; مرحبا بالعالم; שלום; नमस्ते; ภาษาไทย; Ελληνικά",
    "special_text": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "<tool_call>x</tool_call><think>y</think><|endoftext|>"
    ),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("qwen3_5-tokenizer")
    write_tokenizer_files(folder, cache_dir=tmp_path_factory.mktemp("cache"))
    return Tokenizer.from_dir(folder)


def _byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of the 256 single-byte tokens: they split and break UTF-8 sequences."""
    return [tok.token_to_id(symbol) for symbol in byte_to_unicode().values()]  # type: ignore[misc]  # all exist


def _feed(text: ChoiceText, ids: list[int], *, chunk: int = 1, finish: str = "length") -> list[ChoiceDelta]:
    """Feed `ids` as engine step outputs of `chunk` tokens each (chunk > 1: accepted drafts); the last one ends the
    choice with `finish` unless a stop string ended it first. Logprobs carry the token's position."""
    out = []
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        end = start + len(piece) == len(ids)
        delta = text.feed(
            GenerateOutput(
                index=0,
                token_ids=tuple(piece),
                logprobs=tuple(TokenLogprobs(float(-start - j)) for j in range(len(piece))),
                finish_reason=finish if end else None,
                completion_tokens=start + len(piece),
            )
        )
        out.append(delta)
        if delta.finished:
            break
    return out


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("skip", [False, True], ids=["keep_special", "skip_special"])
def test_deltas_join_to_decode_of_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(20240611)
    byte_ids = _byte_ids(tok)
    specials = list(range(FIRST_SPECIAL_ID, NUM_TOKENS))
    for trial in range(200):
        ids = [
            rng.choice(byte_ids) if r < 0.5 else rng.choice(specials) if r < 0.6 else rng.randrange(NUM_TOKENS)
            for r in (rng.random() for _ in range(rng.randint(1, 40)))
        ]
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunk in (1, 3):
            deltas = _feed(ChoiceText(tok, skip_special_tokens=skip), ids, chunk=chunk)
            assert "".join(d.text for d in deltas) == expected, (trial, chunk, ids)
            assert [t for d in deltas for t in d.token_ids] == ids
            assert deltas[-1].completion_tokens == len(ids) and deltas[-1].finish_reason == "length"


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_text_round_trips_without_replacement_characters(tok: Tokenizer, name: str) -> None:
    ids = tok.encode(CORPUS[name])
    for skip in (False, True):
        deltas = _feed(ChoiceText(tok, skip_special_tokens=skip), ids)
        assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d.text for d in deltas)


def test_split_character_held_until_complete(tok: Tokenizer) -> None:
    to_symbol = byte_to_unicode()
    ids = [tok.token_to_id(to_symbol[b]) for b in "a😀中".encode()]
    deltas = _feed(ChoiceText(tok), ids, finish="stop")  # type: ignore[arg-type]  # all exist
    assert [d.text for d in deltas] == ["a", "", "", "", "😀", "", "", "中"]


def test_incomplete_tail_flushed_as_decode_writes_it(tok: Tokenizer) -> None:
    to_symbol = byte_to_unicode()
    ids = [tok.token_to_id(to_symbol[b]) for b in "x中".encode()[:-1]]
    deltas = _feed(ChoiceText(tok), ids)  # type: ignore[arg-type]  # all exist
    assert [d.text for d in deltas] == ["x", "", tok.decode(ids)[1:]] and deltas[-1].text == "\ufffd"


def test_feeding_a_finished_choice_is_refused(tok: Tokenizer) -> None:
    text = ChoiceText(tok)
    text.feed(GenerateOutput(index=0, token_ids=(9707,), finish_reason="length", completion_tokens=1))
    with pytest.raises(RuntimeError):
        text.feed(GenerateOutput(index=0, token_ids=(9707,), completion_tokens=2))


# ---------------------------------------------------------------------------- stop strings
STORY = "Once upon a time, 在一个小村庄 there lived a fox 😀 who loved numbers: 1234567 and more words here."


def _first_prefix_with(tok: Tokenizer, ids: list[int], stop: str) -> int:
    """Oracle: the number of tokens after which the decoded text first holds `stop`."""
    return next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=True))


@pytest.mark.parametrize("include", [False, True], ids=["cut", "include"])
@pytest.mark.parametrize("chunk", [1, 3], ids=["one_token_steps", "three_token_steps"])
def test_stop_string_ends_at_the_token_that_completes_it(tok: Tokenizer, include: bool, chunk: int) -> None:
    ids = tok.encode(STORY)
    stops = ["村", "a fox", "23456", "lived a f", "😀", "here."]
    for stop in stops:
        k = _first_prefix_with(tok, ids, stop)
        prefix = tok.decode(ids[:k], skip_special_tokens=True)
        pos = prefix.index(stop)
        want_text = prefix[: pos + len(stop)] if include else prefix[:pos]
        deltas = _feed(ChoiceText(tok, stop=(stop,), include_stop=include), ids, chunk=chunk)
        last = deltas[-1]
        assert (last.finish_reason, last.stop_reason) == ("stop", stop)
        assert "".join(d.text for d in deltas) == want_text, stop
        assert [t for d in deltas for t in d.token_ids] == ids[:k], stop  # nothing past the completing token
        assert [lp.logprob for d in deltas for lp in d.logprobs] == [float(-i) for i in range(k)], stop
        assert last.completion_tokens == k, stop


def test_text_that_may_start_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    stop = "gamma rays"
    ids = tok.encode("alpha beta gamma delta gam")
    deltas = _feed(ChoiceText(tok, stop=(stop,)), ids)
    sent = ""
    for k, d in enumerate(deltas[:-1], start=1):
        sent += d.text
        text = tok.decode(ids[:k])
        held = max((n for n in range(len(stop)) if n and text.endswith(stop[:n])), default=0)
        assert sent == text[: len(text) - held], k  # everything but a possible start of the stop string
    assert sent.endswith("beta ") or sent.endswith("delta") or sent.endswith("delta ")
    assert "".join(d.text for d in deltas) == tok.decode(ids)  # no stop: the held text comes out at the end
    assert deltas[-1].finish_reason == "length" and deltas[-1].stop_reason is None


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four")
    deltas = _feed(ChoiceText(tok, stop=("four", "two")), ids, chunk=4)
    assert "".join(d.text for d in deltas) == "one "
    assert deltas[-1].stop_reason == "two"


def test_stop_strings_wait_for_min_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("ab ab ab ab ab ab")
    first = _first_prefix_with(tok, ids, "ab")
    deltas = _feed(ChoiceText(tok, stop=("ab",), min_tokens=first + 2), ids)
    assert deltas[-1].completion_tokens >= first + 2 and deltas[-1].stop_reason == "ab"
    assert "".join(d.text for d in deltas).count("ab") >= 1


def test_engine_stop_keeps_its_token_id_reason(tok: Tokenizer) -> None:
    text = ChoiceText(tok, stop=("zzz",))
    d = text.feed(GenerateOutput(index=0, token_ids=(9707, 248046), finish_reason="stop", stop_reason=248046))
    assert (d.finish_reason, d.stop_reason, d.token_ids) == ("stop", 248046, (9707, 248046))
    assert d.text == tok.decode([9707, 248046], skip_special_tokens=True)
