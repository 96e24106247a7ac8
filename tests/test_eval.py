"""Evaluation: greedy / sampled answers on held-out prompts, scored with the template's own rewards."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from grpo import rewards as rw
from grpo.config import ConfigError, template_from_dict
from grpo.eval.evaluate import evaluate, load_eval_prompts
from grpo.model.loading import load_model, stop_token_ids
from grpo.rollout.decoding.torch_sampler import TorchSampler
from grpo.rollout.generate import SamplingSettings
from grpo.trainer import GRPOTrainer
from tests.conftest import REPO, tiny_template, write_template

RECORD_KEYS = {
    "index",
    "sample",
    "prompt",
    "completion",
    "reference",
    "correct",
    "strict_format",
    "soft_format",
    "length",
    "rewards",
}
DEFAULT_REWARDS = ["correctness", "int_answer", "strict_format", "soft_format", "tag_count"]


def correctness(completions, references, **kwargs):
    """A user correctness function (loaded as tests.test_eval:correctness) that calls everything right."""
    return [2.0 for _ in completions]


@pytest.fixture(scope="module")
def setup(tokenizer, tiny_model_dir, tmp_path_factory):
    t = template_from_dict(tiny_template(tiny_model_dir, tmp_path_factory.mktemp("eval") / "out"))
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    return t, model, load_eval_prompts(t, tokenizer, limit=6)


def answer(model, tokenizer, prompts, rewards, *, max_new_tokens=8, **kw):
    """evaluate() with our decoder on `model`, its end tokens, and the filters' defaults."""
    sampler = TorchSampler(model, pad_id=tokenizer.pad_token_id)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, end_ids=tuple(stop_token_ids(model, tokenizer))
    )
    return evaluate(sampler, tokenizer, prompts, rewards, rw.Tags(), settings, **kw)


def run(setup, tokenizer, rewards=DEFAULT_REWARDS, **kw):
    _, model, prompts = setup
    prompts = kw.pop("prompts", prompts)
    args = {"max_new_tokens": 8, "batch_size": 4, "response_prefix": "", "progress": False, **kw}
    return answer(model, tokenizer, prompts, rw.resolve_rewards(rewards), **args)


def test_greedy_records_rates_and_determinism(setup, tokenizer):
    t, model, prompts = setup
    result = run(setup, tokenizer)
    assert result.num_prompts == 6 and len(result.records) == 6 and result.pass_at_k is None
    assert [r["index"] for r in result.records] == list(range(6))
    assert set(result.records[0]) == RECORD_KEYS
    assert set(result.records[0]["rewards"]) == set(DEFAULT_REWARDS)
    assert [r["reference"] for r in result.records] == [p.reference for p in prompts]
    for rate in (result.accuracy, result.strict_format, result.soft_format, result.truncated):
        assert 0.0 <= rate <= 1.0
    assert 1 <= result.completion_length <= 8
    assert result.completion_length == pytest.approx(sum(r["length"] for r in result.records) / 6)
    assert result.records == run(setup, tokenizer).records  # greedy: the same answers every time
    # Greedy is the argmax path: the first prompt alone gives transformers' own greedy decode.
    ids = torch.tensor([prompts[0].ids])
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.records[0]["completion"] == expected


def test_accuracy_and_format_rates_are_computed_from_the_completions(setup, tokenizer):
    """A prefilled, fully formatted answer '5': only problems whose reference is 5 count as correct."""
    prefix = "<reasoning>\nx\n</reasoning>\n<answer>\n5\n</answer>\n"
    prompts = load_eval_prompts(setup[0], tokenizer, limit=40)
    expected = sum(p.reference == "5" for p in prompts) / len(prompts)
    assert 0 < expected < 1
    result = run(setup, tokenizer, prompts=prompts, response_prefix=prefix, batch_size=40)
    assert result.accuracy == pytest.approx(expected)
    assert result.soft_format == 1.0
    assert all(r["completion"].startswith(prefix) for r in result.records)
    assert [r["correct"] for r in result.records] == [p.reference == "5" for p in prompts]


def test_template_correctness_function_decides_accuracy(setup, tokenizer):
    builtin = run(setup, tokenizer, rewards=["correctness", "soft_format"])
    user = run(setup, tokenizer, rewards=["tests.test_eval:correctness", "soft_format"])
    assert builtin.accuracy == 0.0  # a random tiny model never writes the right answer in tags
    assert user.accuracy == 1.0
    assert user.reward_means["tests.test_eval:correctness"] == 2.0


