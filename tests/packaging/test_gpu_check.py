"""scripts/gpu_check.py's dry run (`--device cpu`, tiny sizes): the same stages and entry points a GPU
machine runs, writing gpu_check.json and gpu_check.md as each stage ends.

Oracles: the JSON's own stage records against what the run must contain (every asked stage present with
a status, the pytest counts from its junit file); the markdown table carries the same statuses. The
parity stage's figures are checked against its stated tolerances (the oracle there is transformers).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(out: Path, stages: str, timeout: int) -> dict:
    """scripts/gpu_check.sh (install step off: CI's environment is the project's own) with --device cpu."""
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(out), "--device", "cpu", "--stages", stages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "EPSERVE_GPU_CHECK_NO_INSTALL": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert doc["meta"]["mode"] == "dry" and doc["meta"]["device"] == "cpu"
    assert list(doc["stages"]) == stages.split(",")
    for name, st in doc["stages"].items():
        assert st["status"] in ("passed", "skipped"), (name, st)
        assert f"| {name} | {st['status']} |" in md
    return doc


@pytest.mark.timeout(300)
def test_dry_run_env_tests_graph(tmp_path: Path) -> None:
    doc = _dry_run(tmp_path / "out", "env,cuda_tests,cuda_graph", timeout=280)
    env = doc["stages"]["env"]
    assert env["kernels"]["deltanet"] == "torch" and env["device"] == "cpu"  # CPU: the references
    tests = doc["stages"]["cuda_tests"]
    assert tests["counts"]["passed"] >= 2 and tests["counts"]["failures"] == 0
    assert (tmp_path / "out" / "cuda_tests.log").exists()
    assert doc["stages"]["cuda_graph"]["status"] == "skipped"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dry_run_parity_and_bench(tmp_path: Path) -> None:
    doc = _dry_run(tmp_path / "out", "hf_parity,bench", timeout=1450)
    parity = doc["stages"]["hf_parity"]
    assert parity["fp32"]["greedy_equal"] and parity["fp32"]["max_abs_logit_diff"] <= parity["fp32"]["atol"]
    assert parity["bf16_teacher_forced"]["wrong_beyond_margin"] == 0
    models = doc["stages"]["bench"]["models"]
    assert len(models) == 3 and any("FP8" in m for m in models)
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for name, cell in models.items():
        assert f"## {name}" in md
        metrics = [r["metric"] for r in cell["rows"]]
        assert any(m.startswith("prefill") for m in metrics) and "decode B=2 (ms/step)" in metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nccl_check_dry_run_on_gloo(tmp_path: Path) -> None:
    """scripts/nccl_check.sh --device cpu: the EP group D=1 x X=1 on gloo gives the single process's greedy
    tokens (the oracle), and the 2-process exchange reports a row per size."""
    out = tmp_path / "nccl"
    proc = subprocess.run(
        ["bash", "scripts/nccl_check.sh", str(out), "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "nccl_check.json").read_text())
    group = doc["stages"]["group_vs_local"]
    assert group["status"] == "passed" and group["backend"] == "gloo" and group["group"] == group["local"]
    rows = doc["stages"]["exchange"]["rows"]
    assert [r["tokens"] for r in rows] == [1, 8, 32, 128] and all(r["ms"] > 0 for r in rows)
    assert "| group_vs_local | passed |" in (out / "nccl_check.md").read_text()
