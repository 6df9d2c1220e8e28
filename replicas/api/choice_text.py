"""A choice's text in the front end: the engine's token ids in, text deltas out, stop strings ended.

Owns: incremental detokenization with the tokenizers library's `DecodeStream` (a character split
across tokens is held back until a later token completes it; what is still held when the choice
ends is flushed as `Tokenizer.decode` would write it), skip_special_tokens, and stop strings: text
that might start a stop string is held back; the token that completes a stop string ends the
choice and the tokens after it count nowhere (not in token_ids, logprobs or completion_tokens, as
OpenAI's API behaves). Invariant: without stop strings, the deltas join to
`tokenizer.decode(all ids, skip_special_tokens)`. Must not: talk to the engine
(replicas/api/engine_client.py does). Tests: tests/replicas/test_choice_text.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from model_shards.tokenizer import Tokenizer
from replicas.engine.engine_types import EngineFailure, GenerateOutput
from replicas.engine.step_types import TokenLogprobs


@dataclass(frozen=True)
class ChoiceDelta:
    """What one engine step added to one choice, as the client sees it.

    Attributes:
        index: choice index within its engine request (0..n-1).
        text: text delta (may be empty while a character or a possible stop string is held back).
        token_ids, logprobs: the step's tokens up to the one that completed a stop string.
        finish_reason: "stop", "length" or None while running.
        stop_reason: the stop string or stop token id that ended it, if any.
        completion_tokens: the choice's tokens so far, none past a stop string.
        error: set when the choice ended in an error instead of a finish reason.
    """

    index: int
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    error: EngineFailure | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class ChoiceText:
    """Text deltas of one choice.

    Args:
        tokenizer: the model's tokenizer.
        stop: stop strings. include_stop: keep the stop string in the text.
        skip_special_tokens: drop special tokens from the text, as `Tokenizer.decode` does.
        min_tokens: stop strings count only from this many tokens on (like eos and stop token ids in the engine).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: tuple[str, ...] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self._tok = tokenizer
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop
        self._min_tokens = min_tokens
        self._text = ""  # decoded so far (cut at a stop string)
        self._emitted = 0  # characters of _text already sent
        self._tokens = 0  # tokens taken so far
        # For the flush at the end: ids of the last group of tokens that produced text, and those since.
        self._prev: list[int] = []
        self._since: list[int] = []
        self.finished = False

    @property
    def text(self) -> str:
        return self._text

    def feed(self, out: GenerateOutput) -> ChoiceDelta:
        """Take one engine step's output of this choice; returns the delta to send. After a finished delta (the
        engine's end, or a stop string found here) the choice takes nothing more: don't feed it again."""
        if self.finished:
            raise RuntimeError("ChoiceText.feed after the choice finished")
        ids = out.token_ids
        kept = len(ids)
        stop_str: str | None = None
        for k, t in enumerate(ids):
            self._tokens += 1
            self._since.append(t)
            piece = self._stream.step(self._backend, t)
            if not piece:
                continue
            self._prev, self._since = self._since, []
            start = len(self._text)
            self._text += piece
            if self._stop and self._tokens >= self._min_tokens:
                hit = self._find_stop(start)
                if hit is not None:
                    cut, stop_str = hit
                    self._text = self._text[:cut]
                    kept = k + 1
                    break
        finish, error = out.finish_reason, out.error
        stop_reason: str | int | None = out.stop_reason
        if stop_str is not None:
            finish, stop_reason, error = "stop", stop_str, None
        elif out.finished:
            self._text += self._flush()
        if finish is not None or error is not None:
            self.finished = True
            text = self._text[self._emitted :]
            self._emitted = len(self._text)
        else:
            safe = max(self._emitted, len(self._text) - self._held())
            text = self._text[self._emitted : safe]
            self._emitted = safe
        dropped = len(ids) - kept
        return ChoiceDelta(
            index=out.index,
            text=text,
            token_ids=ids[:kept] if dropped else ids,
            logprobs=out.logprobs[:kept] if dropped else out.logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            completion_tokens=out.completion_tokens - dropped,
            error=error,
        )

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest stop string ending in the text past `start` (the new piece): (cut position, the string)."""
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = self._text.find(s, max(0, start - len(s) + 1))
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        return (pos + len(s) if self._include_stop else pos), s

    def _held(self) -> int:
        """Characters at the end of the text that could be the start of a stop string (held back)."""
        held = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), held, -1):
                if self._text.endswith(s[:n]):
                    held = n
                    break
        return held

    def _flush(self) -> str:
        """Text of the tokens the decoder still holds (an incomplete character comes out as U+FFFD, as in
        `decode`), decoded after the last group that produced text so that context-dependent decoding matches."""
        if not self._since:
            return ""
        since, self._since = self._since, []
        base = self._tok.decode(self._prev, skip_special_tokens=self._skip)
        full = self._tok.decode(self._prev + since, skip_special_tokens=self._skip)
        return full[len(base) :] if full.startswith(base) else self._tok.decode(since, skip_special_tokens=self._skip)
