"""What a benchmark sends: prompts with their planned output lengths.

Three datasets, as in `vllm bench serve` and `sglang.bench_serving`:
- random: prompts of random tokens; lengths drawn uniformly in [len*(1-r), len*(1+r)]. With a
  tokenizer (the served model's) the prompt is text of exactly that many tokens, found by round
  trip as vLLM's benchmark does (decode random ids, re-encode, add or drop ids until the count
  matches), so any OpenAI-schema server takes it; without one it is a token-id list.
- sharegpt: a ShareGPT-format JSON file; the first human turn is the prompt (sent as text), the
  length of the gpt turn that answers it (tokenized) is the output length; vLLM's filters apply.
- shared-prefix: groups of random prompts that share a long random prefix (prefix caching).
Output lengths are exact on the server side only with `--ignore-eos` (the clients then send
`ignore_eos` and min_tokens = max_tokens). Must not: send requests (a remote tokenizer may be
asked to encode and decode). Tests: tests/loadtest/test_bench.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from model_shards.tokenizer import Tokenizer


class TextCodec(Protocol):
    """What text prompts need of a tokenizer: model_shards.tokenizer.Tokenizer, or the server's
    /tokenize and /detokenize (loadtest/remote_tokenizer.py)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# Without a tokenizer random ids come from [0, 32000): ordinary tokens of every current vocabulary.
DEFAULT_TOKEN_HIGH = 32000
# Rounds of decode -> re-encode -> adjust before a prompt keeps the length it has (vLLM's bound is 10 too).
MAX_FIT_ROUNDS = 10
# vLLM's ShareGPT filters: drop too-short turns and too-long pairs.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class BenchRequest:
    """One request to send.

    Args:
        prompt: token ids (sent as a token-id prompt) or text.
        prompt_len: prompt tokens (exact for ids; the tokenizer's count of the text).
        output_len: tokens to generate (max_tokens = min_tokens, with ignore_eos).
        group: the prefix group (shared-prefix), else None.
    """

    prompt: tuple[int, ...] | str
    prompt_len: int
    output_len: int
    group: int | None = None


