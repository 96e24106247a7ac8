"""Multi-turn rollouts with the real embedded tokenizer: the tool loop and environments turn by turn, the tokens
between turns exactly as the chat template renders them, and a loss that trains only what the model wrote.

The model's turns come from a scripted policy (a function of the conversation so far), so that the tests know
which calls are made; the tiny random model runs the environment end to end and every log-prob pass."""

from __future__ import annotations

import re

import pytest
import torch

from grpo.builtin_tasks import builtin_multiply
from grpo.config import template_from_dict
from grpo.data import Prompt, build_prompts
from grpo.model.loading import load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.rollout.decoding.torch_sampler import TorchSampler
from grpo.rollout.generate import Rollout, SamplingSettings
from grpo.rollout.sampler import SamplerBase
from grpo.rollout.turns.multi_turn import MultiTurn
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_template
from tests.test_tools import add  # noqa: F401  (the tools the templates name live there)


class Scripted(SamplerBase):
    """A sampler whose replies policy(context, k) writes: the conversation so far as text and the sample's index
    among its prompt's num_generations. Each reply ends with the first end token, cut to the token budget."""

    holder = "the scripted policy"

    def __init__(self, tokenizer, policy):
        super().__init__(version=0)
        self.tokenizer, self.policy = tokenizer, policy

    def sample(self, prompts, settings, *, num_generations, generator, version):
        self.require_version(version)
        rows, end = [], list(settings.end_ids)
        for ctx in prompts:
            for k in range(num_generations):
                text = self.policy(self.tokenizer.decode(ctx), k)
                reply = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                rows.append((reply + end[:1])[: settings.max_new_tokens])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return Rollout(
            prompt_ids=ids[:, :0],
            prompt_mask=mask[:, :0],
            completion_ids=ids,
            completion_mask=mask,
            truncated=torch.tensor([r[-1] not in end for r in rows]),
            group_size=num_generations,
            sampling_logps=-0.25 * mask.float(),
        )

    def update_weights(self, model, *, version):
        self.version = version


def scripted(tokenizer, policy):
    return Scripted(tokenizer, policy)


def play_turns(turns, sampler, prompts, c, tokenizer, generator=None):
    """A training rollout of `prompts` over several turns on `sampler`, with the template's settings."""
    settings = SamplingSettings.from_config(c, [tokenizer.eos_token_id])
    g = c.num_generations
    return turns.rollout(sampler, prompts, settings, tokenizer, generator, num_generations=g, version=0)


def use_sampler(trainer, sampler):
    """The trainer's rollouts and evaluations draw from `sampler` from now on."""
    trainer.rollout_sampler = trainer.sampling.sampler = sampler


def config(tmp_path, **settings):
    settings = {"maximum_sequence_length": 1200, **settings}
    return template_from_dict(tiny_template(tmp_path, tmp_path / "run", **settings)).config


def prompts_for(tokenizer, turns, questions):
    rows = [{"question": q, "answer": "#### 0"} for q in questions]
    tmpl = template_from_dict({"template": {"instruction": "Use the tools."}}).template
    return build_prompts(
        rows,
        tmpl,
        tokenizer,
        max_prompt_tokens=10_000,
        tools=turns.schemas,
        system_text=turns.system_text(tokenizer),
    )


def calls(*pairs):
    return "".join(
        f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>' for name, arguments in pairs
    )


