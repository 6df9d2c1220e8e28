"""Renders a checkpoint's jinja chat template into a prompt string, the way transformers does.

Owns: the sandboxed jinja environment (same filters and globals as transformers 5.24's
`apply_chat_template`: `tojson` without HTML escaping, `raise_exception`, `strftime_now`,
loop controls, trim_blocks + lstrip_blocks) and the normalisation of OpenAI-style messages
before rendering (None-valued keys dropped, reasoning aliases, JSON-string tool arguments parsed).
Must not: tokenize, or know Qwen specifics (those live in model_shards/chat_template.jinja).
Tests: tests/model_shards/test_tokenizer.py compares renders with transformers on the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names clients use for an assistant turn's reasoning; templates read `reasoning_content`.
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own `raise_exception`, or a jinja error)."""


class ChatTemplate:
    """A compiled chat template; templates come from checkpoints, so they run sandboxed."""

    def __init__(self, source: str) -> None:
        """Compile `source`.

        Args:
            source: the jinja template text.

        Raises:
            ChatTemplateError: the template does not parse.
        """
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template does not compile: {err}") from err

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,  # noqa: ANN401
    ) -> str:
        """Render a conversation.

        Args:
            messages: OpenAI-style messages (role, content as a string or a list of parts, optional
                tool_calls / reasoning_content). Not modified.
            tools: OpenAI-style tool schemas, or None.
            add_generation_prompt: end with the header of a new assistant turn.
            **template_kwargs: extra template variables (e.g. `enable_thinking=False`, special tokens).

        Returns:
            The prompt text.

        Raises:
            ChatTemplateError: the template rejected the input, or a message is malformed.
        """
        try:
            return self._template.render(
                messages=normalize_messages(messages),
                tools=[dict(tool) for tool in tools] if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template failed: {err}") from err


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages into the plain form templates expect.

    Drops keys whose value is None (OpenAI clients send `content: null` beside tool calls, which
    templates would print as "None"), fills `reasoning_content` from `reasoning` / `thinking`, and
    parses tool-call `arguments` given as a JSON string into a dict (as vLLM does), so templates see
    one form.

    Args:
        messages: the caller's messages; not modified.

    Returns:
        New message dicts.

    Raises:
        ChatTemplateError: a message is not a mapping, or tool-call arguments are not a JSON object.
    """
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {index} must be a mapping, got {type(message).__name__}")
        plain = {key: value for key, value in message.items() if value is not None}
        reasoning = next((plain[key] for key in REASONING_FIELDS if key in plain), None)
        if reasoning is not None:
            plain["reasoning_content"] = reasoning
        if isinstance(plain.get("tool_calls"), (list, tuple)):
            plain["tool_calls"] = [_parsed_tool_call(call, index) for call in plain["tool_calls"]]
        out.append(plain)
    return out


def _parsed_tool_call(call: Any, message_index: int) -> Any:  # noqa: ANN401
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        call["function"] = _with_parsed_arguments(function, message_index)
    else:
        call = _with_parsed_arguments(call, message_index)
    return call


def _with_parsed_arguments(function: Mapping[str, Any], message_index: int) -> dict[str, Any]:
    function = dict(function)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise ChatTemplateError(
                f"message {message_index}: arguments of tool call {function.get('name')!r} are not valid JSON: {err}"
            ) from err
        if not isinstance(parsed, dict):
            raise ChatTemplateError(
                f"message {message_index}: arguments of tool call {function.get('name')!r} must be a JSON object, "
                f"got {type(parsed).__name__}"
            )
        function["arguments"] = parsed
    return function


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,  # noqa: ANN401
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
