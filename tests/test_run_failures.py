"""Bad inputs and damaged files of a training run: each is one line naming the file or field, with no
traceback, and nothing already saved is lost or logged twice."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from grpo.config import ConfigError, template_from_dict
from grpo.errors import StorageError
from grpo.model.loading import embedded_gguf_path, load_tokenizer
from grpo.run.run_dir import naming_full_disk
from tests.conftest import REPO, tiny_template, write_template
from tests.test_checkpoint import rows, train, weights


def last_line(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def template(tiny_model_dir, tmp_path):
    data = tiny_template(
        tiny_model_dir, tmp_path / "unused", max_steps=4, rewards=["tests.user_rewards:length"]
    )
    return write_template(tmp_path / "t.yaml", data)


def test_an_empty_template_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    result = train(empty)
    assert result.returncode == 2
    assert last_line(result) == (
        f"error: Template file '{empty}' is empty: write the fields to set (configs/default.yaml shows them), "
        "or name: NAME to train on every default."
    )


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_model_loads(template, tmp_path):
    result = train(template, "output_dir=/proc/grpo-run")
    assert result.returncode == 2
    assert last_line(result) == (
        "error: config.output_dir = '/proc/grpo-run' cannot be written (No such file or directory); choose a "
        "folder you can write to."
    )
    assert "Loading weights" not in result.stderr


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_dir_that_is_a_file_is_refused(tiny_model_dir, tmp_path, inside):
    from grpo.trainer import GRPOTrainer

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run" if inside else tmp_path / "file"
    t = template_from_dict(tiny_template(tiny_model_dir, out))
    with pytest.raises(ConfigError) as e:
        GRPOTrainer(t)
    assert str(e.value) == (
        f"config.output_dir = '{out}': {tmp_path / 'file'} is a file, not a folder; choose another output_dir."
    )


def test_an_incomplete_model_folder_names_what_is_missing(tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    messages = []
    for add in ("config.json", "model.safetensors", None):
        with pytest.raises(ConfigError) as e:
            load_tokenizer(str(folder))
        messages.append(str(e.value))
        if add:
            shutil.copy(tiny_model_dir / add, folder / add)
    assert messages == [
        f"model = '{folder}' is a folder without config.json: point it at a Hugging Face model folder (config.json, "
        "weights, tokenizer), a .gguf file, or a hub id.",
        f"model = '{folder}' has config.json but no weights (*.safetensors or pytorch_model.bin): the folder is "
        "incomplete; copy or download the weights into it.",
        f"model = '{folder}' has no tokenizer (tokenizer.json or tokenizer_config.json): save the tokenizer into "
        "the folder with the model.",
    ]


def test_a_truncated_gguf_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        cut.write_bytes(f.read(30_000_000))
    with pytest.raises(ConfigError) as e:
        load_tokenizer(str(cut))
    assert str(e.value).startswith(f"model = '{cut}' is not a complete GGUF file (")
    assert str(e.value).endswith("); it may be truncated: download it again.")


@pytest.mark.parametrize("case", ["empty model folder", "truncated gguf", "output_dir a file"])
def test_cli_refuses_a_broken_model_or_output_dir_in_one_line(template, tmp_path, case):
    """The same refusals as above, as a user meets them: scripts/train.py exits 2 with one line, no traceback,
    before any weights load."""
    broken = tmp_path / ("cut.gguf" if case == "truncated gguf" else case.replace(" ", "-"))
    if case == "empty model folder":
        broken.mkdir()
        override = f"model={broken}"
        expected = f"model = '{broken}' is a folder without config.json: point it at a Hugging Face model"
    elif case == "truncated gguf":
        with open(embedded_gguf_path(), "rb") as f:
            broken.write_bytes(f.read(30_000_000))
        override = f"model={broken}"
        expected = f"model = '{broken}' is not a complete GGUF file ("
    else:
        broken.write_text("x")
        override = f"output_dir={broken}"
        expected = (
            f"config.output_dir = '{broken}': {broken} is a file, not a folder; choose another output_dir."
        )
    result = train(template, override, env_extra={"GRPO_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2
    assert last_line(result).startswith(f"error: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Loading weights" not in result.stderr


def test_a_user_loss_with_the_wrong_signature_is_refused_before_the_model_loads(template):
    result = train(template, "loss_type=tests.user_losses:wrong_signature")
    assert result.returncode == 2
    assert last_line(result) == (
        "error: config.loss_type = 'tests.user_losses:wrong_signature' cannot be called as a loss (too many "
        "positional arguments): it must take (logps, old_logps, ref_logps, advantages, mask, **kwargs) "
        "(docs/losses.md)."
    )
    assert "Loading weights" not in result.stderr


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(template, tmp_path):
    full, out = tmp_path / "full", tmp_path / "run"
    assert train(template, f"output_dir={full}").returncode == 0
    killed = train(
        template, f"output_dir={out}", "save_steps=1", env_extra={"GRPO_TEST_KILL_AT": "after_commit_step2"}
    )
    assert killed.returncode == -signal.SIGKILL
    newest = out / "checkpoints" / "step-000002"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])

    named = train(template, f"output_dir={out}", f"resume={newest}")
    assert named.returncode == 2
    assert last_line(named).startswith(
        f"error: config.resume_from_checkpoint = '{newest}': optimizer.pt does not load: "
    )
    result = train(template, f"output_dir={out}", "save_steps=1", "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(
        line.startswith("warning: skipped checkpoint step-000002: optimizer.pt does not load: ")
        for line in lines
    )
    assert f"Resumed from {out / 'checkpoints' / 'step-000001'} at step 1" in lines
    assert rows(out) == rows(full) and weights(out) == weights(full)  # exact from the older checkpoint


def test_resume_without_a_checkpoint_starts_clean_and_sets_the_old_logs_aside(template, tmp_path):
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", str(template), f"output_dir={out}", "max_steps=50"],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    old = metrics.read_text()
    result = train(template, f"output_dir={out}", "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    moved = [
        line for line in result.stdout.splitlines() if line.startswith("Moved the logs of an earlier run")
    ]
    assert len(moved) == 1
    earlier = out / "earlier-runs"
    (kept,) = list(earlier.iterdir())
    assert moved[0] == f"Moved the logs of an earlier run in {out} to {kept}"
    assert (kept / "metrics.jsonl").read_text() == old
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]  # each step once
    assert (kept / "tensorboard").is_dir() and not (out / "checkpoints").exists()


def _tmpfs(path, size, *options):
    path.mkdir()
    flags = ",".join([f"size={size}", *options])
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", flags, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (needs root): {mounted.stderr.decode().strip()}")


def test_an_output_dir_on_a_read_only_mount_is_refused(tiny_model_dir, tmp_path):
    from grpo.trainer import GRPOTrainer

    disk = tmp_path / "ro"
    _tmpfs(disk, "1m", "ro")
    try:
        t = template_from_dict(tiny_template(tiny_model_dir, disk / "run"))
        with pytest.raises(ConfigError) as e:
            GRPOTrainer(t)
        assert str(e.value) == (
            f"config.output_dir = '{disk / 'run'}' cannot be written (Read-only file system); choose a folder you "
            "can write to."
        )
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_torch_save_on_a_full_disk_is_named_as_such(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "1m")
    try:
        with pytest.raises(StorageError) as e:
            with naming_full_disk("optimizer.pt", disk):
                torch.save(torch.zeros(1_000_000), disk / "optimizer.pt")
        assert str(e.value).startswith(f"Out of disk space while writing optimizer.pt in {disk} (")
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_disk_that_fills_during_a_checkpoint_stops_in_one_line_and_keeps_the_earlier_one(
    template, tmp_path
):
    disk = tmp_path / "disk"
    _tmpfs(disk, "40m")  # one checkpoint of the tiny model (~20 MB) fits, the second does not
    try:
        result = train(template, f"output_dir={disk / 'run'}", "save_steps=1")
        assert result.returncode == 1
        assert last_line(result).startswith(
            f"error: Out of disk space while writing checkpoint step-000002 in {disk / 'run'} ("
        )
        assert last_line(result).endswith(
            "MB free): earlier checkpoints are intact; free some space, then continue with resume=latest."
        )
        assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["step-000001"]
        state = json.loads((disk / "run" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
        assert state["step"] == 1
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_a_row_with_a_lone_surrogate_is_named_before_the_model_loads(tiny_model_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    # A JSON escape of half a surrogate pair decodes to a str that UTF-8 (and so the tokenizer) cannot hold.
    data.write_text(
        '{"question": "What is 1 + 1?", "answer": "2"}\n{"question": "What is \\ud800?", "answer": "3"}\n'
    )
    t = tiny_template(tiny_model_dir, tmp_path / "run")
    t["dataset"] = {"path": str(data)}
    result = train(write_template(tmp_path / "t.yaml", t))
    assert result.returncode == 2
    assert last_line(result) == (
        "error: Row 2 of the dataset gives template.input text that is not valid Unicode (surrogates not "
        "allowed, '\\ud800': a lone surrogate, as a broken \\u escape in JSON leaves); fix or drop that row."
    )
    assert "Loading weights" not in result.stderr


def test_weights_that_are_no_longer_finite_are_never_saved(tiny_model_dir, tmp_path):
    """skip_nonfinite_steps skips every step of a poisoned model; the run must still not end as a success."""
    from grpo.errors import NonFiniteError
    from grpo.trainer import GRPOTrainer

    out = tmp_path / "run"
    data = tiny_template(
        tiny_model_dir, out, max_steps=2, skip_nonfinite_steps=True, rewards=["tests.user_rewards:length"]
    )
    trainer = GRPOTrainer(template_from_dict(data))
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = float("inf")
    with pytest.raises(NonFiniteError) as e:
        trainer.train()
    assert str(e.value) == (
        f"The weights are no longer finite (model.norm.weight holds inf or NaN), so {out / 'model'} was not "
        "written; the last checkpoint stays. Lower learning_rate, or look at the run's last metrics."
    )
    assert not (out / "model").exists()
