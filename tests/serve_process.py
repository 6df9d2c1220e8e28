"""`epserve serve` as a real subprocess for tests: started, waited for, stopped by pid.

Tests that need the whole command (its own local cluster, token, signals) use this instead of
serve.run in the pytest process. Every wait is bounded; teardown sends SIGINT, then SIGKILLs
the process tree it recorded (only processes this helper started) if the command hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

READY_LINE = "epserve is serving model"


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return "".join(self.lines)

    def tree(self) -> list[psutil.Process]:
        """The command and every process it started (raylets, GCS, workers, Serve replicas...)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(READY_LINE in ln for ln in self.lines):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"epserve serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"epserve serve not ready within {timeout_s} s:\n{self.output()[-4000:]}")

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 60.0) -> int:
        """Signal the command and wait; a command that does not exit is killed with its whole tree."""
        tree = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for p in tree:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            self.proc.wait(timeout=10)
            raise AssertionError(  # noqa: B904  # the timeout is the failure; its traceback stays as context
                f"epserve serve did not exit within {timeout_s} s of {signal.Signals(sig).name}"
            )


def start_serve(args: list[str], *, port: int, grpc_port: int, env: dict[str, str] | None = None) -> ServeProcess:
    """Start `epserve serve ARGS --host 127.0.0.1 --port P --grpc-port G` with output captured line by line."""
    full_env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    # A fresh token per command: the pytest process's own cluster token must not leak into it.
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        full_env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "epserve.cli",
        "serve",
        *args,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, stdin=subprocess.DEVNULL
    )
    sp = ServeProcess(proc=proc, port=port, grpc_port=grpc_port)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sp.lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return sp
