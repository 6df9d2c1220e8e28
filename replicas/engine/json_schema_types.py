"""Which JSON types a tool parameter's schema allows: read by the tool-call grammar (structured_output.py) and
the tool-call parser (replicas/api/tool_parser.py), so both treat a parameter the same way.
Tests: tests/replicas/test_parsers.py, tests/replicas/test_structured_output.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STRING_ONLY = frozenset({"string"})


def schema_types(schema: Any) -> frozenset[str] | None:  # noqa: ANN401
    """The JSON types a schema allows, or None when it does not say (no schema, $ref, any branch open)."""
    if not isinstance(schema, Mapping):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        return frozenset({declared.lower()})
    if isinstance(declared, list) and declared and all(isinstance(t, str) for t in declared):
        return frozenset(t.lower() for t in declared)
    branches = schema.get("anyOf", schema.get("oneOf"))
    if isinstance(branches, list) and branches:
        types: set[str] = set()
        for branch in branches:
            branch_types = schema_types(branch)
            if branch_types is None:
                return None
            types |= branch_types
        return frozenset(types)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(item, str) for item in enum):
        return STRING_ONLY
    return None
