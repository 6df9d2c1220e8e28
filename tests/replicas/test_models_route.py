"""GET /v1/models: the served name only (never the folder), and the context length `epserve inspect`
reports, or the reason it is smaller.

Oracle: `epserve inspect DIR --json` run as a user runs it (its config.max_position_embeddings),
and the AppArgs that cap the context. The route runs in the real FastAPI app of the ingress
(build_api on an Ingress instance; no engine is needed to list models).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inspected_context(embedded_model_dir: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "epserve.cli", "inspect", str(embedded_model_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(json.loads(out.stdout)["config"]["max_position_embeddings"])


def _models(folder: Path, **app_args: object) -> tuple[dict, str]:
    from fastapi.testclient import TestClient

    from replicas.api.ingress import Ingress, build_api
    from replicas.serving.app_args import AppArgs

    ing = Ingress(None, AppArgs(model=str(folder), served_model_name="tiny", **app_args).model_dump())
    with TestClient(build_api(ing)) as client:
        r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    return r.json()["data"][0], r.text


@pytest.mark.parametrize(
    "app_args, expected",
    [
        ({"num_kv_blocks": 4096, "block_size": 16}, None),  # cache holds the whole context
        ({"num_kv_blocks": 64, "block_size": 16}, "1024 tokens"),  # capped by the cache
        ({"num_kv_blocks": 4096, "max_model_len": 3000}, "max_model_len 3000"),  # capped by the operator
    ],
    ids=["model", "cache", "max_model_len"],
)
def test_models_context_agrees_with_inspect_or_says_why(
    embedded_model_dir: Path, inspected_context: int, app_args: dict, expected: str | None
) -> None:
    entry, text = _models(embedded_model_dir, **app_args)
    assert entry["id"] == entry["root"] == "tiny"
    assert str(embedded_model_dir) not in text and embedded_model_dir.name not in text, "no path on disk"
    assert entry["max_position_embeddings"] == inspected_context
    if expected is None:
        assert entry["max_model_len"] == inspected_context and "max_model_len_reason" not in entry
    else:
        assert entry["max_model_len"] < inspected_context
        assert expected in entry["max_model_len_reason"], entry
        cap = app_args.get("max_model_len") or app_args["num_kv_blocks"] * app_args["block_size"]
        assert entry["max_model_len"] == cap
