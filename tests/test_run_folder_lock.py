"""One run per output_dir: a second run on a live run's folder is refused in one line naming the holder's pid,
before it touches anything; the lock goes with the process, however it ends; and a resume that would go back
past max_steps is refused instead of overwriting the model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, tiny_template, write_template
from tests.test_checkpoint import rows, train, weights


def last_line(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def template(tiny_model_dir, tmp_path):
    data = tiny_template(tiny_model_dir, tmp_path / "unused", rewards=["tests.user_rewards:length"])
    return write_template(tmp_path / "t.yaml", data)


def start_long_run(template, out):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "scripts/train.py", str(template), f"output_dir={out}", "max_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the first run did not start stepping"
        time.sleep(0.2)
    return proc


def test_a_second_run_on_a_live_runs_folder_is_refused_and_touches_nothing(template, tmp_path):
    out = tmp_path / "run"
    first = start_long_run(template, out)
    try:
        second = train(template, f"output_dir={out}", "max_steps=1")
        assert second.returncode == 2
        assert last_line(second) == (
            f"error: config.output_dir = '{out}' is in use by another run (pid {first.pid}); wait for it to end "
            "or stop it, or choose another output_dir."
        )
        assert "Loading weights" not in second.stderr
        assert not (out / "earlier-runs").exists()  # the live run's logs stayed where it writes them
        assert first.poll() is None
        steps = [row["step"] for row in rows(out)]
        assert steps == list(range(1, len(steps) + 1))  # one run's lines only
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    # The lock went with the killed process: the folder is free at once.
    third = train(template, f"output_dir={out}", "max_steps=1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert [row["step"] for row in rows(out)] == [1]


def test_two_trainers_in_one_process_share_its_lock(tiny_model_dir, tmp_path):
    from grpo.config import template_from_dict
    from grpo.trainer import GRPOTrainer

    data = tiny_template(tiny_model_dir, tmp_path / "run", max_steps=1, rewards=["tests.user_rewards:length"])
    first = GRPOTrainer(template_from_dict(data))
    first.train()
    GRPOTrainer(template_from_dict(data)).train()  # the same process: no refusal
    assert (tmp_path / "run" / ".run.lock").read_text() == f"{os.getpid()}\n"
    assert first.step == 1


def test_resuming_past_max_steps_is_refused_and_keeps_the_model(template, tmp_path):
    out = tmp_path / "run"
    assert train(template, f"output_dir={out}", "max_steps=4", "save_steps=2").returncode == 0
    model, metrics = weights(out), rows(out)
    result = train(template, f"output_dir={out}", "max_steps=2", "save_steps=2", "resume=latest")
    assert result.returncode == 2
    assert last_line(result) == (
        f"error: Cannot resume from {out / 'checkpoints' / 'step-000004'}: the run is at step 4, past "
        "max_steps = 2, and resuming would overwrite its model and drop the metrics of steps 3-4; raise "
        "max_steps above 4 or train into a new output_dir."
    )
    assert weights(out) == model and rows(out) == metrics and len(metrics) == 4