# ---------------------------------------------------------------- the tool loop
def test_several_calls_a_timeout_and_a_raising_tool_go_back_to_the_model(tokenizer, tmp_path):
    c = config(
        tmp_path,
        tools=["calculator", "tests.test_tools:add", "tests.test_tools:sleepy", "tests.test_tools:broken"],
        tool_timeout=0.3,
        max_tool_calling_iterations=4,
        maximum_completion_length=200,
        maximum_sequence_length=1200,
        num_generations=2,
    )
    turns = MultiTurn(c)
    replies = [
        calls(("add", '{"a": 2, "b": 3}'), ("calculator", '{"expression": "6 * 7"}')),
        calls(("sleepy", '{"seconds": 5}')),
        calls(("broken", '{"x": 1}')),
        "The answer is 42.",
    ]
    # the turn a context asks for: its assistant headers, less the generation prompt's
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    prompts = prompts_for(tokenizer, turns, ["What is 6 * 7?"])
    ro = play_turns(turns, sampler, prompts, c, tokenizer)
    conv = ro.conversations[0]
    assert conv.replies == replies
    assert conv.cut is None
    assert [(r["name"], r["result"], r["error"]) for r in conv.tool_calls] == [
        ("add", "5", None),
        ("calculator", "42", None),
        ("sleepy", None, "the tool did not return within 0.3 s"),
        ("broken", None, "RuntimeError: broken on 1"),
    ]
    assert [m["role"] for m in conv.messages] == [
        "system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant", "tool", "assistant"
    ]  # fmt: skip
    assert conv.messages[6]["content"] == "Error: the tool did not return within 0.3 s"
    # the whole sequence is the chat template's rendering of the conversation, token for token
    n = int(ro.completion_mask[0].sum())
    sequence = prompts[0].ids + ro.completion_ids[0, :n].tolist()
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert tokenizer.decode(sequence) == rendered.removesuffix("\n")
    # the model wrote exactly its replies and their end tokens; everything else is masked out
    written = ro.completion_ids[0, :n][ro.model_written[0, :n].bool()].tolist()
    expected = [t for r in replies for t in tokenizer(r, add_special_tokens=False)["input_ids"] + [2]]
    assert written == expected
    between = tokenizer.decode(ro.completion_ids[0, :n][~ro.model_written[0, :n].bool()].tolist())
    assert between == (
        "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>tool\nError: the tool did not return within 0.3 s<|im_end|>\n<|im_start|>assistant\n"
        "\n<|im_start|>tool\nError: RuntimeError: broken on 1<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ro.sampling_logps[0, :n].tolist() == [
        -0.25 if w else 0.0 for w in ro.model_written[0, :n].tolist()
    ]
    assert torch.equal(ro.trained_mask, ro.completion_mask * ro.model_written)
    assert torch.equal(ro.completion_ids[0], ro.completion_ids[1])  # both samples followed the same script


def test_the_call_limit_and_the_token_budget_cut_a_sample(tokenizer, tmp_path):
    always = calls(("calculator", '{"expression": "1 + 1"}'))
    c = config(tmp_path, tools=["calculator"], max_tool_calling_iterations=2, maximum_completion_length=200)
    turns = MultiTurn(c)
    sampler = scripted(tokenizer, lambda text, k: always)
    prompts = prompts_for(tokenizer, turns, ["Add."])
    ro = play_turns(turns, sampler, prompts, c, tokenizer)
    conv = ro.conversations[0]
    assert (len(conv.replies), len(conv.tool_calls), conv.cut) == (3, 2, "calls")
    assert not bool(ro.truncated[0])

    per_reply = len(tokenizer(always, add_special_tokens=False)["input_ids"]) + 1
    c = config(
        tmp_path,
        tools=["calculator"],
        max_tool_calling_iterations=9,
        maximum_completion_length=per_reply * 2 + 3,
    )
    turns = MultiTurn(c)
    sampler = scripted(tokenizer, lambda text, k: always)
    ro = play_turns(turns, sampler, prompts, c, tokenizer)
    conv = ro.conversations[0]
    assert (len(conv.replies), len(conv.tool_calls), conv.cut) == (3, 2, "tokens")
    assert int(ro.trained_mask[0].sum()) == per_reply * 2 + 3  # model tokens fill the budget, no more
    assert bool(ro.truncated[0])


# ---------------------------------------------------------------- environments
class Countdown:
    """Counts the model's replies down from the row's start; reset's text joins the user message."""

    def reset(self, row):
        self.left = int(row["start"])
        return f"Count down from {self.left}."

    def step(self, reply):
        self.left -= 1
        return (None, True) if self.left == 0 else (f"{self.left} left", False)


def test_an_environment_resets_steps_and_ends(tokenizer, tmp_path):
    c = config(
        tmp_path,
        environment="tests.test_multi_turn:Countdown",
        max_tool_calling_iterations=10,
        maximum_completion_length=100,
    )
    turns = MultiTurn(c)
    sampler = scripted(tokenizer, lambda text, k: "go")
    prompt = Prompt(
        text="", ids=[], reference="", row={"start": 3}, messages=[{"role": "user", "content": "Play."}]
    )
    ro = play_turns(turns, sampler, [prompt], c, tokenizer)
    conv = ro.conversations[0]
    assert conv.messages == [
        {"role": "user", "content": "Play.\n\nCount down from 3."},
        {"role": "assistant", "content": "go"},
        {"role": "user", "content": "2 left"},
        {"role": "assistant", "content": "go"},
        {"role": "user", "content": "1 left"},
        {"role": "assistant", "content": "go"},
    ]
    assert conv.cut is None
    prompt = ro.prompt_ids[0][ro.prompt_mask[0].bool()].tolist()
    full = prompt + ro.completion_ids[0][ro.completion_mask[0].bool()].tolist()
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert tokenizer.decode(full) == rendered.removesuffix("\n")
    assert int(ro.trained_mask[0].sum()) == 3 * 2  # "go" and the end token, three times


