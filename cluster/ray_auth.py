"""Ray token authentication for every cluster epserve starts or joins.

Why: Serve replicas run an internal gRPC server that unpickles request metadata, and the GCS
accepts jobs from anyone who can reach it. Ray checks a bearer token on all of them only when
RAY_AUTH_MODE=token. `ray.init()` turns that on for clusters it starts itself, but
`ray.cluster_utils.Cluster` (our local multi-node clusters) does not, so we do it here.

The token is generated per cluster (256 random bits) into a private folder (0700, file 0600)
and handed to Ray through RAY_AUTH_TOKEN_PATH, so it never appears in logs or process
arguments. A token the user already configured (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) is used
as it is. Tests: tests/replicas/test_exposure.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"


class RayAuthError(ValueError):
    """Token authentication cannot be set up as asked (a message for the user, no traceback)."""


@dataclass
class ClusterToken:
    """The token this process (and every Ray process it starts) authenticates with."""

    path: Path | None  # the file we generated; None when the user's own token is used
    _folder: Path | None = None

    def remove(self) -> None:
        """Delete a generated token (the cluster it guarded is gone)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
            # The next cluster this process starts must get a token of its own, not this dead path.
            if os.environ.get(TOKEN_PATH_VAR) == str(self.path):
                os.environ.pop(TOKEN_PATH_VAR)


def user_token_configured() -> bool:
    return bool(os.environ.get(TOKEN_VAR)) or bool(os.environ.get(TOKEN_PATH_VAR))


def enable_token_auth(*, generate: bool) -> ClusterToken:
    """Turn token auth on for this process and its children.

    Args:
        generate: make a fresh token for a cluster we are about to start (unless the user gave one).
            False when joining an existing cluster: the user's token must then be configured.
    """
    mode = os.environ.get(MODE_VAR)
    if mode is not None and mode.lower() != "token":
        raise RayAuthError(
            f"{MODE_VAR}={mode}: epserve runs Ray only with token authentication (unset it, or set "
            f"{MODE_VAR}=token); without it anyone who reaches a Serve replica's port can run code"
        )
    token = ClusterToken(path=None)
    if not user_token_configured():
        if not generate:
            raise RayAuthError(
                f"joining a Ray cluster needs its token: set {TOKEN_PATH_VAR} (a file) or {TOKEN_VAR} "
                "to the token the cluster was started with"
            )
        folder = Path(tempfile.mkdtemp(prefix="epserve-ray-auth-"))  # mkdtemp makes it 0700
        path = folder / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        os.environ[TOKEN_PATH_VAR] = str(path)
        token = ClusterToken(path=path, _folder=folder)
    os.environ[MODE_VAR] = "token"
    if "ray" in sys.modules:
        _refresh_ray()
    return token


def _refresh_ray() -> None:
    """Ray caches its config and token at import; make an already imported Ray see the new ones."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # compiled; its stub lacks them

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