def test_pass_at_k_from_samples(setup, tokenizer):
    _, model, prompts = setup
    parity = rw.Reward("mine:correctness", lambda c, r, **k: [2.0 * (len(x) % 2) for x in c])
    result = answer(
        model,
        tokenizer,
        prompts,
        [parity],
        samples=2,
        max_new_tokens=8,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    recs = result.records
    assert len(recs) == 12 and [(r["index"], r["sample"]) for r in recs[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert any(recs[2 * i]["completion"] != recs[2 * i + 1]["completion"] for i in range(6))
    assert result.accuracy == pytest.approx(sum(r["correct"] for r in recs) / 12)
    by_prompt = [recs[2 * i]["correct"] or recs[2 * i + 1]["correct"] for i in range(6)]
    assert result.pass_at_k == pytest.approx(sum(by_prompt) / 6)
    assert result.pass_at_k >= result.accuracy and "pass@2" in result.summary()


def test_eval_split_and_limit_checks(setup, tokenizer):
    t = setup[0]
    with pytest.raises(ConfigError, match=r"^split 'validation' does not exist for builtin:arithmetic"):
        load_eval_prompts(t, tokenizer, split="validation")
    train = load_eval_prompts(t, tokenizer, split="train", limit=5)
    test = load_eval_prompts(t, tokenizer, limit=5)
    assert [p.row for p in train] != [p.row for p in test]  # held-out problems come from another seed
    assert t.dataset.limit == 64 and len(load_eval_prompts(t, tokenizer)) == 500  # the limit is for training
    with pytest.raises(ConfigError, match=r"^config.eval_steps = -1 is not allowed"):
        template_from_dict(tiny_template(t.model, "out", eval_steps=-1))


# ---------------------------------------------------------------- the script
def cli(*args):
    return subprocess.run(
        [sys.executable, "scripts/eval.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_script_writes_summary_and_records(tiny_model_dir, tmp_path):
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    out = tmp_path / "res" / "e.json"
    result = cli(path, "--limit", 3, "--samples", 2, "--batch-size", 2, "--output", out, "temperature=0.7")
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert set(summary) == {
        "model",
        "adapter",
        "dataset",
        "split",
        "num_prompts",
        "samples",
        "accuracy",
        "pass@2",
        "strict_format",
        "soft_format",
        "completion_length",
        "truncated",
        "time_s",
        *(f"reward/{name}" for name in DEFAULT_REWARDS),
    }
    assert (summary["split"], summary["num_prompts"], summary["samples"]) == ("test", 3, 2)
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(set(r) == RECORD_KEYS for r in records)
    assert "accuracy" in result.stdout and str(out) in result.stdout


def test_script_bad_split_is_one_line(tiny_model_dir, tmp_path):
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    result = cli(path, "--split", "validation")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: split 'validation' does not exist for builtin:arithmetic: use 'train' or 'test'."
    )
    assert not (tmp_path / "out").exists()


def load_script():
    spec = importlib.util.spec_from_file_location("eval_script", REPO / "scripts" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_missing_model_and_adapter(tiny_model_dir, tmp_path, capsys):
    script = load_script()
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    assert script.main([str(path), "--model", "/no/model"]) == 2
    assert capsys.readouterr().err.strip() == "error: model = '/no/model': no such file or folder."
    assert script.main([str(path), "--adapter", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --adapter {str(tmp_path / 'none')!r}: no such folder."


def test_script_with_lora_adapter(tiny_model_dir, tmp_path, tokenizer):
    lora = pytest.importorskip("grpo.model.lora")
    if not hasattr(lora, "load_adapter"):
        pytest.skip("grpo.model.lora has no load_adapter yet")
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    lora.inject_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(std=1.0)  # a large change, so the answers must differ from the base
    lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_model_dir))
    path = write_template(tmp_path / "t.yaml", tiny_template(tiny_model_dir, tmp_path / "out"))
    script = load_script()
    outputs = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", str(tmp_path / "adapter")])):
        out = tmp_path / f"{name}.json"
        assert script.main([str(path), "--limit", "3", "--output", str(out), *extra]) == 0
        outputs[name] = [
            json.loads(s)["completion"] for s in out.with_suffix(".jsonl").read_text().splitlines()
        ]
    assert json.loads((tmp_path / "adapter.json").read_text())["adapter"] == str(tmp_path / "adapter")
    assert outputs["base"] != outputs["adapter"]
    prompts = load_eval_prompts(template_from_dict(tiny_template(tiny_model_dir, "o")), tokenizer, limit=3)
    direct = answer(model, tokenizer, prompts, rw.resolve_rewards(["correctness"]), progress=False)
    assert [r["completion"] for r in direct.records] == outputs["adapter"]  # the adapter was loaded exactly


# ---------------------------------------------------------------- during training
def test_training_logs_eval_and_writes_eval_json(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    trainer = GRPOTrainer(template_from_dict(tiny_template(tiny_model_dir, out, eval_steps=1, eval_limit=3)))
    model_dir = trainer.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("eval/accuracy", "eval/strict_format", "eval/soft_format", "eval/completion_length"):
        assert all(key in r for r in rows), key
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("eval/accuracy")
    assert [e.step for e in scalars] == [1, 2]
    assert [e.value for e in scalars] == pytest.approx([r["eval/accuracy"] for r in rows])
    assert model_dir.parent == out and (model_dir / "model.safetensors").is_file()
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["step"], summary["num_prompts"], summary["split"]) == (2, 3, "test")
    assert summary["model"] == str(model_dir)
    assert summary["completion_length"] == pytest.approx(rows[-1]["eval/completion_length"])
    assert len((out / "eval.jsonl").read_text().splitlines()) == 3


def test_training_without_eval_steps_writes_no_eval(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    GRPOTrainer(template_from_dict(tiny_template(tiny_model_dir, out, max_steps=1))).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("eval/") for k in rows[0]) and not (out / "eval.json").exists()


def test_save_best_keeps_the_model_of_the_best_evaluation(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    data = tiny_template(
        tiny_model_dir,
        out,
        max_steps=4,
        eval_steps=1,
        eval_limit=8,
        save_steps=1,
        save_best=True,
        learning_rate=0.05,  # large: the greedy answers change from one evaluation to the next
        rewards=["tests.user_rewards:correctness", "tests.user_rewards:length"],
    )
    GRPOTrainer(template_from_dict(data)).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval/accuracy"] for r in rows]
    assert len(set(accuracy)) > 1  # the evaluations differ, so "best" means something here
    step = accuracy.index(max(accuracy)) + 1  # the first evaluation that reached the maximum
    assert step > 1  # an earlier, worse best was replaced
    best = json.loads((out / "best.json").read_text())
    assert best == {"step": step, "accuracy": max(accuracy), "model": str(out / "model-best")}
    saved = out / "checkpoints" / f"step-{step:06d}" / "model" / "model.safetensors"
    assert (out / "model-best" / "model.safetensors").read_bytes() == saved.read_bytes()
    resumed = GRPOTrainer(
        template_from_dict(
            {**data, "config": {**data["config"], "max_steps": 5, "resume_from_checkpoint": "latest"}}
        )
    )
    assert resumed.evaluation.best_accuracy == max(accuracy)  # a resumed run has to beat it
    data["config"]["eval_steps"] = 0
    with pytest.raises(
        ConfigError,
        match=r"^config.save_best = True is not allowed: it keeps the model of the "
        r"best evaluation, so it needs eval_steps > 0.$",
    ):
        template_from_dict(data)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_and_save_best_under_two_processes(tiny_model_dir, tmp_path, strategy):
    """Rank 0 evaluates while the other waits (FSDP: both gather the weights); the best model is gathered too."""
    from transformers import AutoModelForCausalLM

    from tests.test_checkpoint import torchrun

    out = tmp_path / "run"
    data = tiny_template(
        tiny_model_dir,
        out,
        max_steps=3,
        batch_size=1,
        eval_steps=1,
        eval_limit=4,
        save_best=True,
        learning_rate=0.05,
        distributed_strategy=strategy,
        rewards=["tests.user_rewards:correctness", "tests.user_rewards:length"],
    )
    result = torchrun(write_template(tmp_path / "t.yaml", data))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval/accuracy"] for r in rows]
    best = json.loads((out / "best.json").read_text())
    assert (best["step"], best["accuracy"]) == (accuracy.index(max(accuracy)) + 1, max(accuracy))
    assert json.loads((out / "eval.json").read_text())["step"] == 3
    AutoModelForCausalLM.from_pretrained(out / "model-best")  # a complete, loadable folder
