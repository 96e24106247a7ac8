"""Data loading (built-in task, local GSM8K files), template rendering and the prompt sampler."""

import pytest

from grpo.config import ConfigError, DatasetConfig, DataTemplate
from grpo.data import PromptSampler, build_prompts, builtin_arithmetic, load_rows, reference_answer
from tests.conftest import GSM8K


def test_builtin_task_is_seeded_and_splits_differ():
    a, b = builtin_arithmetic("train", 50), builtin_arithmetic("train", 50)
    assert a == b
    test = builtin_arithmetic("test", 50)
    assert [r["question"] for r in test] != [r["question"] for r in a]
    for row in a:
        expression, result = row["answer"].split("\n#### ")
        assert eval(expression.split(" = ")[0]) == int(result) >= 0  # the stated answer is right


def test_gsm8k_local_file_and_reference():
    rows = load_rows(DatasetConfig(path=str(GSM8K / "train.jsonl"), limit=3))
    assert len(rows) == 3 and set(rows[0]) == {"question", "answer"}
    assert reference_answer(rows[0]["answer"]) == "72"
    test_rows = load_rows(DatasetConfig(path=str(GSM8K / "train.jsonl"), limit=2), split="test")
    assert test_rows[0]["question"].startswith("Janet")  # test.jsonl beside train.jsonl


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path="openai/gsm8k", config="main"))
    msg = str(e.value)
    assert msg.startswith("dataset.path = 'openai/gsm8k' could not be loaded from the Hugging Face hub (")
    assert msg.endswith(
        "offline, point dataset.path at a local file, e.g. dataset.path=../shared/data/gsm8k/train.jsonl."
    )


def test_unknown_builtin_and_bad_local_file(tmp_path):
    with pytest.raises(ConfigError, match="^dataset.path = 'builtin:chess': the only built-in dataset is"):
        load_rows(DatasetConfig(path="builtin:chess"))
    bad = tmp_path / "rows.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match=f"^dataset.path = '{bad}' could not be read as json"):
        load_rows(DatasetConfig(path=str(bad)))


def test_render_prompts_with_chat_template(tokenizer):
    rows = [{"question": "What is 2 + 2?", "answer": "#### 4"}]
    tmpl = DataTemplate(instruction="Use tags.", input="Q: {{question}}", response_prefix="<reasoning>\n")
    (p,) = build_prompts(rows, tmpl, tokenizer, max_prompt_tokens=200)
    assert p.text == (
        "<|im_start|>system\nUse tags.<|im_end|>\n<|im_start|>user\nQ: What is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n<reasoning>\n"
    )
    assert p.ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert p.reference == "4" and not p.truncated


def test_long_prompts_are_cut_from_the_left(tokenizer):
    rows = [{"question": "word " * 100, "answer": "1"}]
    (p,) = build_prompts(rows, DataTemplate(), tokenizer, max_prompt_tokens=20)
    full = tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert p.truncated and p.ids == full[-20:]


def test_long_prompts_can_be_dropped_instead(tokenizer):
    rows = [{"question": "word " * n, "answer": "1"} for n in (1, 100, 2, 60)]
    kept = build_prompts(rows, DataTemplate(), tokenizer, max_prompt_tokens=50, drop_long=True)
    assert [p.row["question"] for p in kept] == ["word ", "word " * 2]
    assert not any(p.truncated for p in kept)
    lengths = [len(p.ids) for p in build_prompts(rows, DataTemplate(), tokenizer, max_prompt_tokens=10**6)]
    with pytest.raises(ConfigError) as e:
        build_prompts(rows, DataTemplate(), tokenizer, max_prompt_tokens=min(lengths) - 1, drop_long=True)
    assert str(e.value) == (
        f"Every prompt is longer than maximum_sequence_length - maximum_completion_length = {min(lengths) - 1} "
        f"tokens (the shortest has {min(lengths)}); raise maximum_sequence_length or set long_prompts: truncate."
    )


def test_missing_template_variable_lists_columns(tokenizer):
    rows = [{"question": "q", "answer": "a"}]
    with pytest.raises(ConfigError) as e:
        build_prompts(rows, DataTemplate(input="{{problem}}"), tokenizer, max_prompt_tokens=50)
    assert (
        str(e.value)
        == "template.input uses {{problem}}, which the dataset lacks; its columns are: question, answer."
    )
    with pytest.raises(ConfigError, match=r"^template.output is not a valid Jinja2 template"):
        build_prompts(rows, DataTemplate(output="{{answer"), tokenizer, max_prompt_tokens=50)


def test_sampler_ranks_disjoint_epochs_and_resume():
    samplers = [PromptSampler(10, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert samplers[0].steps_per_epoch == 2
    batches = [[s.next_batch() for s in samplers] for _ in range(2)]
    seen = [i for step in batches for batch in step for i in batch]
    assert len(seen) == len(set(seen)) == 8  # no overlap within an epoch
    one = PromptSampler(10, batch_size=4, seed=3)  # the global batch of two ranks, interleaved
    assert [one.next_batch() for _ in range(2)] == [[a[0], b[0], a[1], b[1]] for a, b in batches]
    state = samplers[0].state_dict()
    nxt = samplers[0].next_batch()
    assert samplers[0].epoch == 1
    again = PromptSampler(10, batch_size=2, seed=3, rank=0, world_size=2)
    again.load_state_dict(state)
    assert again.next_batch() == nxt
    with pytest.raises(
        ConfigError,
        match=r"^config.batch_size = 4 x 3 process\(es\) needs at least 12 prompts, but "
        r"the dataset has 10.$",
    ):
        PromptSampler(10, batch_size=4, seed=0, world_size=3)
