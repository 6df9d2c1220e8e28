"""What the engine refuses before a request may enter a group step.

The rule for errors inside a step: a rank that raises after the step's first
collective takes the whole group down (every request it holds ends with a retriable error and
the group is rebuilt), so nothing a client controls may be able to make a rank raise. The
ingress validates every field (replicas/api/openai_protocol.py, replicas/api/request_builder.py, for
HTTP and gRPC alike); this is the engine's own check of the same facts, at admission, so a
request built by any other path (the offline runner, a future API, a missed cap) fails alone
with a 400-class `RequestRejected` (never retried) instead of failing a step.
Tests: tests/replicas/test_input_limits.py.
"""

from __future__ import annotations

import math

from replicas.engine.engine_types import GenerateRequest


def request_problem(req: GenerateRequest, *, vocab_size: int | None) -> str | None:
    """Why `req` could fail a step on its own input, or None. `vocab_size`: rows of the LM head (None: unknown,
    token id ranges unchecked)."""
    p = req.params
    if not req.prompt_ids:
        return "the prompt is empty"
    if req.n < 1 or req.max_tokens < 1 or req.min_tokens < 0:
        return f"n ({req.n}) and max_tokens ({req.max_tokens}) must be >= 1, min_tokens ({req.min_tokens}) >= 0"
    floats = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "repetition_penalty": p.repetition_penalty,
    }
    bad = [k for k, v in floats.items() if not math.isfinite(v)]
    if bad:
        return f"{', '.join(bad)} must be finite numbers"
    if p.temperature < 0 or not 0 < p.top_p <= 1 or not 0 <= p.min_p <= 1 or p.repetition_penalty <= 0:
        return "temperature >= 0, top_p in (0, 1], min_p in [0, 1] and repetition_penalty > 0 are required"
    if p.logprobs is not None and p.logprobs < 0:
        return f"logprobs must be >= 0, got {p.logprobs}"
    if vocab_size is None:
        return None
    if p.logprobs is not None and p.logprobs > vocab_size:
        return f"logprobs {p.logprobs} exceeds the vocabulary size {vocab_size}"
    for name, ids in (
        ("prompt", req.prompt_ids),
        ("stop_token_ids", req.stop_token_ids),
        ("eos_token_ids", req.eos_token_ids),
    ):
        out = [t for t in ids if not 0 <= t < vocab_size]
        if out:
            return f"{name} {out[:5]} are outside the vocabulary [0, {vocab_size})"
    return None
