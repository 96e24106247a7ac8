"""The run folder (config.output_dir): checked writable and locked before anything loads, the logs of an
earlier run set aside when a run starts from step 0, and a write that runs out of space named as such."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import yaml

from grpo.config import Template
from grpo.errors import ConfigError, StorageError
from grpo.run.atomic_files import atomic_write_text
from grpo.run.logger import RunLogger

# What a run appends to or rewrites as it goes; a run from step 0 must not mix its lines with an earlier run's.
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "tensorboard", "eval.json", "eval.jsonl", "wandb_run_id")
EARLIER_RUNS = "earlier-runs"
LOCK_FILE = ".run.lock"  # flock'ed by the run's main process for its whole life; holds its pid
_HELD: dict[Path, int] = {}  # folder -> lock fd: a second trainer in the same process may use its folder


def claim_run_dir(output_dir: Path, *, is_main: bool) -> None:
    """Check the folder is writable, then take its lock (the main rank), so that a second run on the same
    output_dir is refused in one line instead of mixing its logs and checkpoints into this one's. The OS drops
    the lock when the process ends, however it ends, so a killed run never leaves a stale one."""
    check_writable(output_dir)
    folder = output_dir.resolve()
    if not is_main or folder in _HELD:
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"config.output_dir = {str(output_dir)!r} is in use by another run (pid {holder}); wait for it "
            "to end or stop it, or choose another output_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[folder] = fd


def check_writable(output_dir: Path) -> None:
    """A folder the run can create and write files in: refused in one line before any model loads."""
    where = f"config.output_dir = {str(output_dir)!r}"
    for parent in [output_dir, *output_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{where}: {parent} is a file, not a folder; choose another output_dir.")
            break
    probe = output_dir / f".write-test-{time.time_ns()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{where} cannot be written ({e.strerror}); choose a folder you can write to."
        ) from None


def set_aside_earlier_logs(output_dir: Path) -> Path | None:
    """Move an earlier run's logs into earlier-runs/<time>/ so that a run starting at step 0 writes clean
    ones; returns that folder (None when there was nothing to move). Checkpoints and saved models stay."""
    found = [output_dir / name for name in RUN_LOGS if (output_dir / name).exists()]
    if not found:
        return None
    target = output_dir / EARLIER_RUNS / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():  # two starts within a second
        target = target.with_name(target.name + "-1")
    target.mkdir(parents=True)
    for path in found:
        path.rename(target / path.name)
    return target


def open_run_log(
    output_dir: Path, template: Template, total_steps: int, step: int, notes: list[str]
) -> RunLogger:
    """Rank 0 at the start of train(): set aside an earlier run's logs when starting from step 0, save the
    template beside the run, open the logger and write the start-up notes to it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    earlier = set_aside_earlier_logs(output_dir) if step == 0 else None
    atomic_write_text(output_dir / "template.yaml", yaml.safe_dump(asdict(template), sort_keys=False))
    c = template.config
    logger = RunLogger(
        output_dir,
        total_steps=total_steps,
        config=asdict(template),
        use_wandb=c.log_to_wandb,
        wandb_project=c.wandb_project,
        run_name=template.name,
        initial_step=step,
    )
    if earlier is not None:
        logger.write(f"Moved the logs of an earlier run in {output_dir} to {earlier}")
    for note in notes:
        logger.write(note)
    return logger


def is_out_of_space(error: BaseException) -> bool:
    """ENOSPC/EDQUOT, or torch.save's zip writer, which reports a failed write as 'unexpected pos'."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and (
        "unexpected pos" in str(error) or "file write failed" in str(error)
    )


@contextmanager
def naming_full_disk(what: str, folder: Path) -> Iterator[None]:
    """Turn running out of space while writing `what` into one line that says so, with the space left."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_out_of_space(e):
            raise
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
        raise StorageError(
            f"Out of disk space while writing {what} in {folder} ({free / 1e6:.0f} MB free): earlier checkpoints "
            "are intact; free some space, then continue with resume=latest."
        ) from None
