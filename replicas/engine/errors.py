"""What the engine raises when it refuses a request before any step (the front end maps each to a status:
replicas/api/engine_client.py). Plain exceptions, importable without torch or the engine.
Tests: tests/replicas/test_overload.py, tests/replicas/test_input_limits.py.
"""

from __future__ import annotations


class EngineOverloaded(RuntimeError):
    """The bounded waiting queue is full: the caller answers 429/503 with Retry-After."""


class RequestRejected(ValueError):
    """The request can never run on this engine (e.g. longer than a trunk rank's KV pool)."""


class EngineUnavailable(RuntimeError):
    """The group is failed and not (yet) rebuilt: retriable."""
