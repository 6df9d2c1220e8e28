"""Incremental detokenization for streaming: token ids in, text deltas out.

Owns: turning generated ids into text pieces that never split a character. Byte-level BPE tokens
can end in the middle of a multi-byte UTF-8 character; such text is held back until a later token
completes it (vLLM's prefix/read offsets scheme), and `finish()` flushes what is left.
Invariant: the concatenation of all deltas equals `tokenizer.decode(all_ids, skip_special_tokens)`.
Must not: know about stop strings or requests (the engine does). Tests: tests/model_shards/test_tokenizer.py.
"""

from __future__ import annotations

from collections.abc import Iterable

from model_shards.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one generated sequence.

    NOTE: ids[prefix_offset:read_offset] is the last emitted piece; it is decoded again as context
    for the new ids so that decoders that depend on neighbouring tokens stay consistent, and the
    delta is the new text past that piece. read_offset only moves when the decoded window ends in a
    complete character (no trailing U+FFFD), which is a character boundary of the full text as well.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        """Start an empty sequence.

        Args:
            tokenizer: the tokenizer whose ids are fed.
            skip_special_tokens: drop special tokens from the text, as `Tokenizer.decode` does.
        """
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text_parts: list[str] = []
        self._finished = False

    @property
    def token_ids(self) -> list[int]:
        """All ids fed so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Add one id or several and return the text that became final.

        Args:
            token_ids: the next generated id(s).

        Returns:
            The new text; empty while a character is still incomplete.

        Raises:
            RuntimeError: `finish()` was already called.
        """
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.feed after finish(); start a new detokenizer")
        self._ids.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text_parts.append(delta)
        return delta

    def finish(self) -> str:
        """End the sequence and flush the held-back text (incomplete bytes come out as U+FFFD, as in `decode`).

        Returns:
            The remaining text; a second call returns "".
        """
        self._finished = True
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset, len(self._ids))
        delta = window_text[len(prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start == end:
            return ""
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)
