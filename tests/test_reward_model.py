"""The reward_model reward: a real (tiny, random) sequence-classification model scoring conversations."""

import pytest
import torch

from grpo import rewards as rw
from grpo.config import ConfigError, template_from_dict
from grpo.rewards.learned_model import conversation_text, load_reward_model
from grpo.trainer import GRPOTrainer
from tests.conftest import tiny_llama_config, tiny_template

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]


def build_reward_model(tokenizer, folder, *, labels=1):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=labels)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_dir(tokenizer, tmp_path_factory):
    return build_reward_model(tokenizer, tmp_path_factory.mktemp("rm") / "model")


@pytest.mark.parametrize("batch_size", [2, 8])
def test_scores_are_the_models_logit_for_each_conversation(reward_dir, batch_size):
    """Against transformers' own forward, one conversation at a time (no padding, no shared prefix): two
    prompts, the replies of each sharing the start of the conversation."""
    completions = ["5", "The answer is 5 because 2 + 3 = 5.", "six", "4", "It is 4."]
    other = [MESSAGES[0], {"role": "user", "content": "What is 2 + 2?"}]
    messages = [MESSAGES] * 3 + [other] * 2
    entry = {"name": "reward_model", "model": str(reward_dir), "batch_size": batch_size}
    [reward] = rw.resolve_rewards([entry])
    got = rw.score([reward], completions, ["5"] * 5, prompt_messages=messages)[:, 0]  # [5]
    net, tok = load_reward_model(str(reward_dir), "cpu")
    expected = []
    with torch.no_grad():
        for m, c in zip(messages, completions):
            text = conversation_text(tok, m, c)
            assert text.startswith("<|im_start|>system\nAnswer briefly.")
            assert "<|im_start|>assistant\n" + c in text
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            expected.append(float(net(**ids).logits[0, 0]))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert len(set(got.tolist())) == 5  # different conversations, different scores


def test_a_training_run_logs_the_learned_reward(tiny_model_dir, reward_dir, tmp_path):
    entry = {"name": "reward_model", "model": str(reward_dir), "weight": 0.5}
    trainer = GRPOTrainer(template_from_dict(tiny_template(tiny_model_dir, tmp_path / "r", rewards=[entry])))
    metrics, samples = trainer.train_step()
    scores = [s["rewards"]["reward_model"] for s in samples]
    assert all(isinstance(v, float) for v in scores) and metrics["reward/reward_model"] != 0.0
    assert metrics["reward/total_mean"] == pytest.approx(0.5 * metrics["reward/reward_model"], rel=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "reward_model needs model: a local folder or hub id of a sequence-classification model."),
        (
            {"model": "./missing"},
            "reward_model model = './missing': no such folder, and not a hub id (org/name).",
        ),
        (
            {"model": "org/rm", "batch_size": 0},
            "reward_model batch_size = 0 is not allowed: expected an integer",
        ),
        ({"model": "org/rm", "top": 1}, "top = 1 is not allowed: reward_model takes only model, batch_size,"),
    ],
)
def test_bad_options_fail_before_anything_loads(options, message):
    with pytest.raises(ConfigError) as e:
        rw.resolve_rewards([{"name": "reward_model", **options}])
    assert str(e.value).startswith(f"config.rewards[0] {message}")


def test_a_folder_without_a_model_and_a_classifier_with_two_labels(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"is not a model folder \(no config.json\)\.$"):
        rw.resolve_rewards([{"name": "reward_model", "model": str(tmp_path)}])
    two = build_reward_model(tokenizer, tmp_path / "two", labels=2)
    with pytest.raises(ConfigError, match=r"has 2 outputs; a reward model has 1\.$"):
        load_reward_model(str(two), "cpu")


def test_a_classifier_without_a_score_head_takes_padded_batches(tokenizer, tmp_path):
    """An encoder classifier (BERT: a pooler and `classifier`, no `score`) scores through its own forward."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    completions = ["5", "The answer is 5 because 2 + 3 = 5.", "six"]
    [reward] = rw.resolve_rewards(
        [{"name": "reward_model", "model": str(tmp_path / "bert"), "batch_size": 3}]
    )
    got = rw.score([reward], completions, ["5"] * 3, prompt_messages=[MESSAGES] * 3)[:, 0]
    net, tok = load_reward_model(str(tmp_path / "bert"), "cpu")
    with torch.no_grad():
        expected = [
            float(
                net(
                    **tok(conversation_text(tok, MESSAGES, c), return_tensors="pt", add_special_tokens=False)
                ).logits[0, 0]
            )
            for c in completions
        ]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
