"""Held-out evaluation of a template with tools: the answers take several turns as in training, and are scored
on the whole conversation (a single-turn evaluation would score the bare tool call)."""

from __future__ import annotations

import pytest

from grpo import rewards as rw
from grpo.config import template_from_dict
from grpo.eval.evaluate import evaluate, load_eval_prompts
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.turns.multi_turn import MultiTurn
from tests.conftest import tiny_template
from tests.test_multi_turn import multiply_policy, scripted


@pytest.mark.parametrize("samples, accuracy, pass_at_k", [(1, 1.0, None), (4, 0.25, 1.0)])
def test_evaluation_runs_the_tools(tokenizer, tiny_model_dir, tmp_path, samples, accuracy, pass_at_k):
    template = template_from_dict(
        {
            **tiny_template(tiny_model_dir, tmp_path, tools=["calculator"], maximum_completion_length=64,
                            maximum_sequence_length=600, rewards=["correctness", "tool_used", "final_answer"]),
            "dataset": {"path": "builtin:multiply"},
        }
    )  # fmt: skip
    c = template.config
    prompts = load_eval_prompts(template, tokenizer, limit=3)
    assert all("You can call these tools:" in p.text for p in prompts)  # described as in training
    turns = MultiTurn.from_config(c)
    sampler = scripted(tokenizer, multiply_policy)  # k: a right call, a wrong one, none, an error
    rewards = rw.resolve_rewards(c.rewards, max_completion_length=64)
    settings = SamplingSettings.from_config(c, [tokenizer.eos_token_id])
    result = evaluate(
        sampler, tokenizer, prompts, rewards, rw.Tags.from_config(c), settings, samples=samples, turns=turns,
        progress=False,
    )  # fmt: skip
    assert result.accuracy == accuracy and result.pass_at_k == pass_at_k
    assert result.reward_means["tool_used"] == (0.5 if samples == 1 else 0.25)  # 0.5 where a call ran: k 0, 1
    assert result.reward_means["final_answer"] == accuracy  # the reply after the tool result, as correctness
    first = result.records[0]
    a, b = (int(x) for x in first["prompt"]["question"].removeprefix("What is ").rstrip("?").split(" * "))
    assert first["tool_calls"][0]["result"] == str(a * b) and first["completion"].endswith(
        f"<answer>{a * b}</answer>"
    )
    assert [m["role"] for m in first["messages"]] == ["assistant", "tool", "assistant"]