@dataclass(frozen=True)
class TokenSpace:
    """Token ids random prompts are drawn from: [0, high) minus `excluded` (special/added tokens)."""

    high: int = DEFAULT_TOKEN_HIGH
    excluded: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        allowed = np.setdiff1d(np.arange(self.high, dtype=np.int64), np.fromiter(self.excluded, dtype=np.int64))
        if allowed.size == 0:
            raise ValueError(f"no token ids left in [0, {self.high}) after excluding {len(self.excluded)} ids")
        object.__setattr__(self, "_allowed", allowed)  # frozen dataclass: a cache, not a field

    def sample(self, rng: np.random.Generator, n: int) -> tuple[int, ...]:
        """`n` ids drawn uniformly (with replacement) from the allowed ones."""
        allowed: np.ndarray = self._allowed  # type: ignore[attr-defined]  # set in __post_init__
        return tuple(allowed[rng.integers(0, allowed.size, size=n)].tolist())

    @classmethod
    def from_tokenizer_dir(cls, folder: str | Path, tokenizer: Tokenizer | None = None) -> TokenSpace:
        """The tokenizer's whole vocabulary minus its added (special) tokens (`tokenizer`: the folder's, if loaded)."""
        from model_shards.tokenizer import Tokenizer

        tok = tokenizer if tokenizer is not None else Tokenizer.from_dir(folder)
        config = Path(folder) / "tokenizer_config.json"
        added = json.loads(config.read_text()).get("added_tokens_decoder", {}) if config.is_file() else {}
        return cls(high=tok.vocab_size, excluded=frozenset(int(k) for k in added))


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths drawn around `length` (vLLM's --random-range-ratio).

    Raises:
        ValueError: length < 1 or range_ratio outside [0, 1).
    """
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    return max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio))


def _lengths(rng: np.random.Generator, length: int, range_ratio: float, n: int) -> list[int]:
    low, high = length_bounds(length, range_ratio)
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def fit_text(
    codec: TextCodec,
    ids: tuple[int, ...],
    target: int,
    *,
    rng: np.random.Generator,
    space: TokenSpace,
    prefix: str = "",
) -> tuple[str, int]:
    """Text that `codec` encodes to `target` tokens: `prefix` + the text of `ids`, adjusted by round trip.

    Decoding random ids and encoding the text again rarely gives the same count (merges across ids,
    bytes that are not UTF-8 alone): ids are dropped or drawn until the count matches, for at most
    MAX_FIT_ROUNDS rounds (vLLM's gen_prompt_decode_to_target_len does the same).

    Returns:
        (text, its token count): the count is `target` unless the rounds ran out (then the true count).
    """
    body = list(ids)
    text, n = prefix, 0
    for _ in range(MAX_FIT_ROUNDS):
        text = prefix + codec.decode(body)
        n = len(codec.encode(text))
        if n == target:
            break
        if n > target:
            body = body[: max(1, len(body) - (n - target))]
        else:
            body += space.sample(rng, target - n)
    return text, n


def random_requests(
    n: int,
    *,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    space: TokenSpace = TokenSpace(),
    codec: TextCodec | None = None,
) -> list[BenchRequest]:
    """`n` prompts of random tokens: text when a `codec` is given, else token-id lists.

    Args:
        input_len, output_len: centre of the prompt and output lengths.
        range_ratio: lengths are uniform in [len*(1-r), len*(1+r)] (integers, inclusive).
        seed: fixes ids and lengths.
        space: the ids to draw from.
        codec: the served model's tokenizer; prompts become text of the drawn length (`fit_text`).
    """
    rng = np.random.default_rng(seed)
    ins, outs = _lengths(rng, input_len, range_ratio, n), _lengths(rng, output_len, range_ratio, n)
    if codec is None:
        return [BenchRequest(space.sample(rng, i), i, o) for i, o in zip(ins, outs)]
    out = []
    for i, o in zip(ins, outs):
        text, n_tokens = fit_text(codec, space.sample(rng, i), i, rng=rng, space=space)
        out.append(BenchRequest(text, n_tokens, o))
    return out


def shared_prefix_requests(
    n: int,
    *,
    groups: int,
    prefix_len: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    space: TokenSpace = TokenSpace(),
    codec: TextCodec | None = None,
    group_firsts_first: bool = False,
) -> list[BenchRequest]:
    """`n` random prompts in `groups` groups; every prompt of a group starts with the group's prefix.

    Prompt i belongs to group i % groups; the order is shuffled (as sglang's generated-shared-prefix).
    The question after the prefix has a length drawn around `input_len`. With a `codec` prompts are
    text: each group's prefix text is `prefix_len` tokens, and prefix + question text is the whole length.
    Without one they are token ids of exact lengths. `group_firsts_first`: one request of each group leads
    (groups in order), the others follow shuffled, so every group's prefix is prefilled once before it repeats.
    """
    if groups < 1 or prefix_len < 1:
        raise ValueError(f"shared-prefix needs groups >= 1 and a prefix >= 1 token, got {groups}, {prefix_len}")
    rng = np.random.default_rng(seed)
    prefixes = [space.sample(rng, prefix_len) for _ in range(groups)]
    ins, outs = _lengths(rng, input_len, range_ratio, n), _lengths(rng, output_len, range_ratio, n)
    if codec is None:
        reqs = [
            BenchRequest(prefixes[i % groups] + space.sample(rng, q), prefix_len + q, o, i % groups)
            for i, (q, o) in enumerate(zip(ins, outs))
        ]
    else:
        texts = [fit_text(codec, p, prefix_len, rng=rng, space=space) for p in prefixes]
        reqs = []
        for i, (q, o) in enumerate(zip(ins, outs)):
            prefix, prefix_tokens = texts[i % groups]
            target = prefix_tokens + q
            text, n_tokens = fit_text(codec, space.sample(rng, q), target, rng=rng, space=space, prefix=prefix)
            reqs.append(BenchRequest(text, n_tokens, o, i % groups))
    if group_firsts_first:
        firsts = min(groups, n)
        return reqs[:firsts] + [reqs[firsts + i] for i in rng.permutation(n - firsts)]
    order = rng.permutation(n)
    return [reqs[i] for i in order]


def sharegpt_pairs(data: Iterable[dict]) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn answering it) of every conversation that has both."""
    pairs = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("conversation") or []
        for i, turn in enumerate(turns[:-1]):
            if turn.get("from") == "human":
                nxt = turns[i + 1]
                if nxt.get("from") == "gpt" and turn.get("value") and nxt.get("value"):
                    pairs.append((turn["value"], nxt["value"]))
                break
    return pairs


def sharegpt_requests(
    path: str | Path,
    n: int,
    *,
    tokenizer: Tokenizer,
    seed: int = 0,
    output_len: int | None = None,
    max_prompt_len: int = SHAREGPT_MAX_PROMPT_LEN,
    max_total_len: int = SHAREGPT_MAX_TOTAL_LEN,
) -> list[BenchRequest]:
    """`n` text prompts from a ShareGPT JSON file (a list of {"conversations": [{"from", "value"}...]}).

    Conversations are shuffled with `seed` and tokenized until `n` pass vLLM's filters: prompt and
    output >= 4 tokens, prompt <= max_prompt_len, prompt + output <= max_total_len.

    Args:
        output_len: fixed output length instead of the gpt turn's.

    Raises:
        ValueError: the file is not ShareGPT-shaped, or fewer than `n` conversations pass.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = sharegpt_pairs(data)
    rng = np.random.default_rng(seed)
    out: list[BenchRequest] = []
    for i in rng.permutation(len(pairs)):
        prompt, answer = pairs[i]
        p_len = len(tokenizer.encode(prompt))
        o_len = output_len if output_len is not None else len(tokenizer.encode(answer))
        too_short = p_len < SHAREGPT_MIN_LEN or (output_len is None and o_len < SHAREGPT_MIN_LEN)
        if too_short or p_len > max_prompt_len or p_len + o_len > max_total_len:
            continue
        out.append(BenchRequest(prompt, p_len, o_len))
        if len(out) == n:
            return out
    raise ValueError(
        f"{path}: only {len(out)} of {len(pairs)} conversations pass the length filters; --num-prompts asks for {n}"
    )
