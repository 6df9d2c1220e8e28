"""What a newcomer meets when starting epserve: start-up that finishes, or fails fast and says why.

Real commands as subprocesses (their own local clusters), each bounded by a timeout:
- `epserve generate` with D = 1, X = 2 (more ranks than this machine's 2 cores) finishes, with the
  single-process tokens, and both are transformers' greedy `generate` tokens (the oracle);
- a layout that asks for GPUs the cluster lacks fails within 30 s naming them;
- a broken model folder fails within 10 s, before any Ray process starts, with the missing files named;
- Ctrl-C during start-up exits within 15 s and leaves none of the Ray processes it started.
`epserve serve` with D = 1, X = 2 becoming ready is in tests/replicas/test_exposure.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.process_groups import free_port
from tests.serve_process import start_serve

pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _epserve(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "epserve.cli", *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_generate_on_more_ranks_than_cores_matches_single_process(embedded_model_dir: Path) -> None:
    common = [
        "generate",
        "--model",
        str(embedded_model_dir),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--output",
        "json",
    ]
    single = _epserve(*common, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    group = _epserve(*common, "--trunk-ranks", "1", "--expert-ranks", "2", timeout=400)
    assert group.returncode == 0, group.stderr[-3000:]
    want, got = json.loads(single.stdout), json.loads(group.stdout)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) == 6
    import torch

    from tests.hf_oracle import hf_causal_lm

    prompt = want["prompt_token_ids"]
    with torch.no_grad():
        hf = hf_causal_lm(embedded_model_dir).generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
        )[0]
    assert want["token_ids"] == hf[len(prompt) :].tolist()


def test_gpu_layout_without_gpus_fails_fast_naming_them(embedded_model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("gpus: true\n")
    t0 = time.monotonic()
    r = _epserve(
        "serve",
        "--model",
        str(embedded_model_dir),
        "--config",
        str(config),
        "--trunk-ranks",
        "1",
        "--expert-ranks",
        "2",
        "--port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "GPU 3" in r.stderr and "the cluster has 0" in r.stderr, r.stderr[-3000:]
    assert elapsed < 30, f"took {elapsed:.1f} s"


@pytest.mark.parametrize("breakage", ["empty", "no-tokenizer"])
def test_broken_model_folder_fails_before_ray(embedded_model_dir: Path, tmp_path: Path, breakage: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    if breakage == "no-tokenizer":
        for f in embedded_model_dir.iterdir():
            if f.is_file() and f.name != "tokenizer.json":
                (folder / f.name).symlink_to(f)
    t0 = time.monotonic()
    r = _epserve("serve", "--model", str(folder), "--port", str(free_port()), timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0 and elapsed < 10, (r.returncode, elapsed)
    want = "no config.json" if breakage == "empty" else "no tokenizer.json"
    assert want in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Started a local Ray instance" not in r.stderr + r.stdout


def test_replica_start_up_error_is_the_commands_error(embedded_model_dir: Path, tmp_path: Path) -> None:
    """A problem only a replica finds (here: a context longer than the KV cache holds) ends the command
    with the replica's own message, not Serve's wrapper or a hang."""
    config = tmp_path / "app.yaml"
    config.write_text("max_model_len: 10000000\n")
    r = _epserve(
        "serve",
        "--model",
        str(embedded_model_dir),
        "--config",
        str(config),
        "--port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        timeout=400,
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert "failed to start" in last and "max_model_len 10000000 exceeds" in last, r.stderr[-3000:]


# SIGTERM runs by default; SIGINT takes the same handler and is the long variant
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])
def test_interrupt_during_startup_leaves_no_ray_process(embedded_model_dir: Path, sig: int) -> None:
    sp = start_serve(
        ["--model", str(embedded_model_dir), "--trunk-ranks", "1", "--expert-ranks", "2"],
        port=free_port(),
        grpc_port=free_port(),
    )
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 180
    # Interrupt once the cluster is up and the app is deploying (replicas loading weights).
    while time.monotonic() < deadline and sp.proc.poll() is None:
        for p in sp.tree()[1:]:
            seen.setdefault(p.pid, p)
        names = " ".join(_name(p) for p in seen.values())
        if "ServeReplica" in names:
            break
        time.sleep(0.2)
    assert sp.proc.poll() is None, sp.output()[-3000:]
    assert any("raylet" in _name(p) for p in seen.values()), "no raylet started"
    time.sleep(1)
    for p in sp.tree()[1:]:
        seen.setdefault(p.pid, p)
    t0 = time.monotonic()
    code = sp.stop(sig, timeout_s=15)
    assert time.monotonic() - t0 < 15
    assert code == 128 + sig, code
    time.sleep(1)
    alive = [(p.pid, _name(p)) for p in seen.values() if _alive(p)]
    assert not alive, f"left behind: {alive}"
    assert "epserve is serving" not in sp.output()


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:80] or p.name()
    except psutil.Error:
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
