"""Whether a worker or a job's training process is alive, how to signal a job, and how a job dies with its worker.

A pid alone does not prove that a job still runs: the system reuses pids, so a job could read as running forever
because an unrelated process got its number. Where /proc exists, a training process must also name its job's
job.yaml on its command line and a worker must be a `worker` command.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def pid_alive(pid: int | None) -> bool:
    """True for a live process; a zombie (dead, not yet reaped) counts as dead."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def command_line(pid: int) -> list[str] | None:
    """The process's arguments, or None where the system does not show them (no /proc, or it just ended)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def is_worker(pid: int | None) -> bool:
    if not pid_alive(pid):
        return False
    args = command_line(pid)  # type: ignore[arg-type]
    return args is None or "worker" in args


def is_job_process(pid: int | None, job_yaml: Path) -> bool:
    """The job's training process (or its torchrun launcher) is alive."""
    if not pid_alive(pid):
        return False
    args = command_line(pid)  # type: ignore[arg-type]
    return args is None or str(job_yaml) in args


def signal_group(pid: int | None, sig: int = signal.SIGTERM) -> bool:
    """Signal a job's process group (its pid is the group id: it was started in a new session)."""
    if not pid:
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def die_with_worker() -> Callable[[], None] | None:
    """A preexec_fn that makes the training process receive SIGTERM when the worker that started it dies, even by
    SIGKILL, which the worker cannot pass on itself. SIGTERM, not SIGKILL: the trainer then finishes its step,
    writes a checkpoint and the model, and exits, so the job can be resumed. Linux only (prctl); elsewhere the
    next `grpo` command that reads the jobs sends the SIGTERM (recovery.py)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    worker, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:
        # The worker's Python handler would swallow a SIGTERM that arrives before exec: use the default.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != worker:  # the worker died before prctl took effect: no signal would come
            os.kill(os.getpid(), sigterm)

    return preexec
