"""OpenAI requests -> engine requests: prompt rendering, limits, sampling defaults.

Owns: the model facts the ingress needs (`ModelContext`: tokenizer, chat template,
generation_config defaults, context limit, served name) and turning a validated chat or
completions request into `GenerateRequest`s, with 400s that name the problem (prompt too
long for the context, token ids outside the vocabulary, n too large). Unset sampling
parameters take generation_config.json's values (vLLM's behaviour). Chat prompts carry prefix-cache hints
(`chat_cache_hints`): where the system/tools preamble ends and where the last assistant header starts.
Tests: tests/replicas/test_serving.py, tests/replicas/test_prefix_api.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_shards.config import ModelConfig, from_hf_config
from model_shards.generation_config import GenerationDefaults
from model_shards.image_processing import MediaError, MediaLimits
from model_shards.preprocessor_config import load_preprocess_config
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import Tokenizer
from replicas.api.chat_stream import thinking_open
from replicas.api.json_input import encodable
from replicas.api.media import MediaReader, MultimodalPrompt, has_media
from replicas.api.openai_protocol import ApiError, ChatCompletionRequest, CompletionRequest, _Sampling, bad_request
from replicas.api.reasoning_parser import THINK_CLOSE, TOOL_CALL_OPEN
from replicas.api.tool_parser import tools_by_name
from replicas.engine.engine_types import GenerateRequest

TURN_START = "<|im_start|>"  # ChatML: every turn of the rendered prompt opens with this special token


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt and how its output is parsed."""

    ids: list[int]
    thinking: bool  # the prompt opened <think>: reasoning comes first
    tools: dict[str, Any] | None  # tool schemas when calls are parsed
    mm: MultimodalPrompt | None = None  # images / videos: positions and preprocessed inputs
    cache_hints: tuple[int, ...] = ()  # prompt indices worth a saved prefix-cache state (chat_cache_hints)