def test_number_guess_with_the_tiny_model_runs_every_turn_batched(tokenizer, tiny_model_dir, tmp_path):
    c = config(
        tmp_path,
        environment="number_guess",
        max_tool_calling_iterations=3,
        maximum_completion_length=24,
        num_generations=2,
    )
    turns = MultiTurn(c)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    with (
        torch.no_grad()
    ):  # a random model that often ends its reply (its end token's row is the zero pad row)
        end_row = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 2
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = end_row
    rows = [{"question": "Guess my number.", "answer": "#### 0", "secret": s} for s in (7, 70)]
    tmpl = template_from_dict({}).template
    prompts = build_prompts(rows, tmpl, tokenizer, max_prompt_tokens=100)

    def run():
        gen = torch.Generator().manual_seed(3)
        sampler = TorchSampler(model, pad_id=tokenizer.pad_token_id, decode_impl=c.decode_impl)
        return play_turns(turns, sampler, prompts, c, tokenizer, gen)

    ro = run()
    for conv, mask in zip(ro.conversations, ro.trained_mask):
        assert int(mask.sum()) <= 24
        assert 1 <= len(conv.replies) <= 4
        observations = [m["content"] for m in conv.messages[2:] if m["role"] == "user"]
        assert all(
            o in ("higher", "lower", "Reply with one whole number from 1 to 100.") for o in observations
        )
        assert conv.cut in (None, "calls", "tokens")
    # no reply guesses right, so each game runs to the step limit: 3 steps answered, the 4th reply ends it
    assert [(len(conv.replies), conv.cut) for conv in ro.conversations] == [(4, "calls")] * 4
    again = run()
    assert torch.equal(ro.completion_ids, again.completion_ids)
    assert torch.equal(ro.model_written, again.model_written)


# ---------------------------------------------------------------- the loss trains only what the model wrote
def multiply_policy(text, k):
    """Sample k of 4: a right call, a wrong call, no call, a call that errs; then the tool's answer."""
    a, b = re.findall(r"What is (\d+) \* (\d+)\?", text)[-1]
    if "<|im_start|>tool" in text:
        result = text.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0]
        return f"<answer>{result if not result.startswith('Error') else 0}</answer>"
    return [
        calls(("calculator", f'{{"expression": "{a} * {b}"}}')),
        calls(("calculator", f'{{"expression": "{a} * {b} + 1"}}')),
        "<answer>5</answer>",
        calls(("calculator", f'{{"expression": "{a} *"}}')),
    ][k]


