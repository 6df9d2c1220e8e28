"""Process-group set-up among the actors of one expert-parallel group, with collective deadlines.

Owns: `GroupSpec` (what the driver tells every rank: rendezvous address, world size, backend,
deadline, epoch) and `GroupHandle` (the handle collectives take; no module-level rank or
group getters). NCCL when every rank has a GPU, gloo otherwise. The deadline bounds every
collective: a dead peer errors at once (gloo) or at the deadline, a frozen one at the
deadline, never a hang. Tests: tests/cluster/test_process_groups.py.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cluster.rank_progress import RankProgress

# ProcessGroupNCCL reads these when a group is created (torch docs: "ProcessGroupNCCL Environment Variables").
# An operator's own value in the rank's environment wins.
NCCL_SETTINGS = {
    # 2 = abort the communicator only: the ranks waiting in a collective get an error and the process lives on
    # (torch's default 3 tears the process down, which would reload a collateral rank's weights).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # non-blocking wait (the default, said explicitly): a collective returns once enqueued; a blocking wait would
    # sync the host on every collective of the decode step.
    "TORCH_NCCL_BLOCKING_WAIT": "0",
    # destroy_process_group aborts rather than destroys: ncclCommDestroy can block while a peer is dead.
    "TORCH_NCCL_ABORT_IN_DESTROY_PG": "1",
    # a watchdog that is itself stuck (a CUDA call that hangs) ends the process after this many seconds.
    "TORCH_NCCL_ENABLE_MONITORING": "1",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "120",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}


def apply_nccl_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set `NCCL_SETTINGS` in `environ` (default: this process) where not already set; returns what is in force."""
    env = os.environ if environ is None else environ
    for k, v in NCCL_SETTINGS.items():
        env.setdefault(k, v)
    return {k: env[k] for k in NCCL_SETTINGS}


@dataclass(frozen=True)
class GroupSpec:
    master_addr: str
    master_port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    deadline_s: float
    epoch: int

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {self.backend!r}")
        if self.deadline_s <= 0:
            raise ValueError(f"the collective deadline must be positive, got {self.deadline_s}")


@dataclass
class GroupHandle:
    """This process's membership of one group: pass it to every collective explicitly."""

    group: dist.ProcessGroup
    rank: int
    spec: GroupSpec
    progress: RankProgress = field(default_factory=RankProgress)  # updated by every collective

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.spec.backend == "nccl" else torch.device("cpu")


def choose_backend(*, every_rank_has_gpu: bool) -> str:
    return "nccl" if every_rank_has_gpu else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (the rendezvous store binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def join_group(spec: GroupSpec, rank: int, progress: RankProgress | None = None) -> GroupHandle:
    """Join the group (blocks until all ranks joined or the deadline passes).

    NOTE: torch keeps one default group per process; each rank actor belongs to exactly one
    group at a time, so `leave_group` must run before joining the group's next epoch.
    """
    if dist.is_initialized():
        leave_group()
    if spec.backend == "nccl":
        apply_nccl_settings()
    timeout = datetime.timedelta(seconds=spec.deadline_s)
    dist.init_process_group(
        backend=spec.backend,
        store=_rendezvous_store(spec, rank, timeout),
        rank=rank,
        world_size=spec.world_size,
        timeout=timeout,
    )
    group = dist.group.WORLD
    assert group is not None
    return GroupHandle(group=group, rank=rank, spec=spec, progress=progress or RankProgress())


def _rendezvous_store(spec: GroupSpec, rank: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The group's key-value store; rank 0 serves it on `master_addr` only.

    torch's own TCPStore server listens on every interface; handing it a socket we bound to the
    rendezvous address keeps it off other networks (the store accepts any client that reaches it)."""
    if rank != 0:
        return dist.TCPStore(spec.master_addr, spec.master_port, spec.world_size, False, timeout)
    family = socket.AF_INET6 if ":" in spec.master_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.master_addr, spec.master_port))
        sock.listen(max(128, spec.world_size))
    except OSError:
        sock.close()
        raise
    # The store owns the descriptor from here on (it closes it when destroyed).
    return dist.TCPStore(
        spec.master_addr,
        spec.master_port,
        spec.world_size,
        True,
        timeout,
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )


def leave_group() -> None:
    """Tear down this process's group, tolerating a group that a peer's death already broke."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001  # a broken group cannot always be destroyed cleanly; drop it anyway
            pass


def abort_group() -> None:
    """Abort this process's group from another thread, so a collective waiting on a failed peer returns with an
    error (NCCL: its communicators are aborted). gloo has no abort: its waiters return once the failed peer's
    process is gone (the driver kills it first)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001  # already aborted or destroyed
            pass
