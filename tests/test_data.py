"""Data loading (built-in task, local GSM8K files; empty, binary, broken and incomplete files), template rendering
and the prompt sampler."""

import gzip
import json
import shutil

import pytest

from grpo.builtin_tasks import builtin_arithmetic
from grpo.config import ConfigError, DatasetConfig, DataTemplate, template_from_dict
from grpo.data import (
    PromptSampler,
    build_prompts,
    complete_rows,
    load_rows,
    reference_answer,
)
from grpo.eval.evaluate import load_eval_prompts
from grpo.trainer import GRPOTrainer
from tests.conftest import GSM8K, tiny_template, train_cli, write_template


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
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path="builtin:chess"))
    assert str(e.value) == (
        "dataset.path = 'builtin:chess': the built-in datasets are builtin:arithmetic, builtin:multiply."
    )
    bad = tmp_path / "rows.json"
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(bad)))
    assert str(e.value) == (
        f"dataset.path = '{bad}' could not be read as json: JSON parse error: Missing a name for object member. "
        "in row 0"
    )


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


# ---------------------------------------------------------------- files that are empty, broken or incomplete
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def rows_missing_question(path, n=40):
    """n rows; every third one from the second (2, 5, 8, ...: 13 of 40) lacks its question: absent or null."""
    rows = []
    for i in range(n):
        row = {"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}
        if i % 3 == 1:
            if i % 2:
                del row["question"]
            else:
                row["question"] = None
        rows.append(json.dumps(row))
    return write_lines(path, rows)


def test_an_empty_dataset_or_split_is_refused_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(empty)))
    assert str(e.value) == f"dataset file '{empty}' has no rows; a dataset needs at least one."
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(
        ConfigError, match=f"^dataset file '{blank}' has no rows; a dataset needs at least one.$"
    ):
        load_rows(DatasetConfig(path=str(blank), limit=5))
    # an empty held-out split beside a good training file
    train = write_lines(tmp_path / "train.jsonl", ['{"question": "q", "answer": "1"}'])
    (tmp_path / "test.jsonl").write_bytes(b"")
    assert len(load_rows(DatasetConfig(path=str(train)))) == 1
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(train)), split="test")
    assert (
        str(e.value) == f"dataset file '{tmp_path / 'test.jsonl'}' has no rows; a dataset needs at least one."
    )
    # the files datasets reads: a CSV header without rows, an empty file, an empty JSON list
    for name, text in [("header.csv", "question,answer\n"), ("empty.json", ""), ("list.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as e:
            load_rows(DatasetConfig(path=str(tmp_path / name)))
        assert str(e.value) == f"dataset file '{tmp_path / name}' has no rows; a dataset needs at least one."


def test_a_binary_file_is_not_valid_json_lines(tmp_path):
    packed = tmp_path / "train.jsonl"  # still gzip-compressed: bytes that are not text
    packed.write_bytes(gzip.compress(b'{"question": "q", "answer": "1"}\n' * 50))
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(packed)))
    assert str(e.value) == (
        f"dataset file '{packed}' is not valid JSON Lines: line 1 is not UTF-8 text; each line must be one JSON "
        "object."
    )


def test_a_bad_json_lines_row_is_reported_by_its_line(tmp_path):
    good = '{"question": "a", "answer": "1"}'
    bad = write_lines(tmp_path / "rows.jsonl", [good, "", good, '{"question": "c", "answer": 3,}', good])
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(bad)))
    assert str(e.value) == (
        f"dataset file '{bad}' is not valid JSON Lines: line 4 is not JSON (Expecting property name enclosed in "
        "double quotes at column 31)."
    )
    listed = write_lines(tmp_path / "list.jsonl", [good, '["a", "1"]'])
    with pytest.raises(ConfigError) as e:
        load_rows(DatasetConfig(path=str(listed)))
    assert str(e.value) == (
        f"dataset file '{listed}' is not valid JSON Lines: line 2 holds a JSON list; each line must be one "
        'object of columns, e.g. {"question": ..., "answer": ...}.'
    )


def test_every_row_is_checked_for_the_template_columns(tmp_path, tokenizer):
    path = rows_missing_question(tmp_path / "rows.jsonl")
    ds = DatasetConfig(path=str(path))
    rows = load_rows(ds)
    assert len(rows) == 40 and rows[0]["question"] and "question" in rows[1]  # absent keys come back as None
    with pytest.raises(ConfigError) as e:
        complete_rows(rows, DataTemplate(), ds)
    assert str(e.value) == (
        f"13 of 40 rows of dataset file '{path}' have no value for 'question', which template.input uses (rows 2, "
        "5, 8, 11, 14, ...); give every row one, or set dataset.missing_columns: drop to leave those rows out."
    )
    # build_prompts refuses them too, so no caller renders "None" into a prompt
    with pytest.raises(ConfigError, match=r"^13 of 40 rows of the dataset have no value for 'question'"):
        build_prompts(rows, DataTemplate(), tokenizer, max_prompt_tokens=200)
    # dataset.limit: only the first rows are read, and only they are checked
    assert complete_rows(load_rows(DatasetConfig(path=str(path), limit=1)), DataTemplate(), ds) == (
        rows[:1],
        None,
    )
    # a column of the instruction counts like one of the input
    with pytest.raises(ConfigError, match=r"^13 of 40 rows .* which template.instruction uses \(rows 2, 5"):
        complete_rows(rows, DataTemplate(instruction="Solve: {{question}}", input="Go."), ds)


