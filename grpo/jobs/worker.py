"""Run queued jobs, one at a time or several side by side, each as its own process group, and read what a job left
in its folder.

`grpo worker --parallel N` runs up to N jobs at once. A job holds the GPUs its gpu_ids lists (auto: every GPU;
a CPU job: none) and starts only when none of them is held by a running job. Jobs start strictly in queue order.

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
from dataclasses import dataclass
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


GPUs = frozenset[int] | None  # the GPUs a job holds: listed ids, None = every GPU, empty = none (CPU)


def job_config(job: Job) -> dict[str, Any]:
    """The config section of the job's resolved template."""
    import yaml

    return (yaml.safe_load(job.resolved) or {}).get("config", {})


def job_gpus(job: Job, machine_has_gpus: bool) -> GPUs:
    """What a job occupies while it runs: its gpu_ids list, every GPU for gpu_ids auto, nothing on the CPU."""
    config = job_config(job)
    if not machine_has_gpus or config.get("train_device") == "cpu":
        return frozenset()
    ids = config.get("gpu_ids", "auto")
    return frozenset(ids) if isinstance(ids, list) else None


def gpus_free(need: GPUs, busy: list[GPUs]) -> bool:
    """A job can start when no running job holds a GPU it needs ("every GPU" overlaps any GPU job)."""
    if need is not None and not need:
        return True  # a CPU job
    for held in busy:
        if held is not None and not held:
            continue
        if need is None or held is None or need & held:
            return False
    return True


@dataclass
class Running:
    job: Job
    proc: subprocess.Popen[bytes]
    log: Any  # the open train.log
    gpus: GPUs


class Worker:
    """Runs queued jobs in queue order, up to `parallel` at once, each only when the GPUs it names are free
    (strictly in order: a job that must wait holds back the ones queued after it)."""

    def __init__(
        self, store: Store, *, poll: float = 2.0, once: bool = False, echo: Any = print, parallel: int = 1
    ):
        self.store, self.poll, self.once, self.echo = store, poll, once, echo
        self.parallel = parallel
        self.running: list[Running] = []
        self.shutdown = False
        self.machine_has_gpus = False

    def recover(self) -> None:
        """Jobs left in running by a dead worker become failed; their training processes are told to stop."""
        for job in self.store.fail_orphans(pid_alive):
            self.echo(f"job {job.id}: failed (worker {job.worker_pid} died)")
            if pid_alive(job.job_pid):
                signal_group(job.job_pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Jobs live in their own sessions and do not see the worker's Ctrl-C: pass the stop on.
        self.shutdown = True
        for r in self.running:
            signal_group(r.proc.pid)

    def run(self) -> int:
        self.recover()
        if self.parallel > 1:  # only then does it matter which GPUs a job holds
            import torch

            self.machine_has_gpus = torch.cuda.is_available()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                self.reap()
                if not self.shutdown:
                    self.start_ready()
                if not self.running and (self.shutdown or (self.once and self.store.next_queued() is None)):
                    break
                time.sleep(self.poll)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def start_ready(self) -> None:
        """Start queued jobs, oldest first, while a slot is free and the oldest one's GPUs are free."""
        while len(self.running) < self.parallel:
            job = self.store.next_queued()
            if job is None:
                return
            gpus = job_gpus(job, self.machine_has_gpus)
            if not gpus_free(gpus, [r.gpus for r in self.running]):
                return
            if self.store.claim(job.id, os.getpid()):
                self.start(self.store.job(job.id), gpus)

    def start(self, job: Job, gpus: GPUs) -> None:
        folder = self.store.job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        resolved = folder / "job.yaml"
        resolved.write_text(job.resolved)
        cwd = job.cwd if Path(job.cwd).is_dir() else str(folder)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.echo(f"job {job.id}: running ({job.template})")
        log = open(folder / "train.log", "ab")
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
            log.close()
            self.store.finish(job.id, "failed", f"could not start the training process: {e}", None)
            return
        self.running.append(Running(job, proc, log, gpus))
        if self.store.set_job_pid(job.id, proc.pid) or self.shutdown:
            signal_group(proc.pid)

    def reap(self) -> None:
        """Record every job whose process has ended."""
        for r in [r for r in self.running if r.proc.poll() is not None]:
            self.running.remove(r)
            r.log.close()
            self.finish(r.job, r.proc.returncode)

    def finish(self, job: Job, code: int) -> None:
        folder = self.store.job_dir(job.id)
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
    config = job_config(job)
    return Path(config.get("output_dir", store.job_dir(job.id) / "output")) / config.get(
        "adaptor_name", "adaptor"
    )
