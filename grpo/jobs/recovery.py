"""Keep every job's state true when its worker is gone, and rebuild a lost database from the job folders.

A job's state is decided from what its run wrote, never from which process noticed first:

- its run wrote its model after its last step ("Finished at step N" in train.log): completed, whatever happened
  after (a crash in the closing report, a worker that died before it saw the exit);
- else a stop was asked for (grpo stop, or the worker itself was stopped): stopped;
- else it ended early with no one asking, because its worker died: interrupted, and `grpo resume` continues it
  from its newest checkpoint (the trainer writes one when SIGTERM stops it; see processes.die_with_worker);
- else it exited with an error: failed, with the log's last error line.

`reconcile` applies this to every running job whose worker is dead; every command that reads jobs and every
worker that starts calls it, so a job whose process is gone never reads as running.
"""

from __future__ import annotations

import signal
import time

from grpo.jobs.job_folder import has_checkpoint, last_error_line, log_path, progress, run_end
from grpo.jobs.processes import is_job_process, is_worker, signal_group
from grpo.jobs.store import Job, Store


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
    reason = last_error_line(log_path(store, job)) or f"exit code {code}"
    if code < 0:
        reason = f"killed by {signal.Signals(-code).name}: {reason}"
    return "failed", reason


def reconcile(store: Store, *, adopter: int | None = None) -> tuple[list[Job], list[tuple[Job, str]]]:
    """Settle the running jobs whose worker is dead. A training process still alive is told to stop (where the
    kernel did not already) and, when `adopter` (a starting worker's pid) is given, handed to it to record its
    end; an ended one gets its outcome. Returns the settled jobs, as they now are, and the adopted ones, each with
    why it lost its worker."""
    settled, adopted = [], []
    for job in store.jobs("running"):
        if job.worker_pid != adopter and is_worker(job.worker_pid):
            continue  # a live worker records this job itself
        gone = f"its worker (pid {job.worker_pid}) died"
        if is_job_process(job.job_pid, store.job_dir(job.id) / "job.yaml"):
            signal_group(job.job_pid)
            if adopter is not None and store.orphan_update(
                job, worker_pid=adopter, reason=f"{gone}; stopping, watched by worker {adopter}"
            ):
                adopted.append((store.job(job.id), gone))
            elif adopter is None and job.reason is None:
                store.orphan_update(job, reason=f"{gone}; its training process {job.job_pid} is stopping")
            continue
        state, reason = outcome(store, job, None, gone=gone)
        if store.orphan_update(job, state=state, reason=reason, ended_at=time.time()):
            settled.append(store.job(job.id))
    return settled, adopted