@dataclass(frozen=True)
class ModelContext:
    """What the ingress knows of the model it fronts."""

    name: str
    folder: str
    cfg: ModelConfig
    tokenizer: Tokenizer
    defaults: GenerationDefaults
    max_model_len: int
    default_max_tokens: int | None
    max_n: int
    media: MediaReader | None = None
    max_thinking_tokens: int | None = None  # the server's thinking budget (None: unbounded)
    max_fanout: int = 64  # sequences one request may start: prompts x n
    max_token_chars: int = 128  # the tokenizer's longest token: a prompt has >= chars / this many tokens

    @staticmethod
    def load(
        folder: str,
        *,
        name: str,
        max_model_len: int | None,
        cache_tokens: int,
        default_max_tokens: int | None,
        max_n: int,
        media_limits: MediaLimits | None = None,
        local_media: str | None = None,
        max_thinking_tokens: int | None = None,
        max_fanout: int = 64,
    ) -> ModelContext:
        """Read config, tokenizer and generation defaults; the context is capped by what one trunk
        rank's KV cache holds (`cache_tokens`). The thinking budget is `max_thinking_tokens`, else
        generation_config.json's."""
        cfg = from_hf_config(folder)
        limit = min(cfg.max_position_embeddings, cache_tokens)
        if max_model_len is not None:
            if max_model_len > limit:
                raise ValueError(f"max_model_len {max_model_len} exceeds what the model and KV cache allow ({limit})")
            limit = max_model_len
        media = (
            MediaReader(
                cfg,
                limits=media_limits or MediaLimits(),
                local_root=local_media,
                pre=load_preprocess_config(folder, cfg.vision),
            )
            if cfg.vision is not None
            else None
        )
        defaults = GenerationDefaults.load(Path(folder), cfg)
        budget = max_thinking_tokens if max_thinking_tokens is not None else defaults.max_thinking_tokens
        tokenizer = Tokenizer.from_dir(folder)
        return ModelContext(
            name=name,
            folder=folder,
            cfg=cfg,
            tokenizer=tokenizer,
            defaults=defaults,
            max_model_len=limit,
            default_max_tokens=default_max_tokens,
            max_n=max_n,
            media=media,
            max_thinking_tokens=budget,
            max_fanout=max_fanout,
            max_token_chars=tokenizer.longest_token_chars(),
        )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.name}`.",
                type="not_found_error",
                param="model",
            )

    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        """Token ids of rendered messages, of any length (/tokenize)."""
        return self.chat_prompt(req, bounded=False).ids

    def chat_prompt(self, req: ChatCompletionRequest, *, bounded: bool = True) -> ChatPrompt:
        """Render the messages (and tools) with the chat template; decide reasoning and tool parsing.
        `bounded`: refuse (400) a rendered prompt longer than the context while tokenizing it."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        tools = None
        if req.tools is not None:
            try:
                tools = tools_by_name(req.tools)
            except ValueError as exc:
                raise bad_request(f"tools: {exc}", "tools") from None
        choice = req.tool_choice
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
            if not name or tools is None or name not in tools:
                raise bad_request("tool_choice must name one of the request's tools", "tool_choice")
        elif choice not in (None, "none", "auto", "required"):
            raise bad_request(f"tool_choice {choice!r} must be none, auto, required or a named function", "tool_choice")
        if choice == "required" and not tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=req.tools, add_generation_prompt=req.add_generation_prompt, **kwargs
            )
        except ValueError as exc:
            raise bad_request(f"messages could not be rendered with the chat template: {exc}", "messages") from exc
        except Exception as exc:  # template errors from user-controlled kwargs are client errors
            raise bad_request(f"chat template error: {exc}", "messages") from exc
        parse_tools = tools if (tools and choice != "none") else None
        ids = self.encode_prompt(text, "messages") if bounded else self.encode_text(text, "messages")
        mm = None
        if has_media(messages):
            if self.media is None:
                raise bad_request("this model takes no images or videos", "messages")
            try:
                inputs = self.media.read_messages(messages)
                ids, mm = self.media.expand(ids, inputs, encode_text=self.tokenizer.encode)
            except MediaError as exc:
                raise bad_request(str(exc), "messages") from None
        hints = chat_cache_hints(
            ids, messages, has_tools=bool(req.tools), turn_start=self.tokenizer.token_to_id(TURN_START)
        )
        return ChatPrompt(ids=ids, thinking=thinking_open(text), tools=parse_tools, mm=mm, cache_hints=hints)

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        """Token ids of each prompt; the fan-out and length limits hold before anything is tokenized.
        Long texts cost CPU seconds: call this off the event loop (the pieces keep GIL holds short)."""
        self.check_fanout(req.num_prompts, req.n)
        p = req.prompt
        if isinstance(p, str):
            return [self.encode_prompt(p, "prompt")]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]  # checked: list[int]
        if all(isinstance(x, str) for x in p):
            return [self.encode_prompt(x, "prompt") for x in p]  # type: ignore[arg-type]  # checked: list[str]
        return [list(x) for x in p]  # type: ignore[arg-type]  # the rest: list[list[int]]

    def check_fanout(self, prompts: int, n: int) -> None:
        """One request may start at most `max_fanout` sequences (prompts x n): a 400 naming the limit."""
        if n > self.max_n:
            raise bad_request(f"n must be at most {self.max_n}, got {n}", "n")
        if prompts * n > self.max_fanout:
            raise bad_request(
                f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} sequences; "
                f"the server allows at most {self.max_fanout} per request (max_fanout)",
                "prompt" if prompts > 1 else "n",
            )

    @staticmethod
    def check_text(text: str, param: str) -> None:
        """Lone surrogates can still arrive here through the chat template (tool-call arguments are JSON it
        parses): a 400, not the tokenizer's TypeError."""
        if not encodable(text):
            raise bad_request(
                "the prompt holds a lone UTF-16 surrogate (e.g. a \\ud800 escape in tool-call "
                "arguments): not valid Unicode text",
                param,
            )

    def encode_prompt(self, text: str, param: str) -> list[int]:
        """Token ids of a prompt text, refused (400) as soon as it is certain to exceed the context: by its
        length alone, or while tokenizing piece by piece (so a huge prompt costs about one context's work)."""
        limit = self.max_model_len
        self.check_text(text, param)
        if len(text) > limit * self.max_token_chars:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(text)} characters, more than {limit} tokens can hold.",
                param,
            )
        ids: list[int] = []
        for piece in self.tokenizer.encode_pieces(text):
            ids += piece
            if len(ids) > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your prompt "
                    f"has more than {len(ids)} tokens.",
                    param,
                )
        return ids

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        """Token ids of any length (/tokenize), in pieces (short GIL holds when run off the event loop)."""
        self.check_text(text, param)
        return [t for piece in self.tokenizer.encode_pieces(text) for t in piece]

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param)
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are outside the vocabulary [0, {self.cfg.vocab_size})", param)

    def chat_grammar(self, req: ChatCompletionRequest, *, thinking: bool = False) -> Any:  # noqa: ANN401
        """The constraint of a chat request (GrammarSpec), or None: response_format / structured_outputs, or a
        forced tool call (tool_choice required / named). With thinking on, free reasoning may come first."""
        from replicas.engine.structured_output import GrammarSpec

        try:
            specs = [
                GrammarSpec.from_response_format(req.response_format),
                GrammarSpec.from_structured_outputs(req.structured_outputs),
                GrammarSpec.from_tool_choice(req.tool_choice, req.tools, parallel_tool_calls=req.parallel_tool_calls),
            ]
        except ValueError as exc:
            raise bad_request(str(exc), "response_format") from None
        given = [g for g in specs if g is not None]
        if len(given) > 1:
            raise bad_request(
                "give only one of response_format, structured_outputs and a forced tool_choice", "response_format"
            )
        if not given:
            return None
        return given[0].with_reasoning() if thinking else given[0]

    def completion_grammar(self, req: CompletionRequest) -> Any:  # noqa: ANN401
        from replicas.engine.structured_output import GrammarSpec

        try:
            return GrammarSpec.from_structured_outputs(req.structured_outputs)
        except ValueError as exc:
            raise bad_request(str(exc), "structured_outputs") from None

    def build(
        self,
        req: _Sampling,
        prompt_ids: list[int],
        *,
        request_id: str,
        grammar: Any = None,  # noqa: ANN401
        mm: MultimodalPrompt | None = None,
        thinking: bool = False,
        cache_hints: tuple[int, ...] = (),
    ) -> GenerateRequest:
        """One engine request; raises 400 when the prompt and max_tokens do not fit the context.
        Logprobs come from the validated request (`engine_logprobs`): one cap for HTTP and gRPC.
        `thinking`: the (chat) prompt opened `<think>`, so the thinking budget applies. `cache_hints`: the
        chat prompt's (ChatPrompt.cache_hints); the request's `cache_salt` goes along as it is."""
        n_prompt = len(prompt_ids)
        self.check_fanout(1, req.n)
        if n_prompt >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n_prompt} tokens, which leaves no room for the output.",
                "messages" if hasattr(req, "messages") else "prompt",
            )
        asked = req.requested_max_tokens
        room = self.max_model_len - n_prompt
        if asked is not None and asked > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked} output tokens and your prompt contains {n_prompt} input tokens, for a total of "
                f"{asked + n_prompt} tokens.",
                "max_tokens",
            )
        max_tokens = asked if asked is not None else min(room, self.default_max_tokens or room)
        if req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
        d = self.defaults
        params = SamplingParams(
            temperature=d.temperature if req.temperature is None else req.temperature,
            top_p=d.top_p if req.top_p is None else req.top_p,
            top_k=max(0, d.top_k if req.top_k is None else req.top_k),
            min_p=d.min_p if req.min_p is None else req.min_p,
            presence_penalty=d.presence_penalty if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=d.frequency_penalty if req.frequency_penalty is None else req.frequency_penalty,
            repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
            # Unseeded requests get a random seed: sampling stays stateless per token (model_shards.sampling).
            seed=(req.seed % 2**63) if req.seed is not None else random.getrandbits(63),
            logprobs=req.engine_logprobs,
        )
        if req.stop_token_ids:
            bad = [t for t in req.stop_token_ids if t >= self.cfg.vocab_size]
            if bad:
                raise bad_request(f"stop_token_ids {bad[:5]} are outside the vocabulary", "stop_token_ids")
        return GenerateRequest(
            request_id=request_id,
            prompt_ids=tuple(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            n=req.n,
            min_tokens=req.min_tokens,
            stop=tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            eos_token_ids=self.defaults.eos_token_ids,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            grammar=grammar,
            mm=mm,
            cache_salt=req.cache_salt,
            cache_hints=cache_hints,
            **(self.thinking_budget(req, grammar=grammar) if thinking else {}),
        )

    def thinking_budget(self, req: _Sampling, *, grammar: Any = None) -> dict[str, Any]:  # noqa: ANN401
        """The GenerateRequest fields of the thinking budget of a prompt that opened `<think>` ({}: unbounded).

        When the budget is spent the engine writes `</think>` and the blank line Qwen3.5's chat template puts after
        it (what a reasoning grammar expects too). The model ends reasoning itself with `</think>`, or, with no
        grammar asking for `</think>`, by starting a tool call (`<tool_call>`, as the reasoning parser reads it).
        """
        budget = getattr(req, "max_thinking_tokens", None)
        budget = self.max_thinking_tokens if budget is None else budget
        close = self.tokenizer.token_to_id(THINK_CLOSE)
        if budget is None or close is None:
            return {}
        call = self.tokenizer.token_to_id(TOOL_CALL_OPEN)
        exits = (close,) if grammar is not None or call is None else (close, call)
        return {
            "max_thinking_tokens": budget,
            "thinking_end_ids": (close, *self.tokenizer.encode("\n\n")),
            "thinking_exit_ids": exits,
        }


def chat_cache_hints(
    ids: list[int], messages: list[dict[str, Any]], *, has_tools: bool, turn_start: int | None
) -> tuple[int, ...]:
    """Where a rendered chat prompt is worth a saved prefix-cache state (the engine rounds each down to 64):

    - the end of the system/tools preamble, i.e. the `<|im_start|>` of the first turn after it, when the prompt
      has one (a system message first, or tools: the template puts tools in the first system turn);
    - the last `<|im_start|>`, the generation prompt's assistant header: the chat template drops earlier turns'
      reasoning, so the next turn of this conversation shares the prompt up to that header, not past it.

    Read from the final token ids (after image / video pads are expanded). A turn-start token inside message text
    can only move a hint: hints choose where states are kept, never what is computed.
    """
    if turn_start is None:
        return ()
    starts = [i for i, t in enumerate(ids) if t == turn_start]
    if not starts:
        return ()
    leading_system = 0
    for m in messages:
        if m.get("role") != "system":
            break
        leading_system += 1
    # the first system message and the tool list share one turn; each further leading system message has its own
    preamble_turns = max(leading_system, 1 if has_tools else 0)
    hints = {starts[-1]}
    if preamble_turns and len(starts) > preamble_turns:
        hints.add(starts[preamble_turns])
    return tuple(sorted(h for h in hints if h > 0))
