"""The `grpo` command line end to end: real SQLite in a temp GRPO_HOME, real worker and training processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from grpo.jobs.store import Job
from grpo.jobs.tlab import tlab_to_template
from grpo.jobs.worker import gpus_free, job_gpus
from tests.conftest import REPO, tiny_template, write_template

CLI = [sys.executable, "-m", "grpo.jobs.cli"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "GRPO_HOME": str(tmp_path / "home"), "PYTHONPATH": path}


def grpo(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def job(env: dict[str, str], job_id: str) -> dict:
    return json.loads(grpo(env, "jobs", job_id, "--json").stdout)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def saved(env: dict[str, str], tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny template saved as 'tiny'; returns its YAML file."""
    path = write_template(tmp_path / "tiny.yaml", tiny_template(tiny_model_dir, tmp_path / "unused"))
    assert grpo(env, "template", "save", "tiny", str(path)).stdout.strip() == "saved template tiny"
    return path


def test_template_save_list_show_export_delete(env, saved, tmp_path):
    listed = json.loads(grpo(env, "template", "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["tiny"]
    shown = json.loads(grpo(env, "template", "show", "tiny", "--json").stdout)["template"]
    exported = yaml.safe_load(grpo(env, "template", "export", "tiny").stdout)
    assert exported == shown
    assert shown["config"]["max_steps"] == 2 and shown["name"] == "tiny"
    assert "tiny" in grpo(env, "template", "list").stdout
    # a bad template is refused with the trainer's message and nothing is stored
    bad = write_template(
        tmp_path / "bad.yaml", {**shown, "config": {**shown["config"], "num_generations": 1}}
    )
    out = grpo(env, "template", "save", "bad", str(bad), ok=False)
    assert out.returncode == 2
    assert out.stderr == (
        "error: config.num_generations = 1 is not allowed: "
        "GRPO needs at least 2 generations per prompt to compare them.\n"
    )
    assert [t["name"] for t in json.loads(grpo(env, "template", "list", "--json").stdout)] == ["tiny"]
    assert grpo(env, "template", "delete", "tiny").stdout.strip() == "deleted template tiny"
    assert json.loads(grpo(env, "template", "list", "--json").stdout) == []


def test_import_tlab_maps_fields_and_refuses_unknown(env, tmp_path, tiny_model_dir):
    tlab = {
        "name": "from-tlab",
        "type": "GRPO",
        "config": {
            "plugin_name": "grpo_trainer",
            "model_name": str(tiny_model_dir),
            "model_architecture": "LlamaForCausalLM",
            "dataset_name": "builtin:arithmetic",
            "instruction": "Think, then answer.",
            "input_template": "{{question}}",
            "output_template": "{{answer}}",
            "learning_rate": "0.0001",
            "max_steps": "3",
            "use_lora": "true",
            "gpu_ids": "auto",
            "start_thinking_string": "<think>",
        },
    }
    path = tmp_path / "tlab.json"
    path.write_text(json.dumps(tlab))
    assert grpo(env, "template", "import-tlab", str(path)).stdout.strip() == "saved template from-tlab"
    t = json.loads(grpo(env, "template", "show", "from-tlab", "--json").stdout)["template"]
    assert t["model"] == str(tiny_model_dir)
    assert t["dataset"] == {"path": "builtin:arithmetic"}
    assert t["template"] == {
        "instruction": "Think, then answer.",
        "input": "{{question}}",
        "output": "{{answer}}",
    }
    assert t["config"] == {
        "learning_rate": 0.0001,
        "max_steps": 3,
        "use_lora": True,
        "gpu_ids": "auto",
        "start_thinking_string": "<think>",
    }
    assert tlab_to_template({"gpu_ids": "0,1"})["config"]["gpu_ids"] == [0, 1]
    tlab["config"]["learning_rat"] = "1"
    path.write_text(json.dumps(tlab))
    out = grpo(env, "template", "import-tlab", str(path), ok=False)
    assert out.returncode == 2
    assert (
        out.stderr
        == f"error: {path}: unknown Transformer Lab field 'learning_rat' (did you mean 'learning_rate'?).\n"
    )


def tlab_file(path: Path, name: str, model: Path, **config: str) -> Path:
    data = {"model_name": str(model), "dataset_name": "builtin:arithmetic", "max_steps": "2", **config}
    path.write_text(json.dumps({"name": name, "config": data}))
    return path


def test_unsloth_plugin_configs_import_as_lora(env, tmp_path, tiny_model_dir):
    """Transformer Lab's Unsloth GRPO plugins always train LoRA; their configs have no use_lora to say so."""
    lora = {"lora_r": "8", "lora_alpha": "16", "lora_dropout": "0.05"}
    for plugin, name in [("unsloth_grpo_trainer", "one"), ("unsloth_grpo_trainer_multi_gpu", "multi")]:
        path = tlab_file(tmp_path / f"{name}.json", name, tiny_model_dir, plugin_name=plugin, **lora)
        assert grpo(env, "template", "import-tlab", str(path)).stdout == f"saved template {name}\n"
        t = json.loads(grpo(env, "template", "show", name, "--json").stdout)["template"]
        assert t["config"] == {
            "max_steps": 2,
            "lora_r": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "use_lora": True,
        }
    path = tlab_file(tmp_path / "plain.json", "plain", tiny_model_dir, plugin_name="grpo_trainer", **lora)
    grpo(env, "template", "import-tlab", str(path))
    assert (
        "use_lora"
        not in json.loads(grpo(env, "template", "show", "plain", "--json").stdout)["template"]["config"]
    )


def test_save_and_import_overwrite_a_template_only_with_replace(env, saved, tmp_path, tiny_model_dir):
    path = tlab_file(tmp_path / "tlab.json", "imported", tiny_model_dir)
    assert grpo(env, "template", "import-tlab", str(path)).stdout == "saved template imported\n"
    before = grpo(env, "template", "export", "imported").stdout
    tlab_file(path, "imported", tiny_model_dir, max_steps="3")
    exists = (
        "error: Template '{0}' already exists; add --replace to overwrite it (grpo template export {0} prints the "
        "current one).\n"
    )
    for args, name in [(["import-tlab", str(path)], "imported"), (["save", "tiny", str(saved)], "tiny")]:
        out = grpo(env, "template", *args, ok=False)
        assert (out.returncode, out.stdout, out.stderr) == (2, "", exists.format(name)), args
    assert grpo(env, "template", "export", "imported").stdout == before
    assert (
        grpo(env, "template", "import-tlab", str(path), "--replace").stdout == "replaced template imported\n"
    )
    assert yaml.safe_load(grpo(env, "template", "export", "imported").stdout)["config"]["max_steps"] == 3
    assert grpo(env, "template", "save", "tiny", str(saved), "--replace").stdout == "replaced template tiny\n"


def test_worker_runs_jobs_in_order_and_survives_a_failing_one(env, saved):
    bad = grpo(env, "queue", "tiny", "rewards=[tests.bad_rewards:explode]").stdout.strip()
    good = grpo(env, "queue", "tiny", "max_steps=2").stdout.strip()
    assert (bad, good) == ("1", "2")
    assert job(env, good)["state"] == "queued"
    out = subprocess.run(
        [*CLI, "worker", "--once", "--poll", "0.2"], env=env, capture_output=True, text=True, timeout=150
    )
    assert out.returncode == 0, out.stderr
    failed, done = job(env, bad), job(env, good)
    assert failed["state"] == "failed"
    assert "boom: this reward always fails" in failed["reason"]
    assert "ValueError: boom: this reward always fails" in grpo(env, "logs", bad).stdout
    assert done["state"] == "completed" and done["reason"] is None
    assert (done["step"], done["max_steps"]) == (2, 2)
    assert isinstance(done["reward"], float)
    assert failed["ended"] <= done["started"] <= done["ended"]
    model = Path(done["model"])
    assert model.parent.parent == Path(done["folder"]) and (model / "config.json").is_file()
    assert (Path(done["folder"]) / "job.yaml").is_file()
    table = grpo(env, "jobs").stdout
    assert "completed  2/2" in table and "failed" in table
    assert (
        grpo(env, "tensorboard", good).stdout.strip()
        == f"tensorboard --logdir {done['folder']}/output/tensorboard"
    )


def test_twenty_concurrent_queue_calls_make_twenty_jobs(env, saved):
    procs = [
        subprocess.Popen([*CLI, "queue", "tiny", f"seed={i}"], env=env, stdout=subprocess.PIPE, text=True)
        for i in range(20)
    ]
    ids = []
    for p in procs:
        stdout, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        ids.append(int(stdout.strip()))
    assert sorted(ids) == list(range(1, 21))
    listed = json.loads(grpo(env, "jobs", "--json").stdout)
    assert sorted(j["id"] for j in listed) == sorted(ids) and {j["state"] for j in listed} == {"queued"}
    seeds = {yaml.safe_load((Path(j["folder"]) / "job.yaml").read_text())["config"]["seed"] for j in listed}
    assert seeds == set(range(20))


def _running_job_pid(env: dict[str, str], job_id: str) -> int:
    from grpo.jobs.store import Store

    store = Store(Path(env["GRPO_HOME"]))
    try:
        j = store.job(job_id)
        return j.job_pid if j.state == "running" and j.job_pid else 0
    finally:
        store.close()


def test_stop_running_job_keeps_its_model_and_cancels_queued(env, saved):
    long_job = grpo(env, "queue", "tiny", "max_steps=1000").stdout.strip()
    waiting = grpo(env, "queue", "tiny").stdout.strip()
    worker = subprocess.Popen(
        [*CLI, "worker", "--once", "--poll", "0.2"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: job(env, long_job)["step"] >= 1, 90, "the first step")
        assert (
            grpo(env, "stop", waiting).stdout.strip()
            == f"job {waiting}: cancelled (stopped before it started)"
        )
        out = grpo(env, "stop", long_job).stdout.strip()
        assert out == f"job {long_job}: stopping at the next step boundary"
        worker.communicate(timeout=90)
        assert worker.returncode == 0
    finally:
        worker.kill()
    stopped = job(env, long_job)
    assert stopped["state"] == "stopped" and stopped["reason"] == "stopped by grpo stop"
    assert 1 <= stopped["step"] < 1000
    assert (Path(stopped["model"]) / "config.json").is_file()
    cancelled = job(env, waiting)
    assert cancelled["state"] == "stopped" and cancelled["started"] is None
    assert not (Path(cancelled["folder"]) / "train.log").exists()
    out = grpo(env, "stop", long_job, ok=False)
    assert (
        out.stderr
        == f"error: Job {long_job} is already stopped; only queued or running jobs can be stopped.\n"
    )


def test_every_invalid_input_is_one_clear_line(env, saved, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nconfig: [unclosed\n")
    cases = [
        (["queue", "nope"], "error: Unknown template 'nope'; see grpo template list."),
        (["queue", "tinu"], "error: Unknown template 'tinu' (did you mean 'tiny'?); see grpo template list."),
        (["template", "show", "nope"], "error: Unknown template 'nope'; see grpo template list."),
        (
            ["queue", "tiny", "max_steps"],
            "error: Override 'max_steps' must look like key=value (for example max_steps=2).",
        ),
        (
            ["queue", "tiny", "max_stepz=2"],
            "error: Unknown field 'max_stepz' in override 'max_stepz=2' (did you mean 'config.max_steps'?).",
        ),
        (
            ["queue", "tiny", "max_steps=two"],
            "error: config.max_steps = 'two' is not allowed: expected an integer.",
        ),
        (
            ["queue", "tiny", "output_dir=elsewhere"],
            "error: Override 'output_dir=elsewhere' is not allowed: the queue puts output_dir in the job's folder.",
        ),
        (
            ["template", "save", "x", str(broken)],
            f"error: Template file '{broken}' is not valid YAML at line 3: "
            "expected ',' or ']', but got '<stream end>'.",
        ),
        (
            ["template", "save", "x", str(tmp_path / "missing.yaml")],
            f"error: Template file '{tmp_path / 'missing.yaml'}' does not exist.",
        ),
        (
            ["template", "save", "bad name", str(saved)],
            "error: Template name 'bad name' is not allowed: use letters, digits, '.', '_' and '-'.",
        ),
        (["logs", "42"], "error: Unknown job '42'; see grpo jobs."),
        (["stop", "abc"], "error: Job id 'abc' is not allowed: use the number grpo queue printed."),
        (["jobs", "7", "--json"], "error: Unknown job '7'; see grpo jobs."),
        (["worker", "--poll", "0"], "error: --poll 0.0 is not allowed: use a positive number of seconds."),
        (["worker", "--parallel", "0"], "error: --parallel 0 is not allowed: use 1 or more jobs at once."),
        (
            ["frobnicate"],
            "error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'template', "
            "'queue', 'resume', 'jobs', 'logs', 'stop', 'worker', 'tensorboard', 'recover', 'vllm-serve') (see grpo --help).",
        ),
    ]
    for args, message in cases:
        out = grpo(env, *args, ok=False)
        assert out.returncode == 2, args
        assert out.stderr == message + "\n", args
        assert out.stdout == "", args
    assert json.loads(grpo(env, "jobs", "--json").stdout) == []


def run_queue(env: dict[str, str]) -> None:
    out = subprocess.run(
        [*CLI, "worker", "--once", "--poll", "0.2"], env=env, capture_output=True, text=True, timeout=150
    )
    assert out.returncode == 0, out.stderr


def test_resume_continues_a_job_from_its_newest_checkpoint(env, saved):
    first = ["max_steps=2", "save_steps=1", "save_total_limit=1", "rewards=[tests.user_rewards:length]"]
    assert grpo(env, "queue", "tiny", *first).stdout == "1\n"  # rewards that differ: every step trains
    assert grpo(env, "queue", "tiny", "max_steps=1").stdout == "2\n"  # saves no checkpoint
    assert grpo(env, "queue", "tiny").stdout == "3\n"
    ckpt = Path(job(env, "1")["folder"]) / "output" / "checkpoints" / "step-000002"
    cases = [
        (
            ["resume", "3"],
            "Job 3 is queued; only interrupted, failed, stopped or completed jobs can be resumed.",
        ),
        (["resume", "9"], "Unknown job '9'; see grpo jobs."),
    ]
    for args, message in cases:
        out = grpo(env, *args, ok=False)
        assert (out.returncode, out.stderr, out.stdout) == (2, f"error: {message}\n", ""), args
    grpo(env, "stop", "3")
    run_queue(env)
    assert [job(env, i)["state"] for i in "12"] == ["completed", "completed"]
    cases = [
        (
            ["resume", "1"],
            "Job 1 is at step 2 (its newest checkpoint) and max_steps is 2; raise it, e.g. "
            "grpo resume 1 max_steps=4.",
        ),
        (
            ["resume", "1", "max_steps=3", "learning_rate=0.5"],
            f"Cannot resume from {ckpt}: the template differs in fields that change the run "
            "(config.learning_rate); set force_resume=true to resume anyway.",
        ),
        (
            ["resume", "1", "output_dir=x"],
            "Override 'output_dir=x' is not allowed: the queue puts output_dir in the job's folder.",
        ),
        (
            ["resume", "2", "max_steps=3"],
            "Job 2 has no checkpoint to resume from (it ran with save_steps: 0); queue it again with grpo "
            "queue tiny.",
        ),
    ]
    for args, message in cases:
        out = grpo(env, *args, ok=False)
        assert (out.returncode, out.stderr, out.stdout) == (2, f"error: {message}\n", ""), args
    assert job(env, "1")["state"] == "completed"  # a refused resume leaves the job as it was
    before = (ckpt.parent.parent / "model" / "model.safetensors").read_bytes()
    assert grpo(env, "resume", "1", "max_steps=3").stdout == "job 1: queued to resume from step-000002\n"
    info = job(env, "1")
    assert (info["state"], info["max_steps"], info["ended"], info["overrides"]) == (
        "queued",
        3,
        None,
        [*first, "max_steps=3"],
    )
    run_queue(env)
    info = job(env, "1")
    assert (info["state"], info["step"], info["max_steps"]) == ("completed", 3, 3)
    metrics = Path(info["folder"]) / "output" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    log = grpo(env, "logs", "1").stdout
    assert f"Resumed from {ckpt} at step 2" in log and log.count("Finished at step") == 2
    assert (Path(info["model"]) / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-000003"]


def test_parallel_worker_runs_jobs_side_by_side(env, saved):
    ids = [grpo(env, "queue", "tiny", "max_steps=6").stdout.strip() for _ in range(3)]
    out = subprocess.run(
        [*CLI, "worker", "--once", "--poll", "0.2", "--parallel", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    first, second, third = (job(env, i) for i in ids)
    assert [j["state"] for j in (first, second, third)] == ["completed"] * 3
    assert second["started"] < first["ended"] and first["started"] < second["ended"]  # they overlapped
    assert third["started"] >= min(first["ended"], second["ended"])  # two slots: the third waited for one


def make_job(config: dict) -> Job:
    return Job(
        id=1,
        template="t",
        overrides=[],
        resolved=yaml.safe_dump({"config": config}),
        cwd=".",
        max_steps=None,
        nproc=1,
        state="queued",
        reason=None,
        stop_requested=False,
        queued_at=0.0,
        started_at=None,
        ended_at=None,
        worker_pid=None,
        job_pid=None,
        exit_code=None,
    )


def test_which_gpus_a_job_holds_and_when_it_may_start():
    assert job_gpus(make_job({"gpu_ids": [0, 2]}), True) == frozenset({0, 2})
    assert job_gpus(make_job({"gpu_ids": "auto"}), True) is None  # every GPU
    assert job_gpus(make_job({}), True) is None
    assert job_gpus(make_job({"gpu_ids": [1], "train_device": "cpu"}), True) == frozenset()
    assert job_gpus(make_job({"gpu_ids": [1]}), False) == frozenset()  # no GPU on this machine
    cpu, every = frozenset(), None
    assert gpus_free(frozenset({0}), []) and gpus_free(frozenset({0}), [frozenset({1}), cpu])
    assert not gpus_free(frozenset({0, 1}), [frozenset({1})])
    assert not gpus_free(every, [frozenset({2})]) and not gpus_free(frozenset({0}), [every])
    assert gpus_free(every, [cpu]) and gpus_free(cpu, [every, frozenset({0})])
