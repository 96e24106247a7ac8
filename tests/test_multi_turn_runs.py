"""Whole runs with several turns per sample: a run killed mid-way with an environment or tools on resumes
bitwise, and two processes (gloo) match one on the same data."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.conftest import build_tiny_model, tiny_template, write_template
from tests.test_checkpoint import rows, train, weights


@pytest.fixture(scope="module")
def ending_model_dir(tokenizer, tmp_path_factory):
    """The tiny model, with an end-token row that makes it end a reply every few tokens, so that the game has
    several turns (the random model's end-token row is the zero padding row: it would never end)."""
    from transformers import LlamaForCausalLM

    from grpo.model.loading import save_model

    folder = build_tiny_model(tokenizer, tmp_path_factory.mktemp("ending") / "model")
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        end_row = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 2
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = end_row
    save_model(model, tokenizer, folder)
    return folder


# A response prefix that holds a whole call makes every first reply a calculator call, so each sample has a tool
# turn even though the random model would never write one itself.
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
TURNS = {"environment": {"environment": "number_guess"}, "tools": {"tools": ["calculator"]}}


@pytest.fixture(params=sorted(TURNS))
def template(request, ending_model_dir, tmp_path):
    data = tiny_template(
        ending_model_dir,
        tmp_path / "unused",
        max_steps=4,
        max_tool_calling_iterations=3,
        maximum_completion_length=24 if request.param == "environment" else 64,
        maximum_sequence_length=400,
        rewards=["tests.user_rewards:length"],
        eval_steps=2,  # the held-out prompts are played over several turns too
        eval_limit=4,
        **TURNS[request.param],
    )
    if request.param == "tools":
        data["template"] = {"instruction": "Use it.", "input": "{{question}}", "response_prefix": CALL}
    return write_template(tmp_path / f"{request.param}.yaml", data)


def test_a_killed_run_with_several_turns_resumes_bitwise(template, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    with_tools = template.stem == "tools"
    result = train(template, f"output_dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(r["turns/mean"] > 1 for r in rows(full))  # every step's samples did run several turns
    if with_tools:  # the calls ran (a reply cut by the token limit runs none)
        assert all(r["tools/calls_per_sample"] > 0 for r in rows(full))
        sample = json.loads((full / "samples.jsonl").read_text().splitlines()[0])
        assert sample["turns"]["tool_calls"][0]["result"] == "408"
    assert [r["step"] for r in rows(full) if "eval/accuracy" in r] == [2, 4]
    held_out = [json.loads(line) for line in (full / "eval.jsonl").read_text().splitlines()]
    assert len(held_out) == 4
    # The final evaluation's turns (greedy, the random model never ends a reply after the prefilled call).
    if not with_tools:
        assert max(len(g["messages"]) for g in held_out) > 1
    result = train(
        template,
        f"output_dir={killed}",
        "save_steps=2",
        env_extra={"GRPO_TEST_KILL_AT": "after_commit_step2"},
    )
    assert result.returncode == -signal.SIGKILL
    result = train(template, f"output_dir={killed}", "save_steps=2", "resume=latest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout
    assert rows(killed) == rows(full)
    assert weights(killed) == weights(full)


def test_two_processes_match_one_process_with_tools(tiny_model_dir, tmp_path):
    """4 prompts x 4 samples in one process == 2 prompts x 4 samples on each of 2 ranks (gloo), every turn from
    the same scripted policy: the multi-turn masks and token counts add up over ranks like single replies."""
    from tests.test_distributed import launch

    results = {}
    for name, nproc, batch in (("one", 0, 4), ("two", 2, 2)):
        data = tiny_template(
            tiny_model_dir,
            tmp_path / name,
            tools=["calculator"],
            num_generations=4,
            batch_size=batch,
            maximum_completion_length=64,
            maximum_sequence_length=600,
            loss_type="dapo",
            beta=0.1,
            learning_rate=1e-2,
            adam_epsilon=1.0,
            max_grad_norm=0.0,
            rewards=["correctness", "tool_used"],
        )
        data["dataset"] = {"path": "builtin:multiply", "limit": 16}
        path = write_template(tmp_path / f"{name}.yaml", data)
        result = launch("tests/dist_step.py", path, tmp_path / f"{name}.pt", nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        results[name] = torch.load(tmp_path / f"{name}.pt")
    one, two = results["one"], results["two"]
    for key in ("tools/calls_per_sample", "tools/error_share", "turns/mean", "reward/total_mean", "loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6, abs=1e-9), key
    assert one["metrics"]["turns/mean"] == 1.75
    for k, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][k], g, rtol=1e-5, atol=1e-7, msg=k)
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
