"""After a run: the closing report scripts/train.py prints, and scripts/generate.py on the run folder it leaves."""

import json
import subprocess
import sys

import pytest
import torch

from grpo.run.run_report import closing_report, example_question, reward_movement
from scripts.generate import load_for_generation, render_prompt, resolve_target
from tests.conftest import REPO, tiny_template, write_template


def run_script(script: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def greedy_answer(run_dir, question: str, max_new_tokens: int) -> str:
    """What generate.py should print, computed here with transformers' generate on the same prompt."""
    model_id, template = resolve_target(str(run_dir), None)
    model, tokenizer = load_for_generation(model_id, device=torch.device("cpu"), dtype=torch.float32)
    prompt = render_prompt(template, tokenizer, question)
    ids = torch.tensor([prompt.ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return template.template.response_prefix + tokenizer.decode(
        out[0, ids.shape[1] :], skip_special_tokens=True
    )


@pytest.fixture(scope="module", params=["full", "lora"])
def trained_run(request, tiny_model_dir, tmp_path_factory):
    """A real 2-step run of the tiny model through scripts/train.py: (run folder, its stdout)."""
    tmp = tmp_path_factory.mktemp(f"run-{request.param}")
    extra = {"use_lora": True, "lora_r": 4, "lora_dropout": 0.0} if request.param == "lora" else {}
    data = tiny_template(tiny_model_dir, tmp / "out", **extra)
    data["template"] = {"response_prefix": "<reasoning>\n"}
    done = run_script("scripts/train.py", str(write_template(tmp / "t.yaml", data)), cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "out", done.stdout, request.param


def test_the_run_ends_with_where_the_model_is_and_what_to_run_next(trained_run):
    run_dir, stdout, kind = trained_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[1]
    lines = stdout.strip().splitlines()[-6:]
    saved = "LoRA adapter saved to out/model (on top of " if kind == "lora" else "Model saved to out/model ("
    assert lines[0].startswith(saved)
    assert lines[1] == (
        f"Mean reward, steps 1 -> 2: total {first['reward/total_mean']:.3f} -> {last['reward/total_mean']:.3f}, "
        f"correctness {first['reward/correctness']:.3f} -> {last['reward/correctness']:.3f}"
    )
    weights = "--adapter out/model" if kind == "lora" else "--model out/model"
    assert lines[3] == f"  evaluate:  python {REPO}/scripts/eval.py out/template.yaml {weights} --limit 200"
    assert lines[4].startswith(f"  try it:    python {REPO}/scripts/generate.py out '")
    assert lines[5] == "  curves:    tensorboard --logdir out/tensorboard"


def test_generate_streams_the_greedy_answer_of_the_run(trained_run, tiny_model_dir):
    run_dir, _, kind = trained_run
    if kind == "lora":  # the tiny model's groups all scored alike (B stayed 0): give the adapter an effect
        from safetensors.torch import load_file, save_file

        path = run_dir / "model" / "adapter_model.safetensors"
        torch.manual_seed(0)
        state = {k: torch.randn_like(v) if "lora_B" in k else v for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})
    done = run_script("scripts/generate.py", str(run_dir), "What is 2 + 3?", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = greedy_answer(run_dir, "What is 2 + 3?", 12)
    assert done.stdout.strip() == expected.strip()
    assert done.stdout.startswith("<reasoning>\n")
    if kind == "lora":  # generate.py put the adapter on its base: the logits differ from the base's
        from grpo.model.loading import load_model

        model, _ = load_for_generation(
            str(run_dir / "model"), device=torch.device("cpu"), dtype=torch.float32
        )
        base = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
        ids = torch.tensor([[1, 2, 3, 4]])
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_the_question_fills_the_templates_input_variable(trained_run, tokenizer):
    run_dir, _, _ = trained_run
    _, template = resolve_target(str(run_dir), None)
    prompt = render_prompt(template, tokenizer, "What is 4 + 4?")
    assert prompt.messages[-1] == {"role": "user", "content": "What is 4 + 4?"}
    assert prompt.text.endswith("<|im_start|>assistant\n<reasoning>\n")
    assert example_question("Solve: {{question}}", {"question": "What is 1 + 1?"}) == "What is 1 + 1?"
    assert example_question("{{a}} and {{b}}", {"a": 1, "b": 2}) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/run", "q"], "error: '/nonexistent/run': no such run, model or adapter folder."),
        (["RUN", "q", "--max-new-tokens", "0"], "error: --max-new-tokens = 0 must be at least 1."),
        (["RUN", "q", "--temperature", "-1"], "error: --temperature = -1.0 must be 0 (greedy) or more."),
    ],
)
def test_bad_input_is_one_line(trained_run, args, message):
    run_dir, _, _ = trained_run
    done = run_script("scripts/generate.py", *[str(run_dir) if a == "RUN" else a for a in args])
    assert done.returncode == 2 and done.stderr.strip() == message


def test_a_run_folder_without_its_model_yet(tmp_path, trained_run):
    run_dir, _, _ = trained_run
    (tmp_path / "template.yaml").write_text((run_dir / "template.yaml").read_text())
    done = run_script("scripts/generate.py", str(tmp_path), "q")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: Run folder {str(tmp_path)!r} has no model folder 'model' yet: the run has not saved its model."
    )


def test_reward_movement_averages_the_first_and_last_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward/total_mean": float(s), "reward/correctness": s / 10} for s in range(1, 25)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert reward_movement(path, ["reward/total_mean", "reward/correctness"]) == (
        "Mean reward, steps 1-10 -> 15-24: total 5.500 -> 19.500, correctness 0.550 -> 1.950"
    )
    path.write_text(json.dumps(rows[0]) + "\n")
    assert reward_movement(path, ["reward/total_mean"]) == "Reward at step 1: total 1.000"
    path.write_text("")
    assert reward_movement(path, ["reward/total_mean"]) is None


def test_the_report_names_held_out_accuracy_when_the_run_evaluated(tmp_path):
    from grpo.config import Template

    (tmp_path / "eval.json").write_text(json.dumps({"split": "test", "num_prompts": 200, "accuracy": 0.82}))
    text = closing_report(
        run_dir=tmp_path, model_dir=tmp_path / "model", template=Template(), example=None, scripts_dir=REPO
    )
    assert "Held-out accuracy on test (200 problems, greedy): 0.820" in text.splitlines()
    assert "What is 3 + 4?" in text


def test_the_closing_report_follows_the_answer_rewards(tmp_path, tiny_model_dir):
    from grpo.config import template_from_dict

    rewards = ["correctness", "final_answer", "tool_answer", "my_pkg.mod:correctness"]
    template = template_from_dict(tiny_template(tiny_model_dir, tmp_path, rewards=rewards))
    keys = ["total_mean", "correctness", "final_answer", "tool_answer", "my_pkg.mod:correctness"]
    rows = [{"step": s, **{f"reward/{k}": s * (i + 1) / 4 for i, k in enumerate(keys)}} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = closing_report(
        run_dir=tmp_path, model_dir=tmp_path / "model", template=template, example="q", scripts_dir=REPO
    )
    assert report.splitlines()[1] == (
        "Mean reward, steps 1 -> 2: total 0.250 -> 0.500, correctness 0.500 -> 1.000, "
        "final_answer 0.750 -> 1.500, my_pkg.mod:correctness 1.250 -> 2.500"
    )
