"""Keep every job's state true when its worker is gone, and rebuild a lost database from the job folders.

A job's state is decided from what its run wrote, never from which process noticed first:

- its run wrote its model after its last step ("Finished at step N" in train.log): completed, whatever happened
  after (a crash in the closing report, a worker that died before it saw the exit);
- else a stop was asked for (grpo stop, or the worker itself was stopped): stopped;
- else it ended early with no one asking, because its worker died or a signal killed it: interrupted, and
  `grpo resume` continues it from its newest checkpoint (the trainer writes one when SIGTERM stops it; see
  processes.die_with_worker);
- else it exited with an error, or crashed: failed, with the log's last error line.

While the training process of a job whose worker died still runs (it finishes its step and saves a checkpoint
first), the job reads stopping; the run folder's lock keeps a resumed run from starting beside it.

`reconcile` applies this to every running job whose worker is dead; every command that reads jobs and every
worker that starts calls it, so a job whose process is gone never reads as running. `recover` (grpo recover)
puts back the rows of job folders and saved templates the database no longer lists.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from grpo.jobs.job_folder import has_checkpoint, last_error_line, log_path, progress, run_end
from grpo.jobs.processes import is_job_process, is_worker, signal_group
from grpo.jobs.store import Job, Store, UnreadableDatabase, grpo_home


def outcome(
    store: Store, job: Job, code: int | None, *, gone: str = "", shutdown: bool = False
) -> tuple[str, str | None]:
    """(state, reason) of a job whose training process has ended. `code` is its exit code, None when no one saw
    it exit, and `gone` then says why ("its worker (pid 12) died"); `shutdown`: its worker was stopped."""
    end = run_end(log_path(store, job))
    if end is not None and (end[0] or (job.max_steps is not None and end[1] >= job.max_steps)):
        if code == 0:
            return "completed", None
        if code is None:
            return "completed", f"{gone}; the run had finished"
        return "completed", f"the model was saved, then the process exited with code {code}"
    if job.stop_requested:
        return "stopped", "stopped by grpo stop"
    if shutdown:
        return "stopped", "stopped with the worker"
    step = end[1] if end is not None else progress(store, job)["step"]
    if has_checkpoint(store, job):
        resume = f"continue it with grpo resume {job.id}"
    else:
        resume = f"no checkpoint to resume from; queue it again with grpo queue {job.template}"
    if code is None:
        return "interrupted", f"{gone} at step {step}; {resume}"
    if code == 0:  # a SIGTERM from outside the queue stopped the run early
        return "interrupted", f"stopped by a signal at step {step}; {resume}"
    if code < 0 and -code in _FROM_OUTSIDE:  # kill -9, the OOM killer: nothing in the run's log explains it
        return (
            "interrupted",
            f"its training process was killed by {signal.Signals(-code).name} at step {step}; {resume}",
        )
    reason = last_error_line(log_path(store, job)) or f"exit code {code}"
    if code < 0:
        reason = f"crashed with {signal.Signals(-code).name} at step {step}; the log's last line: {reason}"
    return "failed", reason


# Signals that end a process from outside, as against the crashes (SIGSEGV, SIGABRT, SIGBUS) of the process itself.
_FROM_OUTSIDE = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def reconcile(store: Store, *, adopter: int | None = None) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Settle the running jobs whose worker is dead. A training process still alive is told to stop (where the
    kernel did not already) and, when `adopter` (a starting worker's pid) is given, handed to it to record its
    end; an ended one gets its outcome. Returns the settled jobs, as they now are, and the adopted ones, each with
    why it lost its worker."""
    settled, adopted = [], []
    for job in store.jobs("running") + store.jobs("stopping"):
        if job.worker_pid != adopter and is_worker(job.worker_pid):
            continue  # a live worker records this job itself
        gone = f"its worker (pid {job.worker_pid}) died"
        if is_job_process(job.job_pid, store.job_dir(job.id) / "job.yaml"):
            signal_group(job.job_pid)
            if adopter is not None and store.orphan_update(
                job,
                state="stopping",
                worker_pid=adopter,
                reason=f"{gone}; stopping, watched by worker {adopter}",
            ):
                adopted.append((store.job(job.id), gone))
            elif adopter is None and job.state == "running":
                store.orphan_update(
                    job,
                    state="stopping",
                    reason=f"{gone}; its training process {job.job_pid} finishes its step and saves a checkpoint",
                )
            continue
        state, reason = outcome(store, job, None, gone=gone)
        if store.orphan_update(job, state=state, reason=reason, ended_at=time.time()):
            settled.append(store.job(job.id))
    return settled, adopted


