"""OpenAI-compatible request models (pydantic, the serving boundary) and the error envelope.

Unknown fields are rejected with a 400 naming them, as OpenAI does, except a few the
OpenAI SDK sends that change nothing here (`user`, `store`, `metadata`, ...). Ranges follow
OpenAI (temperature 0..2, top_p in (0, 1], penalties -2..2) plus vLLM's extras (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...). Tests: tests/replicas/test_serving.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 16
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs / logprobs alternatives (HTTP and gRPC alike)
MAX_STOP_LEN = 256
MAX_CACHE_SALT_LEN = 256  # a tenant name or token, not a payload
# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-40 overflow to inf in fp32.
SAMPLING_EPS = 1e-5


class ApiError(Exception):
    """An error with its HTTP status and OpenAI envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002  # OpenAI's name
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code or {
            400: "invalid_request",
            401: "invalid_api_key",
            404: "model_not_found",
            408: "timeout",
            413: "request_too_large",
            429: "rate_limit_exceeded",
            503: "service_unavailable",
        }.get(status, str(status))
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and completions; None means "take the server default"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    # vLLM extras (sent by OpenAI SDKs through extra_body)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    # Lower bound: logits / 1e-39 overflow to inf in fp32 (the sampler then has no finite candidate).
    repetition_penalty: float | None = Field(None, ge=0.01, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's prefix-cache namespace: prompts with different salts never share cached prefixes (tenant isolation)
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT_LEN)
    # accepted and ignored: they do not change generation here
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        return 0.0 if v is not None and v < SAMPLING_EPS else v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > MAX_STOP_LEN for s in stops):
            raise ValueError(f"stop sequences must be 1..{MAX_STOP_LEN} characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) > 64 or any(t < 0 for t in v)):
            raise ValueError("stop_token_ids must be at most 64 non-negative token ids")
        return v

    @model_validator(mode="after")
    def _min_max(self) -> _Sampling:
        cap = self.requested_max_tokens
        if cap is not None and self.min_tokens > cap:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({cap})")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and not self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for part in self.content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url", "video_url", "image", "video", "input_text"):
                    raise ValueError(f"unsupported content part type {kind!r}")
                if kind == "text" and not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    structured_outputs: dict[str, Any] | None = None
    # reasoning tokens before the engine writes </think> (thinking on); None: the server's default
    max_thinking_tokens: int | None = Field(None, ge=0)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        """Alternatives per token for the engine (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.chat_template_kwargs is not None and len(str(self.chat_template_kwargs)) > 4096:
            raise ValueError("chat_template_kwargs is too large")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    structured_outputs: dict[str, Any] | None = None

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompts(self) -> int:
        """Prompts in `prompt` (a list of strings or of token lists is a batch)."""
        p = self.prompt
        return len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.stream:
            raise ValueError("echo with stream is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        # NOTE: the messages are rendered through a ChatCompletionRequest: its limits must hold here (a 400,
        # not a ValidationError raised inside the handler).
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.chat_template_kwargs is not None and len(str(self.chat_template_kwargs)) > 4096:
            raise ValueError("chat_template_kwargs is too large")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


class ResetPrefixCacheRequest(BaseModel):
    """POST /reset_prefix_cache (admin): no options; an empty body counts as `{}` (vLLM's clients send none)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def validation_error(exc: Exception) -> ApiError:
    """A pydantic ValidationError as one OpenAI 400, naming the first offending field."""
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = f"unrecognized request argument supplied: {loc}"
    return bad_request(f"{loc}: {msg}" if loc else msg, param=loc or None)
