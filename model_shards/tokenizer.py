"""The runtime tokenizer used by the CLI and the server: a checkpoint folder's tokenizer files.

Owns: loading tokenizer.json (with `tokenizers`) and tokenizer_config.json (special tokens, chat
template, or a chat_template.jinja file that overrides it), encode/decode without BOS or padding,
and chat rendering through model_shards/chat_template.py.
Must not: import transformers (serving needs only `tokenizers` and jinja2); write tokenizer files
(that is model_shards/tokenizer_files.py). Streaming text: replicas/api/choice_text.py.
Tests: tests/model_shards/test_tokenizer.py (oracles: transformers' AutoTokenizer, tiktoken).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from model_shards.chat_template import ChatTemplate

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Special-token roles from tokenizer_config.json handed to the template, as transformers does.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerMissing(FileNotFoundError):
    """The checkpoint folder has no tokenizer.json."""


class Tokenizer:
    """Byte-level BPE tokenizer of a checkpoint, with its chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        model_max_length: int | None = None,
    ) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`.

        Args:
            backend: the tokenizer; its padding and truncation are turned off (prompts are never cut here).
            chat_template: jinja source, or None when the checkpoint has none.
            special_tokens: role -> token text, for the roles in SPECIAL_TOKEN_KEYS that are set.
            model_max_length: the context length from tokenizer_config.json, if given.
        """
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._chat_template = ChatTemplate(chat_template) if chat_template is not None else None
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder.

        The chat template is `chat_template.jinja` in the folder when that file exists, else the
        `chat_template` entry of tokenizer_config.json (a string, or a list of named templates
        from which "default" is taken).

        Args:
            path: the checkpoint folder.

        Returns:
            The tokenizer.

        Raises:
            TokenizerMissing: the folder has no tokenizer.json.
        """
        folder = Path(path)
        tokenizer_json = folder / TOKENIZER_JSON
        if not tokenizer_json.is_file():
            raise TokenizerMissing(
                f"no {TOKENIZER_JSON} in {folder}: a checkpoint folder needs its tokenizer files "
                f"({TOKENIZER_JSON}, {TOKENIZER_CONFIG_JSON}); copy them from the original model folder"
            )
        config_path = folder / TOKENIZER_CONFIG_JSON
        config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            chat_template: str | None = template_file.read_text(encoding="utf-8")
        else:
            chat_template = _template_from_config(config.get("chat_template"))
        special_tokens = {
            key: token for key in SPECIAL_TOKEN_KEYS if (token := _token_text(config.get(key))) is not None
        }
        max_length = config.get("model_max_length")
        return cls(
            BackendTokenizer.from_file(str(tokenizer_json)),
            chat_template=chat_template,
            special_tokens=special_tokens,
            model_max_length=int(max_length) if isinstance(max_length, (int, float)) else None,
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        """The jinja source of the chat template, or None."""
        return self._chat_template.source if self._chat_template is not None else None

    @property
    def eos_token_id(self) -> int | None:
        """Id of tokenizer_config.json's `eos_token`, or None when unset."""
        eos = self.special_tokens.get("eos_token")
        return self.token_to_id(eos) if eos is not None else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added, and special-token text becomes its special token.

        Args:
            text: the text.

        Returns:
            The ids.
        """
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_pieces(self, text: str, piece_chars: int = 16384) -> Iterator[list[int]]:
        """`encode(text)` in pieces of about `piece_chars` characters, concatenating to exactly the same ids.

        Cuts only at a space between two letters: with a byte-level BPE whose pre-tokenizer puts a space in
        front of the word after it (GPT-2 / Qwen style), every pre-token ends before such a space, and NFC
        cannot compose across it. Each `tokenizers` call holds the GIL; pieces keep those holds short, so a
        long prompt tokenized in a worker thread does not stall an event loop, and a caller can stop early.
        Tokenizers of another style get one piece (the whole text).
        """
        if len(text) <= piece_chars or not self._splits_before_spaced_words():
            yield self.encode(text)
            return
        start = 0
        while start < len(text):
            end = start + piece_chars
            if end >= len(text):
                end = len(text)
            else:
                end = _letter_space_letter(text, end)
            yield self.encode(text[start:end])
            start = end

    def _splits_before_spaced_words(self) -> bool:
        cached = getattr(self, "_spaced_split", None)
        if cached is None:
            pre = self._backend.pre_tokenizer
            added = self._backend.get_added_tokens_decoder().values()
            cached = (
                pre is not None
                and [p for p, _ in pre.pre_tokenize_str("ab cd")] == ["ab", "\u0120cd"]
                and not any(" " in t.content for t in added)
            )
            self._spaced_split = cached
        return cached

    def longest_token_chars(self) -> int:
        """Upper bound on the characters one token covers (its bytes; added tokens' text), so a text of
        c characters has at least c / this many tokens."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return max(len(t) for t in vocab)  # byte-level strings: one character per byte

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form UTF-8 come out as U+FFFD.

        Args:
            ids: token ids.
            skip_special_tokens: drop tokens marked special (`<think>`, `<tool_call>` and the like
                are not special in Qwen3.5 and stay).

        Returns:
            The text.
        """
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> BackendTokenizer:
        """The `tokenizers.Tokenizer` (what `tokenizers.decoders.DecodeStream` steps with)."""
        return self._backend

    def token_to_id(self, token: str) -> int | None:
        """Id of a token's text (byte-level form for ordinary tokens), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token text (byte-level form for ordinary tokens) of an id, or None when out of range."""
        return self._backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,  # noqa: ANN401
    ) -> str:
        """Render a conversation to prompt text with the checkpoint's chat template.

        Args:
            messages: OpenAI-style messages; tool-call arguments may be a dict or a JSON string.
            tools: OpenAI-style tool schemas, or None.
            add_generation_prompt: end with the header of a new assistant turn.
            **template_kwargs: template variables, e.g. `enable_thinking=False`.

        Returns:
            The prompt text (encode it with `encode`).

        Raises:
            ValueError: the checkpoint has no chat template.
            ChatTemplateError: the template rejected the messages (a ValueError too).
        """
        if self._chat_template is None:
            raise ValueError(
                f"this tokenizer has no chat template: add `chat_template` to {TOKENIZER_CONFIG_JSON} "
                f"or a {CHAT_TEMPLATE_FILE} file to the checkpoint folder"
            )
        return self._chat_template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **template_kwargs},
        )


def _template_from_config(entry: Any) -> str | None:  # noqa: ANN401
    # Older configs store several named templates; "default" is the one used for plain chat.
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list):
        named = {item.get("name"): item.get("template") for item in entry if isinstance(item, Mapping)}
        return named.get("default")
    raise ValueError(f"{TOKENIZER_CONFIG_JSON}: chat_template must be a string or a list, got {type(entry).__name__}")


def _token_text(entry: Any) -> str | None:  # noqa: ANN401
    # Special tokens appear as plain strings or as serialized AddedToken dicts with a "content" key.
    if isinstance(entry, Mapping):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _letter_space_letter(text: str, at: int) -> int:
    """The first index >= `at` of a space between two letters, else len(text) (no safe cut: one piece)."""
    i = text.find(" ", max(at, 1))
    while 0 < i < len(text) - 1:
        if text[i - 1].isalpha() and text[i + 1].isalpha():
            return i
        i = text.find(" ", i + 1)
    return len(text)