def seen_conversations(completions, references, *, messages, tool_calls, **_):
    """A reward that pays for the tool's right answer in the last message; it checks what rewards are handed."""
    assert len(messages) == len(tool_calls) == len(completions)
    return [float(m[-1]["content"] == f"<answer>{r}</answer>") for m, r in zip(messages, references)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
def test_gradients_of_tool_results_and_headers_are_exactly_zero(
    tokenizer, tiny_model_dir, tmp_path, loss_type
):
    template = template_from_dict(
        {
            **tiny_template(tiny_model_dir, tmp_path / "run", tools=["calculator"], num_generations=4, batch_size=2,
                            maximum_completion_length=64, maximum_sequence_length=600, loss_type=loss_type,
                            beta=0.1, entropy_coef=0.01, num_iterations=2, micro_batch_size=3,
                            rewards=["correctness", "tool_used", "tests.test_multi_turn:seen_conversations"]),
            "dataset": {"path": "builtin:multiply", "limit": 16},
        }
    )  # fmt: skip
    trainer = GRPOTrainer(template)
    assert "You can call these tools:" in trainer.prompts[0].text
    use_sampler(trainer, scripted(tokenizer, multiply_policy))
    passes = []  # per training forward: its rows and d(objective)/d(log-probs), d(objective)/d(entropy)

    def keep_gradients(module, args, out):
        if torch.is_grad_enabled() and out[0].requires_grad:
            passes.append({"rows": args[2].shape[0]})
            for tensor, name in zip(out, ("logps", "entropy"), strict=True):
                tensor.register_hook(lambda g, name=name, entry=passes[-1]: entry.update({name: g.clone()}))

    trainer.policy.register_forward_hook(keep_gradients)
    captured = {}
    step_samples = trainer.sampling.sample_step

    def remember(timings, version):
        first, step, sampling = step_samples(timings, version)
        captured["rollout"] = step.rollout
        return first, step, sampling

    trainer.sampling.sample_step = remember
    metrics, samples = trainer.train_step()
    ro = captured["rollout"]
    assert metrics["tools/calls_per_sample"] == 0.75
    assert metrics["tools/error_share"] == pytest.approx(1 / 3)
    assert metrics["turns/mean"] == 1.75
    assert metrics["reward/tests.test_multi_turn:seen_conversations"] == 0.25
    assert metrics["reward/tool_used"] == 0.25
    a, b = re.findall(r"\d+", samples[0]["prompt"]["question"])
    assert samples[0]["turns"]["tool_calls"][0]["result"] == str(int(a) * int(b))
    # 2 iterations x micro-batches of 3, 3 and 2 rows, each checked against the rows it covered
    assert [p["rows"] for p in passes] == [3, 3, 2, 3, 3, 2]
    start = 0
    for p in passes:
        keep = ro.trained_mask[start : start + p["rows"]].bool()
        start = (start + p["rows"]) % 8
        for name in ("logps", "entropy"):
            assert torch.count_nonzero(p[name][~keep]) == 0, name  # tool results, headers, padding
            assert torch.count_nonzero(p[name][keep]) > 0, name  # the model's own tokens
    assert int((ro.completion_mask - ro.trained_mask).sum()) > 0  # there were tool tokens to mask


def test_log_probs_of_multi_segment_completions_match_on_both_passes(tokenizer, tiny_model_dir, tmp_path):
    c = config(
        tmp_path,
        tools=["calculator"],
        num_generations=4,
        maximum_completion_length=64,
        maximum_sequence_length=600,
    )
    turns = MultiTurn(c)
    sampler = scripted(tokenizer, multiply_policy)
    tmpl = template_from_dict({"template": {"instruction": "Use the calculator."}}).template
    prompts = build_prompts(builtin_multiply("train", 2), tmpl, tokenizer, max_prompt_tokens=400,
                            system_text=turns.system_text(tokenizer))  # fmt: skip
    ro = play_turns(turns, sampler, prompts, c, tokenizer)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    policy = CompletionLogprobs(model)
    with torch.no_grad():
        whole = policy(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        ids, mask, index = ro.prompt_groups(slice(0, 8))
        shared = policy(ids, mask, ro.completion_ids, ro.completion_mask, index)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert torch.count_nonzero(whole[ro.completion_mask == 0]) == 0
    assert bool((whole[ro.completion_mask == 1] < 0).all())


def test_a_response_prefix_starts_the_first_reply(tokenizer, tmp_path):
    c = config(tmp_path, tools=["calculator"], maximum_completion_length=100)
    turns = MultiTurn(c, prefix="<tool_call>")
    replies = [
        '{"name": "calculator", "arguments": {"expression": "2 * 3"}}</tool_call>',
        "<answer>6</answer>",
    ]
    sampler = scripted(tokenizer, lambda text, k: replies[text.count("<|im_start|>assistant") - 1])
    tmpl = template_from_dict(
        {"template": {"instruction": "Use the tools.", "response_prefix": "<tool_call>"}}
    )
    prompts = build_prompts(
        [{"question": "What is 2 * 3?", "answer": "#### 6"}],
        tmpl.template,
        tokenizer,
        max_prompt_tokens=10_000,
        system_text=turns.system_text(tokenizer),
    )
    ro = play_turns(turns, sampler, prompts, c, tokenizer)
    conv = ro.conversations[0]
    assert conv.replies == ["<tool_call>" + replies[0], replies[1]]
    assert [(r["name"], r["result"]) for r in conv.tool_calls] == [("calculator", "6")]
    n = int(ro.completion_mask[0].sum())
    rendered = tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert tokenizer.decode(prompts[0].ids + ro.completion_ids[0, :n].tolist()) == rendered.removesuffix("\n")
