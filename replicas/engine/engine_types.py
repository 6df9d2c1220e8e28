"""Messages between the front end and the engine: a validated generation request and its stream items.

Plain frozen dataclasses (picklable across Serve handles, never dicts). Validation against
the model (context length, vocabulary) happens in the ingress before a request is built;
the engine re-checks at admission what could fail a group step (replicas/engine/step_guard.py).
Tests: tests/replicas/test_engine.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_shards.sampling import SamplingParams
from replicas.engine.step_types import TokenLogprobs


@dataclass(frozen=True)
class GenerateRequest:
    """One completion request (n choices) with sampling already resolved against the defaults.

    Attributes:
        params: sampling; `params.seed` is the base seed (choice i uses seed + i).
        max_tokens: tokens to generate at most per choice (already capped by the context).
        min_tokens: eos and stop_token_ids cannot be sampled before this many tokens.
        stop: stop strings (not included in the output text unless include_stop_str_in_output); the front end
            checks them on its decoded text and ends the choice (`Engine.finish_choice`); the engine never sees text.
        stop_token_ids: extra token ids that end a choice (the token is kept in token_ids).
        eos_token_ids: the checkpoint's eos ids; ignored with ignore_eos.
        max_thinking_tokens: the prompt opened a reasoning block and its output may hold at most this many
            reasoning tokens; then `thinking_end_ids` are forced (None: no budget). Reasoning tokens count toward
            max_tokens.
        thinking_end_ids: what closes reasoning when the budget is spent (`</think>` and the blank line after it).
        thinking_exit_ids: tokens with which the model itself ends its reasoning (`</think>`; also `<tool_call>`
            where no grammar asks for `</think>` first): after one, nothing is forced.
        cache_salt: the prefix cache keeps this request's prefixes apart from other salts' (vLLM's field; None
            and "" are the shared namespace).
        cache_hints: prompt indices where a saved DeltaNet state is worth keeping (the end of the system/tools
            preamble, the start of the last assistant header of a chat prompt); the engine rounds them down to 64.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    n: int = 1
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # read by the front end's decoder only
    include_stop_str_in_output: bool = False  # read by the front end only
    arrival_time: float = 0.0
    grammar: Any = None  # replicas.engine.structured_output.GrammarSpec: structured output / forced tool calls
    mm: Any = None  # replicas.api.media.MultimodalPrompt for prompts with images or videos
    max_thinking_tokens: int | None = None
    thinking_end_ids: tuple[int, ...] = ()
    thinking_exit_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    cache_hints: tuple[int, ...] = ()


@dataclass(frozen=True)
class EngineFailure:
    """An error ending a choice: retriable (the group failed or is restarting) or not (code 400: the request's
    own input was refused before its step ran; the group kept serving)."""

    message: str
    retriable: bool = True
    code: int = 503

    @property
    def status(self) -> int:
        """The HTTP status to answer: `code` (503 retriable, 4xx the request's own input), 500 for other
        non-retriable failures. Only a retriable failure is ever retried."""
        return self.code if self.retriable or 400 <= self.code < 500 else 500


@dataclass(slots=True)
class GenerateOutput:
    """What one engine step added to one choice: token ids, not text (the front end decodes, checks stop strings
    and parses; replicas/api/engine_client.py). Not frozen: hundreds are built per step, and a frozen dataclass
    costs ~4x more to construct; treat it as immutable.

    Attributes:
        index: choice index (0..n-1).
        token_ids: the tokens this step added: usually one; several when speculative drafts were accepted; none
            in a final output that only ends the choice (an error, or the acknowledgement of `finish_choice`).
        logprobs: one per token of `token_ids` when the request asked for logprobs, else empty.
        finish_reason: "stop" (eos, a stop token, a complete grammar, or the front end's stop string) or "length";
            None while running.
        stop_reason: the stop token id that ended it (None for eos, max_tokens or a grammar).
        completion_tokens: tokens generated for this choice so far, this step's included.
        error: set when the choice ended in an error instead of a finish reason.
    """

    index: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    stop_reason: int | None = None
    completion_tokens: int = 0
    error: EngineFailure | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(slots=True)
class RequestOutput:
    """One item of a request's stream: the news of all its choices from one engine step (slotted and not frozen,
    like GenerateOutput: one is built per request per step).

    A request's stream gets at most one item per engine step (none in steps that only prefill it), so a Serve
    stream carries one message per request per step however many tokens and choices it holds. Items outside a
    step: the errors that end a request (group failure, shutdown, a gone caller) and `finish_choice`
    acknowledgements.

    Attributes:
        request_id: the request.
        step: the engine's step counter when the item was made (`Engine.steps`).
        outputs: one `GenerateOutput` per choice with news, by index.
        engine_id: the engine that runs the request (its Serve replica): the front end addresses
            `finish_choice` to it (replicas/serving/engine_router.py). "" outside Serve.
        cached_tokens: prompt tokens the prefix cache saved the request (its first choice's prefill), for
            `usage.prompt_tokens_details.cached_tokens`; known from the first item on.
    """

    request_id: str
    step: int
    outputs: tuple[GenerateOutput, ...]
    engine_id: str = ""
    cached_tokens: int = 0
