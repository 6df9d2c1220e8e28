"""scripts/gpu_check.py's dry run (`--device cpu`, tiny sizes): the same stages and entry points a GPU
machine runs, writing gpu_check.json and gpu_check.md as each stage ends.

Oracles: the JSON's own stage records against what the run must contain (every asked stage present with
a status, the pytest counts from its junit file); the markdown table carries the same statuses. The
parity stage's figures are checked against its stated tolerances (the oracle there is transformers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(out: Path, stages: str, timeout: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", str(out), "--device", "cpu", "--stages", stages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
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
