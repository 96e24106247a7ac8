"""A job's state stays true when its worker dies, and a damaged job database is refused and rebuilt, never reset:
real `grpo worker` processes killed with SIGKILL, a real SQLite file emptied or overwritten, real job folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import yaml

from grpo.jobs.job_folder import has_checkpoint
from grpo.jobs.processes import pid_alive
from grpo.jobs.store import Store
from tests import test_jobs
from tests.test_jobs import CLI, _running_job_pid, grpo, job, run_queue, wait_for

env, saved = test_jobs.env, test_jobs.saved  # the fixtures: a fresh GRPO_HOME, the tiny template saved in it


def start_worker(env: dict[str, str], poll: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*CLI, "worker", "--poll", str(poll)], env=env, stdout=subprocess.DEVNULL)


SLOW_STEPS = "rewards=[{name: tests.user_rewards:slow_length, seconds: 6}]"  # a step of at least 6 s


def test_a_killed_worker_takes_its_run_down_and_the_job_resumes(env, saved):
    # save_steps=1000: no checkpoint on the way, only the one the trainer writes when SIGTERM stops it
    job_id = grpo(env, "queue", "tiny", "max_steps=1000", "save_steps=1000", SLOW_STEPS).stdout.strip()
    worker = start_worker(env, 0.2)
    job_pid = 0
    try:
        job_pid = wait_for(lambda: _running_job_pid(env, job_id), 60, "the job to start")
        wait_for(lambda: job(env, job_id)["step"] >= 1, 90, "the first step")
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        # Seconds into a 6 s step: the run finishes it before it stops, and the job says so meanwhile.
        info = job(env, job_id)
        assert pid_alive(job_pid)
        assert (info["state"], info["reason"]) == (
            "stopping",
            f"its worker (pid {worker.pid}) died; its training process {job_pid} finishes its step and saves a "
            "checkpoint",
        )
        assert f"Job {job_id} is stopping; only interrupted" in refused(
            env, "resume", job_id, "max_steps=2000"
        )
        wait_for(lambda: not pid_alive(job_pid), 30, "the training process to end with its worker")
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


def test_a_training_process_killed_from_outside_is_interrupted_with_a_sentence(env, saved):
    job_id = grpo(env, "queue", "tiny", "max_steps=1000", "save_steps=1", SLOW_STEPS).stdout.strip()
    worker = start_worker(env, 0.2)
    try:
        job_pid = wait_for(lambda: _running_job_pid(env, job_id), 60, "the job to start")
        # the step is recorded before its checkpoint is written: wait for the checkpoint itself
        store = Store(Path(env["GRPO_HOME"]))
        wait_for(lambda: has_checkpoint(store, store.job(job_id)), 90, "the first checkpoint")
        os.killpg(job_pid, signal.SIGKILL)
        wait_for(lambda: job(env, job_id)["state"] != "running", 30, "the worker to record the end")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    info = job(env, job_id)
    assert (info["state"], info["reason"]) == (
        "interrupted",
        f"its training process was killed by SIGKILL at step {info['step']}; continue it with grpo resume "
        f"{job_id}",
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


def refused(env: dict[str, str], *args: str) -> str:
    out = grpo(env, *args, ok=False)
    assert (out.returncode, out.stdout) == (2, ""), args
    return out.stderr


def test_an_emptied_database_is_refused_then_rebuilt_from_the_job_folders(env, saved):
    home = Path(env["GRPO_HOME"])
    db = home / "grpo.db"
    assert grpo(env, "queue", "tiny", "max_steps=2").stdout == "1\n"
    assert grpo(env, "queue", "tiny").stdout == "2\n"
    grpo(env, "stop", "2")
    run_queue(env)
    done = job(env, "1")
    assert done["state"] == "completed"
    job_yaml = (home / "jobs" / "1" / "job.yaml").read_text()
    db.write_bytes(b"")  # emptied: SQLite would open it as a new, empty database
    message = (
        f"error: The job database {db} does not list 2 job folder(s) (jobs/1, jobs/2) and 1 saved template(s) "
        f"(tiny) found in {home} (it was emptied, replaced or lost writes); run grpo recover to rebuild it "
        "from them.\n"
    )
    for args in (["jobs"], ["jobs", "1"], ["queue", "tiny"], ["template", "list"], ["worker", "--once"]):
        assert refused(env, *args) == message, args
    assert sorted(p.name for p in (home / "jobs").iterdir()) == ["1", "2"]
    assert (home / "jobs" / "1" / "job.yaml").read_text() == job_yaml
    assert grpo(env, "recover").stdout == (
        f"template tiny: restored from {home / 'templates' / 'tiny.yaml'}\n"
        "job 1: restored as completed\n"
        "job 2: restored as stopped (cancelled before it started)\n"
    )
    assert job(env, "1") == done
    assert grpo(env, "queue", "tiny").stdout == "3\n"
    assert grpo(env, "recover").stdout == (
        f"nothing to recover: the database lists every job folder and template in {home}\n"
    )

    db.write_bytes(b"this is not a database" * 100)  # overwritten
    for args in (["jobs"], ["queue", "tiny"]):
        assert refused(env, *args) == (
            f"error: The job database {db} cannot be read (file is not a database); run grpo recover to set it "
            f"aside and rebuild it from {home / 'jobs'} and {home / 'templates'}.\n"
        )
    lines = grpo(env, "recover").stdout.splitlines()
    assert lines[0].startswith(f"moved the unreadable database to {db}.unreadable-")
    assert Path(lines[0].split(" to ")[1]).read_bytes() == b"this is not a database" * 100
    assert lines[1:] == [
        f"template tiny: restored from {home / 'templates' / 'tiny.yaml'}",
        "job 1: restored as completed",
        "job 2: restored as stopped (cancelled before it started)",
        "job 3: restored as queued",
    ]
    assert [j["state"] for j in json.loads(grpo(env, "jobs", "--json").stdout)] == [
        "completed",
        "stopped",
        "queued",
    ]


def test_folders_from_an_older_workspace_are_restored_from_their_logs(env, saved):
    """Job folders without job.json (made before the rows were copied there): their state comes from their log."""
    home = Path(env["GRPO_HOME"])
    assert grpo(env, "queue", "tiny", "max_steps=2").stdout == "1\n"
    assert grpo(env, "queue", "tiny", "max_steps=2").stdout == "2\n"
    grpo(env, "stop", "2")
    run_queue(env)
    # job 2 as a run that died while loading its model: a log with no step in it
    (home / "jobs" / "2" / "train.log").write_text(
        "--- job 2: started by grpo worker 1 at 2025-01-01 ---\nLoading\n"
    )
    for i in (1, 2):
        (home / "jobs" / str(i) / "job.json").unlink()
    (home / "grpo.db").unlink()
    assert "run grpo recover" in refused(env, "jobs")
    assert grpo(env, "recover").stdout.splitlines()[1:] == [
        "job 1: restored as completed (its record was lost; the run had finished)",
        "job 2: restored as interrupted (its record was lost at step 0; no checkpoint to resume from; queue it "
        "again with grpo queue tiny)",
    ]
    info = job(env, "1")
    assert (info["state"], info["template"], info["step"], info["max_steps"]) == ("completed", "tiny", 2, 2)
    out = grpo(env, "resume", "2", ok=False)
    assert out.stderr == (
        "error: Job 2 has no checkpoint to resume from (it ran with save_steps: 0); queue it again with grpo "
        "queue tiny.\n"
    )


def test_a_new_job_never_takes_an_existing_folder(env, saved):
    """Even where the database does not know a folder (a workspace opened without its check, as grpo recover
    does), the new job's id passes it by and the old folder is left untouched."""
    home = Path(env["GRPO_HOME"])
    stray = home / "jobs" / "1"
    stray.mkdir(parents=True)
    (stray / "job.yaml").write_text("kept: true\n")
    store = Store(home, check=False)
    try:
        resolved = store.template("tiny")
        new = store.add_job(template="tiny", overrides=[], resolved=resolved, max_steps=2, nproc=1)
    finally:
        store.close()
    assert new.id == 2
    assert (stray / "job.yaml").read_text() == "kept: true\n"
    assert yaml.safe_load((home / "jobs" / "2" / "job.yaml").read_text())["config"]["output_dir"] == str(
        home / "jobs" / "2" / "output"
    )