def test_rows_missing_a_column_can_be_dropped(tmp_path, tokenizer):
    path = rows_missing_question(tmp_path / "rows.jsonl")
    ds = DatasetConfig(path=str(path), missing_columns="drop")
    kept, note = complete_rows(load_rows(ds), DataTemplate(), ds)
    assert note == (
        f"Dropped 13 of 40 rows of dataset file '{path}' without a value for 'question' "
        "(dataset.missing_columns: drop)"
    )
    prompts = build_prompts(kept, DataTemplate(), tokenizer, max_prompt_tokens=200)
    assert len(prompts) == 27 and not any("None" in p.text for p in prompts)
    assert [p.reference for p in prompts][:3] == ["1", "3", "4"]
    nothing = write_lines(tmp_path / "none.jsonl", ['{"question": null, "answer": "1"}'] * 3)
    none_ds = DatasetConfig(path=str(nothing), missing_columns="drop")
    with pytest.raises(ConfigError) as e:
        complete_rows(load_rows(none_ds), DataTemplate(), none_ds)
    assert str(e.value) == (
        f"Every one of the 3 rows of dataset file '{nothing}' lacks a value for 'question', which the template "
        "uses, so dataset.missing_columns: drop leaves no rows."
    )


def test_eval_prompts_are_checked_like_the_training_rows(tmp_path, tokenizer, capsys):
    train = write_lines(tmp_path / "train.jsonl", ['{"question": "q", "answer": "1"}'])
    test = rows_missing_question(tmp_path / "test.jsonl", n=10)
    template = template_from_dict({"dataset": {"path": str(train)}})
    with pytest.raises(ConfigError) as e:
        load_eval_prompts(template, tokenizer)
    assert str(e.value).startswith(
        f"3 of 10 rows of dataset file '{test}' have no value for 'question', which "
    )
    template.dataset.missing_columns = "drop"
    assert len(load_eval_prompts(template, tokenizer)) == 7
    assert (
        f"Dropped 3 of 10 rows of dataset file '{test}' without a value for 'question' "
        "(dataset.missing_columns: drop)" in capsys.readouterr().out
    )


def test_missing_columns_drop_is_logged_and_trained_without_them(tiny_model_dir, tmp_path, capsys):
    path = rows_missing_question(tmp_path / "rows.jsonl")
    data = tiny_template(tiny_model_dir, tmp_path / "run", max_steps=1)
    data["dataset"] = {"path": str(path), "missing_columns": "drop"}
    trainer = GRPOTrainer(template_from_dict(data))
    trainer.train()
    assert len(trainer.prompts) == 27 and all(p.row["question"] is not None for p in trainer.prompts)
    assert not any("None" in m["content"] for p in trainer.prompts for m in p.messages)
    assert (
        f"Dropped 13 of 40 rows of dataset file '{path}' without a value for 'question' "
        "(dataset.missing_columns: drop)" in capsys.readouterr().out
    )


@pytest.fixture
def unloadable_model(tiny_model_dir, tmp_path):
    """The tiny model's folder with its weights replaced by garbage: a run that reaches the model load fails
    there, so an error about the data proves the data was checked first."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


@pytest.mark.parametrize("case", ["empty", "binary", "bad line", "missing column"])
def test_cli_data_errors_are_one_line_before_the_model_loads(unloadable_model, tmp_path, case):
    data = tmp_path / "train.jsonl"
    if case == "empty":
        data.write_bytes(b"")
        message = f"dataset file '{data}' has no rows; a dataset needs at least one."
    elif case == "binary":
        data.write_bytes(gzip.compress(b'{"question": "q", "answer": "1"}\n'))
        message = f"dataset file '{data}' is not valid JSON Lines: line 1 is not UTF-8 text; each line must be one JSON object."
    elif case == "bad line":
        write_lines(data, ['{"question": "a", "answer": "1"}', "{question: b}"])
        message = (
            f"dataset file '{data}' is not valid JSON Lines: line 2 is not JSON (Expecting property name enclosed in "
            "double quotes at column 2)."
        )
    else:
        rows_missing_question(data)
        message = (
            f"13 of 40 rows of dataset file '{data}' have no value for 'question', which template.input uses (rows "
            "2, 5, 8, 11, 14, ...); give every row one, or set dataset.missing_columns: drop to leave those rows out."
        )
    template = tiny_template(unloadable_model, tmp_path / "out")
    template["dataset"] = {"path": str(data)}
    result = train_cli(write_template(tmp_path / "t.yaml", template))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
