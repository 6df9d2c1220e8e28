"""`epserve reset-prefix-cache`: drop the prefix cache of a running server (admin).

POSTs to the ingress's `/reset_prefix_cache` (vLLM's route; behind the API key like every route but /health),
which reaches every engine replica, and prints what each dropped. Exit 0 when every running engine replica
reset its cache; 1 when some did not answer or have no prefix cache; 2 when the server cannot be reached or
refuses the call (a message naming why).
Tests: tests/replicas/test_prefix_api.py.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from epserve.cli import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reset-prefix-cache", help="drop the prefix cache of a running server (admin)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP base URL (default %(default)s)")
    p.add_argument("--api-key", metavar="KEY", help="the server's API key (Authorization: Bearer KEY)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    body = reset(args.url, api_key=args.api_key, timeout_s=args.timeout)
    for r in body.get("replicas", []):
        print(_line(r), flush=True)
    dropped = ", ".join(f"{v} {k}" for k, v in sorted(body.get("dropped", {}).items())) or "nothing"
    answered, expected = len(body.get("replicas", [])), body.get("expected_replicas", 0)
    print(f"prefix cache reset on {answered} of {expected} engine replicas: dropped {dropped}", flush=True)
    return 0 if body.get("complete") else 1


def reset(url: str, *, api_key: str | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """POST {url}/reset_prefix_cache; the server's JSON answer. Raises UserError naming what went wrong."""
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https://, got {url!r}")
    endpoint = url.rstrip("/") + "/reset_prefix_cache"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(endpoint, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # the scheme is checked above
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise UserError(f"{endpoint} answered {err.code}: {_error_message(err)}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot reach {endpoint}: {reason}") from None
    except json.JSONDecodeError:
        raise UserError(f"{endpoint} did not answer JSON (is it an epserve server?)") from None


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read())["error"]["message"])
    except Exception:  # noqa: BLE001  # not our error body: the status line says enough
        return str(err.reason)


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"replica {r['replica']}: not reset: {r['error']}"
    counts = ", ".join(f"{v} {k}" for k, v in sorted(r.items()) if k != "replica")
    return f"replica {r['replica']}: dropped {counts or 'nothing'}"
