"""Run queued jobs one at a time, each as its own process group, and read what a job left in its folder.

A job runs as `python scripts/train.py <job>/job.yaml` (or `python -m torch.distributed.run --nproc_per_node=N
...` when its gpu_ids lists N > 1 GPUs) in a new session, so `grpo stop` can SIGTERM the whole group: the
trainer then finishes the step in flight, saves the model and exits. Exit code 0 -> completed, a requested stop
-> stopped, anything else -> failed with the last error line of the log as the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpo
from grpo.jobs.store import Job, Store

TRAIN_SCRIPT = Path(grpo.__file__).resolve().parent.parent / "scripts" / "train.py"


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


def signal_group(pid: int | None, sig: int = signal.SIGTERM) -> bool:
    """Signal a job's process group (its pid is the group id: it was started in a new session)."""
    if not pid:
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def job_command(job: Job, resolved_path: Path) -> list[str]:
    if job.nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={job.nproc}",
            str(TRAIN_SCRIPT),
            str(resolved_path),
        ]
    return [sys.executable, str(TRAIN_SCRIPT), str(resolved_path)]


class Worker:
    def __init__(self, store: Store, *, poll: float = 2.0, once: bool = False, echo: Any = print):
        self.store, self.poll, self.once, self.echo = store, poll, once, echo
        self.current: subprocess.Popen[bytes] | None = None
        self.shutdown = False

    def recover(self) -> None:
        """Jobs left in running by a dead worker become failed; their training processes are told to stop."""
        for job in self.store.fail_orphans(pid_alive):
            self.echo(f"job {job.id}: failed (worker {job.worker_pid} died)")
            if pid_alive(job.job_pid):
                signal_group(job.job_pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The job lives in its own session and does not see the worker's Ctrl-C: pass the stop on.
        self.shutdown = True
        if self.current is not None:
            signal_group(self.current.pid)

    def run(self) -> int:
        self.recover()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.shutdown:
                job = self.store.claim_next(os.getpid())
                if job is None:
                    if self.once:
                        break
                    time.sleep(self.poll)
                    continue
                self.run_job(job)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def run_job(self, job: Job) -> None:
        folder = self.store.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        resolved = folder / "job.yaml"
        resolved.write_text(job.resolved)
        cwd = job.cwd if Path(job.cwd).is_dir() else str(folder)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.echo(f"job {job.id}: running ({job.template})")
        with open(folder / "train.log", "ab") as log:
            try:
                proc = subprocess.Popen(
                    job_command(job, resolved),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                self.store.finish(job.id, "failed", f"could not start the training process: {e}", None)
                return
            self.current = proc
            if self.store.set_job_pid(job.id, proc.pid) or self.shutdown:
                signal_group(proc.pid)
            code = proc.wait()
            self.current = None
        stop_requested = self.store.job(job.id).stop_requested
        if stop_requested or self.shutdown:
            why = "stopped by grpo stop" if stop_requested else "stopped with the worker"
            state, reason = "stopped", why
        elif code == 0:
            state, reason = "completed", None
        else:
            state = "failed"
            reason = last_error_line(folder / "train.log") or f"exit code {code}"
            if code < 0:
                reason = f"killed by {signal.Signals(-code).name}: {reason}"
        self.store.finish(job.id, state, reason, code)
        self.echo(f"job {job.id}: {state}" + (f" ({reason})" if reason else ""))


def last_error_line(log: Path, tail_bytes: int = 65536) -> str | None:
    """The last line starting with 'error:' (our one-line user/run errors), else the last non-empty line."""
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - tail_bytes))
        text = f.read().decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return lines[-1] if lines else None


def progress(store: Store, job: Job) -> dict[str, Any]:
    """Last logged step and mean reward from the job's metrics.jsonl."""
    metrics = store.job_dir(job.id) / "output" / "metrics.jsonl"
    last: dict[str, Any] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
    return {
        "step": int(last.get("step", 0)),
        "max_steps": job.max_steps,
        "reward": last.get("reward/total_mean"),
    }


def model_dir(store: Store, job: Job) -> Path:
    import yaml

    config = (yaml.safe_load(job.resolved) or {}).get("config", {})
    return Path(config.get("output_dir", store.job_dir(job.id) / "output")) / config.get(
        "adaptor_name", "adaptor"
    )