# ---------------------------------------------------------------- grpo recover
_COLUMNS = {f.name for f in fields(Job)}


def _restored_row(store: Store, job_id: int, folder: Path) -> dict[str, Any]:
    """A job's row from its folder: job.json when it is readable, else what job.yaml and the log tell."""
    yaml_file = folder / "job.yaml"
    resolved = yaml_file.read_text() if yaml_file.is_file() else ""
    try:
        data = yaml.safe_load(resolved) or {}
        config = data.get("config") or {}
    except yaml.YAMLError:
        data, config = {}, {}
    gpu_ids = config.get("gpu_ids")
    max_steps = config.get("max_steps")
    row: dict[str, Any] = {
        "template": str(data.get("name") or "?"),
        "overrides": [],
        "cwd": str(folder),
        "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
        "nproc": len(gpu_ids) if isinstance(gpu_ids, list) else 1,
        "queued_at": (yaml_file if yaml_file.is_file() else folder).stat().st_mtime,
        "stop_requested": 0,
    }
    try:
        saved = json.loads((folder / "job.json").read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("state"):
        row.update({k: v for k, v in saved.items() if k in _COLUMNS})
    elif not resolved:
        row.update(state="failed", reason="restored by grpo recover without its job.yaml")
    elif (folder / "train.log").is_file():
        row.update(state="running")  # it ran: reconcile decides how it ended, from its log
    else:
        row.update(state="stopped", reason="restored by grpo recover: it had not started; queue it again")
    row.update(id=job_id, resolved=resolved)
    return row


def _set_aside(path: Path) -> Path:
    """Move an unreadable database (with its WAL files, which belong to it) out of the way; nothing is deleted."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.unreadable-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(target.with_name(target.name + suffix))
    return target


def recover(home: Path | None = None) -> list[str]:
    """Put back the rows of the job folders and saved templates the database does not list; returns what was
    done, one line each."""
    home = home or grpo_home()
    lines = []
    try:
        store = Store(home, check=False)
    except UnreadableDatabase:
        moved = _set_aside(home / "grpo.db")
        lines.append(f"moved the unreadable database to {moved}")
        store = Store(home, check=False)
    try:
        known = set(store.template_names())
        for name, file in sorted(store.template_files().items()):
            if name not in known:
                store.restore_template(name, file.read_text(), file.stat().st_mtime)
                lines.append(f"template {name}: restored from {file}")
        ids = {job.id for job in store.jobs()}
        restored = []
        for job_id, folder in sorted(store.job_folders().items()):
            if job_id not in ids:
                store.restore_job(_restored_row(store, job_id, folder))
                restored.append(job_id)
        for job in store.jobs("running"):
            if job.id in restored and job.worker_pid is None:  # no record of who ran it
                state, reason = outcome(store, job, None, gone="its record was lost")
                store.orphan_update(job, state=state, reason=reason, ended_at=time.time())
        reconcile(store)
        for job_id in restored:
            job = store.job(job_id)
            lines.append(
                f"job {job_id}: restored as {job.state}" + (f" ({job.reason})" if job.reason else "")
            )
    finally:
        store.close()
    return lines or [f"nothing to recover: the database lists every job folder and template in {home}"]
