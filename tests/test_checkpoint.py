"""Checkpoints and exact resume: killed runs continue as if nothing happened."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, VOLATILE, tiny_template, write_template


def train(path, *overrides, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "scripts/train.py", str(path), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def rows(out):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def weights(out):
    return (out / "model" / "model.safetensors").read_bytes()


@pytest.fixture
def template(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir, tmp_path / "unused", max_steps=6, rewards=["tests.user_rewards:length"]
    )
    return write_template(tmp_path / "t.yaml", data)


# the random model's entropy is ~10.8 nats, below a target of 20: the adaptive coefficient rises every update,
# so a resume that restarted it from entropy_coef would log and train differently
ADAPTIVE_ENTROPY = ["use_adaptive_entropy=true", "entropy_target=20", "entropy_coef_delta=0.05"]


@pytest.mark.parametrize("extra", [[], ADAPTIVE_ENTROPY], ids=["plain", "adaptive_entropy"])
def test_killed_run_resumes_bitwise(template, tmp_path, extra):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train(template, f"output_dir={full}", *extra).returncode == 0
    result = train(
        template,
        f"output_dir={killed}",
        "save_steps=3",
        *extra,
        env_extra={"GRPO_TEST_KILL_AT": "after_commit_step3"},
    )
    assert result.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "step-000003" / "trainer_state.json").is_file()
    assert not (killed / "model").exists()
    result = train(template, f"output_dir={killed}", "save_steps=3", "resume=latest", *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout
    assert rows(killed) == rows(full)  # steps 1-3 from the first attempt, 4-6 from the resumed one
    if extra:
        assert rows(full)[-1]["entropy_coef"] == pytest.approx(0.05 * 5)  # 6 updates, the last used the 5th
    assert weights(killed) == weights(full)


def test_kill_during_a_save_keeps_the_previous_checkpoint(template, tmp_path):
    out = tmp_path / "run"
    result = train(
        template,
        f"output_dir={out}",
        "save_steps=2",
        env_extra={"GRPO_TEST_KILL_AT": "after_optimizer_step4"},
    )
    assert result.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004.tmp"]
    result = train(template, f"output_dir={out}", "save_steps=2", "resume=latest", "save_total_limit=1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout and "step-000002" in result.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006"]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_template(template, tmp_path):
    out = tmp_path / "run"
    assert train(template, f"output_dir={out}", "save_steps=2", "max_steps=2").returncode == 0
    result = train(template, f"output_dir={out}", "resume=latest", "num_generations=4", "beta=0.1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Cannot resume from {out / 'checkpoints' / 'step-000002'}: the template differs in fields that "
        f"change the run (config.beta, config.num_generations); set force_resume=true to resume anyway."
    )
    result = train(template, f"output_dir={out}", "resume=/no/such/dir")
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.resume_from_checkpoint = '/no/such/dir' is not a checkpoint folder (no trainer_state.json); "
        "use latest or a checkpoints/step-N folder."
    )


def test_non_finite_loss_stops_or_skips(template, tmp_path):
    out = tmp_path / "nan"
    result = train(
        template, f"output_dir={out}", "loss_type=tests.user_losses:nan_on_second_step", "save_steps=1"
    )
    assert result.returncode == 1
    assert "error: Non-finite loss at step 2" in result.stderr and "Traceback" not in result.stderr
    assert (out / "checkpoints" / "step-000001").is_dir()  # the last good checkpoint is kept
    out = tmp_path / "skip"
    result = train(
        template,
        f"output_dir={out}",
        "loss_type=tests.user_losses:nan_on_second_step",
        "skip_nonfinite_steps=true",
        "max_steps=3",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    logged = rows(out)
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1]


def test_lora_checkpoints_hold_only_the_adapter_and_resume_bitwise(template, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    lora = ["use_lora=true", "max_steps=4", "learning_rate=0.01"]
    assert train(template, f"output_dir={full}", *lora).returncode == 0
    result = train(
        template,
        f"output_dir={killed}",
        "save_steps=2",
        *lora,
        env_extra={"GRPO_TEST_KILL_AT": "after_commit_step2"},
    )
    assert result.returncode == -signal.SIGKILL
    saved = killed / "checkpoints" / "step-000002" / "model"
    assert sorted(p.name for p in saved.iterdir() if p.suffix in (".json", ".safetensors"))[:2] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not (saved / "model.safetensors").exists()
    assert train(template, f"output_dir={killed}", "save_steps=2", "resume=latest", *lora).returncode == 0
    assert rows(killed) == rows(full)
    adapter = "adapter_model.safetensors"
    assert (killed / "model" / adapter).read_bytes() == (full / "model" / adapter).read_bytes()


def torchrun(path, *overrides, nproc=2, env_extra=None):
    from tests.test_distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    head = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(free_port()),
    ]
    return subprocess.run(
        [*head, "scripts/train.py", str(path), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_run_killed_and_resumed_bitwise(template, tmp_path, strategy):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ["max_steps=4", "batch_size=1", f"distributed_strategy={strategy}"]
    assert torchrun(template, f"output_dir={full}", *common).returncode == 0
    result = torchrun(
        template,
        f"output_dir={killed}",
        "save_steps=2",
        *common,
        env_extra={"GRPO_TEST_KILL_AT": "after_commit_step2"},
    )
    assert result.returncode != 0
    ckpt = killed / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    result = torchrun(template, f"output_dir={killed}", "save_steps=2", "resume=latest", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    assert rows(killed) == rows(full)
    assert weights(killed) == weights(full)


def test_a_damaged_file_of_one_rank_takes_every_rank_to_the_previous_checkpoint(template, tmp_path):
    """rng-rank1.pt is read by rank 1 only: were the fallback decided per rank, rank 0 would continue from step
    4 and rank 1 from step 2, and their collectives would no longer pair up."""
    full, damaged = tmp_path / "full", tmp_path / "damaged"
    common = ["max_steps=4", "batch_size=1", "save_steps=2"]
    assert torchrun(template, f"output_dir={full}", *common).returncode == 0
    assert torchrun(template, f"output_dir={damaged}", *common).returncode == 0
    newest = damaged / "checkpoints" / "step-000004"
    (newest / "rng-rank1.pt").write_bytes(b"not a torch file")
    result = torchrun(template, f"output_dir={damaged}", "resume=latest", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    notes = [line for line in lines if line.startswith("warning: skipped checkpoint")]
    assert len(notes) == 1  # one run log, from rank 0, which read its own files without trouble
    assert notes[0].startswith("warning: skipped checkpoint step-000004: rng-rank1.pt does not load: ")
    assert f"Resumed from {damaged / 'checkpoints' / 'step-000002'} at step 2" in lines
    assert [r["step"] for r in rows(damaged)] == [1, 2, 3, 4]  # steps 3 and 4 again, each logged once
    assert rows(damaged) == rows(full)
    assert weights(damaged) == weights(full)


def test_resume_with_a_different_number_of_processes(template, tmp_path):
    out = tmp_path / "run"
    common = ["batch_size=1", "save_steps=2"]
    assert torchrun(template, f"output_dir={out}", "max_steps=2", *common).returncode == 0
    result = train(
        template, f"output_dir={out}", "max_steps=4", "batch_size=2", "save_steps=2", "resume=latest"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


def test_a_field_missing_from_an_older_checkpoint_counts_with_its_default(tmp_path):
    from dataclasses import asdict

    from grpo.config import template_from_dict
    from grpo.run.resume_checks import math_differences

    current = template_from_dict(tiny_template(tmp_path, tmp_path / "out"))
    saved = asdict(current)
    del saved["config"]["top_entropy_quantile"], saved["config"]["dynamic_sampling"]  # not written back then
    assert math_differences(saved, current) == []
    changed = template_from_dict(tiny_template(tmp_path, tmp_path / "out", top_entropy_quantile=0.2))
    assert math_differences(saved, changed) == ["config.top_entropy_quantile"]


def test_ctrl_c_finishes_the_step_and_saves(template, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", str(template), f"output_dir={out}", "max_steps=100000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Ctrl-C: stopping after this step and saving the model; press Ctrl-C again to abort." in stderr
    steps = [r["step"] for r in rows(out)]
    assert 2 <= len(steps) < 100000 and steps == list(range(1, len(steps) + 1))
    assert f"Stopped at step {steps[-1]}; model saved to {out / 'model'}" in stdout
    assert (out / "model" / "model.safetensors").is_file()


def test_a_second_ctrl_c_aborts(tiny_model_dir, tmp_path):
    from grpo.config import template_from_dict
    from grpo.trainer import GRPOTrainer

    trainer = GRPOTrainer(template_from_dict(tiny_template(tiny_model_dir, tmp_path / "run")))
    trainer._interrupt(signal.SIGINT, None)
    assert trainer.stop_requested
    with pytest.raises(KeyboardInterrupt):
        trainer._interrupt(signal.SIGINT, None)
