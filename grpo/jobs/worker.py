"""Run queued jobs, one at a time or several side by side, each as its own process group.

`grpo worker --parallel N` runs up to N jobs at once. A job holds the GPUs its gpu_ids lists (auto: every GPU;
a CPU job: none) and starts only when none of them is held by a running job. Jobs start strictly in queue order.

A job runs as `python scripts/train.py <job>/job.yaml` (or `python -m torch.distributed.run --nproc_per_node=N
...` when its gpu_ids lists N > 1 GPUs) in a new session, so `grpo stop` can SIGTERM the whole group: the
trainer then finishes the step in flight, saves the model and exits. The training process also gets SIGTERM when
its worker dies, however it dies (processes.die_with_worker): no run goes on with no one to record it. What its
exit means (completed, stopped, interrupted, failed) is decided in recovery.outcome.

A worker that starts takes over the running jobs of a dead worker (recovery.reconcile): it records how those that
ended did, and watches those still stopping until they end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpo
from grpo.jobs.job_folder import job_config, run_header
from grpo.jobs.processes import die_with_worker, is_job_process, signal_group
from grpo.jobs.recovery import outcome, reconcile
from grpo.jobs.store import Job, Store

TRAIN_SCRIPT = Path(grpo.__file__).resolve().parent.parent / "scripts" / "train.py"


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


@dataclass
class Adopted:
    """A dead worker's job whose training process is still stopping: this worker records its end."""

    job: Job
    gpus: GPUs
    gone: str  # why it lost its worker, for the reason


class Worker:
    """Runs queued jobs in queue order, up to `parallel` at once, each only when the GPUs it names are free
    (strictly in order: a job that must wait holds back the ones queued after it)."""

    def __init__(
        self, store: Store, *, poll: float = 2.0, once: bool = False, echo: Any = print, parallel: int = 1
    ):
        self.store, self.poll, self.once, self.echo = store, poll, once, echo
        self.parallel = parallel
        self.running: list[Running] = []
        self.adopted: list[Adopted] = []
        self.shutdown = False
        self.machine_has_gpus = False

    def recover(self) -> None:
        """Settle the jobs a dead worker left running; adopt those whose training process is still stopping."""
        settled, adopted = reconcile(self.store, adopter=os.getpid())
        for job in settled:
            self.echo(f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""))
        for job, gone in adopted:
            self.adopted.append(Adopted(job, job_gpus(job, self.machine_has_gpus), gone))
            self.echo(f"job {job.id}: {gone}; waiting for its training process {job.job_pid} to stop")

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Jobs live in their own sessions and do not see the worker's Ctrl-C: pass the stop on.
        self.shutdown = True
        for r in self.running:
            signal_group(r.proc.pid)

    def run(self) -> int:
        if self.parallel > 1:  # only then does it matter which GPUs a job holds
            import torch

            self.machine_has_gpus = torch.cuda.is_available()
        self.recover()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                self.reap()
                if not self.shutdown:
                    self.start_ready()
                idle = not self.running and not self.adopted
                if idle and (self.shutdown or (self.once and self.store.next_queued() is None)):
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
            if not gpus_free(gpus, [r.gpus for r in self.running] + [a.gpus for a in self.adopted]):
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
        log.write(
            run_header(job, os.getpid(), datetime.now().isoformat(sep=" ", timespec="seconds")).encode()
        )
        log.flush()
        try:
            proc = subprocess.Popen(
                job_command(job, resolved),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_worker(),
            )
        except OSError as e:
            log.close()
            self.store.finish(job.id, "failed", f"could not start the training process: {e}", None)
            return
        self.running.append(Running(job, proc, log, gpus))
        if self.store.set_job_pid(job.id, proc.pid) or self.shutdown:
            signal_group(proc.pid)

    def reap(self) -> None:
        """Record every job whose process has ended, its own and adopted ones."""
        for r in [r for r in self.running if r.proc.poll() is not None]:
            self.running.remove(r)
            r.log.close()
            self.finish(r.job, r.proc.returncode)
        alive = lambda a: is_job_process(a.job.job_pid, self.store.job_dir(a.job.id) / "job.yaml")  # noqa: E731
        for a in [a for a in self.adopted if not alive(a)]:
            self.adopted.remove(a)
            self.finish(a.job, None, gone=a.gone)

    def finish(self, job: Job, code: int | None, gone: str = "") -> None:
        # An adopted job was not stopped by this worker's shutdown: its own worker's death stopped it.
        shutdown = self.shutdown and not gone
        state, reason = outcome(self.store, self.store.job(job.id), code, gone=gone, shutdown=shutdown)
        self.store.finish(job.id, state, reason, code)
        self.echo(f"job {job.id}: {state}" + (f" ({reason})" if reason else ""))
