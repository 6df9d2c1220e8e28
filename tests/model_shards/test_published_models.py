"""Published model names (`epserve plan --model Qwen3.5-397B-A17B-FP8`): the table against real configs.

Oracles: the 397B config.json files in ../shared/configs (field by field, where they exist), the
397B config written from model_spec §1.1 (tests/cluster/test_capacity.py), and the published
parameter counts (397B, 35B) for the arithmetic of the whole table. The CLI runs offline in a
subprocess and its JSON plan must equal the plan of the real config file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.capacity import weight_bytes_by_group
from model_shards.config import from_hf_config
from model_shards.published_models import PUBLISHED, lookup, published_config, published_names

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = next(
    (p / "shared" / "configs" for p in REPO.parents if (p / "shared" / "configs").is_dir()),
    REPO.parent / "shared" / "configs",
)
SHARED = {
    "Qwen3.5-397B-A17B": "qwen3.5-397b-a17b.config.json",
    "Qwen3.5-397B-A17B-FP8": "qwen3.5-397b-a17b-fp8.config.json",
}


def _fields_differing(a, b) -> dict:  # noqa: ANN001
    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out.update({f"{f.name}.{k}": v for k, v in _fields_differing(x, y).items()})
        elif x != y:
            out[f.name] = (x, y)
    return out


@pytest.mark.parametrize("name", sorted(SHARED))
def test_table_matches_shared_configs_field_by_field(name: str) -> None:
    path = CONFIGS / SHARED[name]
    if not path.exists():
        pytest.skip(f"no {path}")
    real = from_hf_config(path)  # read in the test only: the project never ships or reads these files
    ours = published_config(name)
    assert _fields_differing(ours, real) == {}
    assert ours.extra == real.extra  # compare=False in the dataclass: checked on its own


def test_397b_matches_the_spec_config() -> None:
    from tests.cluster.test_capacity import config_397b

    for fp8 in (False, True):
        spec = from_hf_config(config_397b(fp8=fp8))
        diff = _fields_differing(published_config("Qwen3.5-397B-A17B" + ("-FP8" if fp8 else "")), spec)
        # the spec's config leaves the special token ids out: only the dims it sets are compared
        assert {k: v for k, v in diff.items() if v[1] not in (None, ())} == {}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_size(name: str) -> None:
    """Parameters without the MTP head (as published sizes count them) within 1% of the name's size."""
    groups = weight_bytes_by_group(published_config(name))  # bf16: 2 bytes per parameter
    params = (sum(groups.values()) - groups["mtp_trunk"] - groups["mtp_experts"]) / 2
    assert params / 1e9 == pytest.approx(PUBLISHED[name].total_params_b, rel=0.01)


def test_names_and_variants() -> None:
    assert published_names() == ["Qwen3.5-397B-A17B", "Qwen3.5-397B-A17B-FP8", "Qwen3.5-35B-A3B", "Qwen3.5-35B-A3B-FP8"]
    assert lookup("qwen/qwen3.5-35b-a3b-fp8") == (PUBLISHED["Qwen3.5-35B-A3B"], True)
    assert lookup("Qwen3.5-122B-A10B") is None and lookup("Qwen3.5-397B") is None
    fp8, bf16 = published_config("Qwen3.5-35B-A3B-FP8"), published_config("Qwen3.5-35B-A3B")
    assert bf16.quant is None and fp8.quant is not None and (fp8.quant.block_rows, fp8.quant.block_cols) == (128, 128)
    assert fp8.vision is not None and fp8.vision.out_hidden_size == fp8.hidden_size == 2048
    with pytest.raises(KeyError, match="Qwen3.5-397B-A17B-FP8"):
        published_config("Qwen3.5-1T")


# ------------------------------------------------------------------------------ CLI, offline
def _plan(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "from epserve.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    # Offline: no proxy reachable and the HF hub off; the name must resolve from the table alone.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    return subprocess.run(
        [sys.executable, "-c", code, "plan", *argv], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def test_cli_plans_a_published_name_offline(tmp_path: Path) -> None:
    out = _plan("--model", "Qwen3.5-397B-A17B-FP8", "--gpu-memory-gib", "140", "--nodes", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "model        Qwen3.5-397B-A17B-FP8 (fp8)" in out.stdout and "fits         yes" in out.stdout
    path = CONFIGS / SHARED["Qwen3.5-397B-A17B-FP8"]
    if path.exists():
        by_name = json.loads(
            _plan(
                "--model",
                "Qwen3.5-397B-A17B-FP8",
                "--gpu-memory-gib",
                "140",
                "--nodes",
                "2",
                "--output",
                "json",
                cwd=tmp_path,
            ).stdout
        )
        by_file = json.loads(
            _plan(
                "--model", str(path), "--gpu-memory-gib", "140", "--nodes", "2", "--output", "json", cwd=tmp_path
            ).stdout
        )
        assert {k: v for k, v in by_name.items() if k != "model"} == {k: v for k, v in by_file.items() if k != "model"}
    bad = _plan("--model", "Qwen3.5-9T", "--gpu-memory-gib", "140", cwd=tmp_path)
    assert bad.returncode == 2 and "not a published model name" in bad.stderr and "Qwen3.5-35B-A3B" in bad.stderr


def test_cli_refused_layout_prints_a_shortfall_not_negative_memory(tmp_path: Path) -> None:
    out = _plan(
        "--model",
        "Qwen3.5-397B-A17B-FP8",
        "--gpu-memory-gib",
        "140",
        "--nodes",
        "2",
        "--expert-ranks",
        "2",
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert not re.search(r"-\d+(\.\d+)? GiB", out.stdout), out.stdout
    # 256 experts x 61 MoE layers of FP8 weights + scales on one GPU, + the 8 GiB reserve, against 140 GiB
    expert_line = next(line for line in out.stdout.splitlines() if line.startswith("expert GPU"))
    weights = float(re.search(r"([\d.]+) GiB weights", expert_line).group(1))
    short = float(re.search(r"SHORT by ([\d.]+) GiB", expert_line).group(1))
    assert short == pytest.approx(weights + 8.0 - 140.0, abs=0.011)
    x0 = _plan(
        "--model",
        "Qwen3.5-397B-A17B",
        "--gpu-memory-gib",
        "80",
        "--expert-ranks",
        "0",
        "--trunk-ranks",
        "1",
        cwd=tmp_path,
    )
    assert x0.returncode == 1 and "SHORT by" in x0.stdout and not re.search(r"-\d+(\.\d+)? GiB", x0.stdout)
