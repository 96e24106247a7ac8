"""A job's state stays true when its worker dies: real `grpo worker` processes killed with SIGKILL, real training
processes, real job folders."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from grpo.jobs.processes import pid_alive
from tests import test_jobs
from tests.test_jobs import CLI, _running_job_pid, grpo, job, run_queue, wait_for

env, saved = test_jobs.env, test_jobs.saved  # the fixtures: a fresh GRPO_HOME, the tiny template saved in it


def start_worker(env: dict[str, str], poll: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "worker", "--poll", str(poll)], env=env, stdout=subprocess.DEVNULL)


def test_a_killed_worker_takes_its_run_down_and_the_job_resumes(env, saved):
    # save_steps=1000: no checkpoint on the way, only the one the trainer writes when SIGTERM stops it
    job_id = grpo(env, "queue", "tiny", "max_steps=1000", "save_steps=1000").stdout.strip()
    worker = start_worker(env, 0.2)
    job_pid = 0
    try:
        job_pid = wait_for(lambda: _running_job_pid(env, job_id), 60, "the job to start")
        wait_for(lambda: job(env, job_id)["step"] >= 1, 90, "the first step")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        wait_for(lambda: not pid_alive(job_pid), 10, "the training process to end with its worker")
    finally:
        worker.kill()
        if pid_alive(job_pid):
            os.killpg(job_pid, signal.SIGKILL)
    info = job(env, job_id)
    step = info["step"]
    assert (info["state"], info["reason"]) == (
        "interrupted",
        f"its worker (pid {worker.pid}) died at step {step}; continue it with grpo resume {job_id}",
    )
    assert 1 <= step < 1000 and info["ended"] is not None
    checkpoints = Path(info["folder"]) / "output" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [f"step-{step:06d}"]
    row = grpo(env, "jobs").stdout.splitlines()[1].split()
    assert row[:4] == [job_id, "tiny", "interrupted", f"{step}/1000"]
    # the next worker leaves it as it is: nothing to run, nothing to mark failed
    assert grpo(env, "worker", "--once", "--poll", "0.2").stdout == ""
    assert job(env, job_id)["state"] == "interrupted"
    out = grpo(env, "resume", job_id, f"max_steps={step + 1}").stdout
    assert out == f"job {job_id}: queued to resume from step-{step:06d}\n"
    run_queue(env)
    info = job(env, job_id)
    assert (info["state"], info["reason"], info["step"], info["max_steps"]) == (
        "completed",
        None,
        step + 1,
        step + 1,
    )
    assert (
        f"Resumed from {checkpoints / f'step-{step:06d}'} at step {step}" in grpo(env, "logs", job_id).stdout
    )


def test_a_run_that_saved_its_model_is_completed_though_its_worker_died(env, saved):
    job_id = grpo(env, "queue", "tiny", "max_steps=2").stdout.strip()
    worker = start_worker(env, 300)  # starts the job at once, then does not look at it again for 300 s
    try:
        job_pid = wait_for(lambda: _running_job_pid(env, job_id), 60, "the job to start")
        wait_for(
            lambda: not pid_alive(job_pid), 120, "the run to end"
        )  # exited, not yet reaped by its worker
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        worker.kill()
    info = job(env, job_id)
    assert (info["state"], info["reason"], info["step"]) == (
        "completed",
        f"its worker (pid {worker.pid}) died; the run had finished",
        2,
    )
    assert (Path(info["model"]) / "config.json").is_file()
    assert grpo(env, "worker", "--once", "--poll", "0.2").stdout == ""
    assert job(env, job_id)["state"] == "completed"
