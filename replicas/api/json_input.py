"""Client JSON -> Python values, refusing what would break a later stage with a 400.

One parser for every JSON a client sends (HTTP bodies; the JSON texts inside gRPC messages:
tool schemas, response formats). Refused, with the OpenAI error body:
- invalid JSON or UTF-8;
- nesting deeper than `MAX_JSON_DEPTH` (json.loads itself raises RecursionError near 1,000
  levels, and schema compilers, chat templates and `repr` recurse per level too);
- lone UTF-16 surrogates (`"\\ud800"` is valid JSON but not encodable text: the tokenizer and
  every encoder downstream fail on it).
Both walks are skipped when the raw text cannot contain the problem (cheap byte checks), so a
large ordinary body costs one extra scan at most. Tests: tests/replicas/test_input_limits.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

from replicas.api.openai_protocol import ApiError, bad_request

# Deep enough for real tool / response schemas (OpenAI allows 10 levels of schema nesting, ~2 JSON levels each).
MAX_JSON_DEPTH = 128
# A surrogate escape (\ud800-\udfff) in JSON text; raw UTF-8 cannot hold one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes | str, *, param: str | None = None, what: str = "the request body") -> Any:  # noqa: ANN401
    """Parse client JSON; ApiError 400 naming `param` for anything the server cannot use safely."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}", param) from None
    except RecursionError:
        raise _too_deep(what, param) from None
    check_json_value(
        obj,
        param=param,
        what=what,
        brackets=data.count(b"[") + data.count(b"{"),
        surrogates=_SURROGATE_ESCAPE.search(data) is not None,
    )
    return obj


def check_json_value(
    obj: Any,  # noqa: ANN401
    *,
    param: str | None = None,
    what: str = "the request body",
    brackets: int | None = None,
    surrogates: bool = True,
) -> None:
    """Depth and lone-surrogate checks of a parsed value (iterative: no recursion on client data).

    Args:
        brackets: count of `[` and `{` in the raw text when known; fewer than MAX_JSON_DEPTH skips the depth walk.
        surrogates: False when the raw text holds no surrogate escape (skips the string checks).
    """
    deep = brackets is None or brackets > MAX_JSON_DEPTH
    if not deep and not surrogates:
        return
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if surrogates and not encodable(value):
                raise bad_request(
                    f"{_where(what, path)} holds a lone UTF-16 surrogate (not valid Unicode text)", _param(param, path)
                )
            continue
        if isinstance(value, dict):
            children = [(k, v) for k, v in value.items()]
            if surrogates:
                for k, _ in children:
                    if not encodable(k):
                        raise bad_request(
                            f"{_where(what, path)} has a key with a lone UTF-16 surrogate", _param(param, path)
                        )
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep(what, _param(param, path))
        for k, v in children:
            if isinstance(v, (dict, list)) or (surrogates and isinstance(v, str)):
                stack.append((v, depth + 1, f"{path}.{k}" if path else str(k)))


def encodable(text: str) -> bool:
    """Whether `text` is Unicode text (no lone surrogates): what a tokenizer and UTF-8 accept."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_deep(what: str, param: str | None) -> ApiError:
    return bad_request(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels", param)


def _where(what: str, path: str) -> str:
    return f"{what} at {path}" if path else what


def _param(param: str | None, path: str) -> str | None:
    if param and path:
        return f"{param}.{path}"
    return param or path or None
