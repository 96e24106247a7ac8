"""Rows in, prompts out: load a dataset (hub id, local file, or the built-in task) and render the template."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from grpo.config import ConfigError, DatasetConfig, DataTemplate

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTIN_SIZES = {"train": 5000, "test": 500}
# Different seeds per split keep held-out problems out of the training stream.
BUILTIN_SEEDS = {"train": 1234, "test": 98765}


@dataclass
class Prompt:
    """One training example: the chat-formatted prompt, its token ids and the reference answer."""

    text: str
    ids: list[int]
    reference: str
    row: dict[str, Any]
    truncated: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)  # system + user, before the chat template


# ---------------------------------------------------------------- the built-in task
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "shells", "coins", "books"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
_ADD = [
    "{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?",
    "There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in all?",
    "{n} found {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {n} find?",
    "What is {a} + {b}?",
]
_SUB = [
    "{n} has {a} {item} and gives away {b}. How many {item} are left?",
    "A jar holds {a} {item}. {n} takes out {b}. How many {item} stay in the jar?",
    "What is {a} - {b}?",
]


def builtin_arithmetic(split: str, size: int | None = None) -> list[dict[str, Any]]:
    """Small word problems with one-digit operands: easy enough that a 135M model sometimes succeeds."""
    seed = BUILTIN_SEEDS.get(split, abs(hash(split)) % 10**6)
    rng = random.Random(seed)
    rows = []
    for _ in range(size or BUILTIN_SIZES.get(split, 500)):
        a, b, n, item = rng.randint(1, 9), rng.randint(1, 9), rng.choice(_NAMES), rng.choice(_ITEMS)
        if rng.random() < 0.6:
            question, result, op = rng.choice(_ADD).format(a=a, b=b, n=n, item=item), a + b, "+"
        else:
            a, b = max(a, b), min(a, b)
            question, result, op = rng.choice(_SUB).format(a=a, b=b, n=n, item=item), a - b, "-"
        rows.append({"question": question, "answer": f"{a} {op} {b} = {result}\n#### {result}"})
    return rows


# ---------------------------------------------------------------- loading rows
def load_rows(ds: DatasetConfig, split: str | None = None) -> list[dict[str, Any]]:
    """Rows as plain dicts. Raises ConfigError with a plain sentence when the data cannot be had."""
    split = split or ds.split
    if ds.path.startswith("builtin:"):
        if ds.path != "builtin:arithmetic":
            raise ConfigError(f"dataset.path = {ds.path!r}: the only built-in dataset is builtin:arithmetic.")
        rows = builtin_arithmetic(split)
    else:
        rows = _load_with_datasets(ds, split)
    return rows[: ds.limit] if ds.limit else rows


def resolve_local_split(path: str, split: str) -> Path | None:
    """For a local train file, the eval split is a sibling file (train.jsonl -> test.jsonl) or a path."""
    candidate = Path(split)
    if candidate.suffix.lower() in LOCAL_BUILDERS:
        return candidate
    p = Path(path)
    if split in ("train", None):
        return p
    sibling = p.with_name(p.name.replace("train", split)) if "train" in p.name else None
    return sibling if sibling is not None and sibling.exists() else None


def _load_with_datasets(ds: DatasetConfig, split: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(ds.path).suffix.lower()
    if suffix in LOCAL_BUILDERS or Path(ds.path).exists():
        local = resolve_local_split(ds.path, split) if split != ds.split else Path(ds.path)
        if local is None or not local.exists():
            raise ConfigError(
                f"dataset.path = {ds.path!r} is a local file; split {split!r} needs a sibling "
                f"file or a path (for example dataset.eval_split=test.jsonl)."
            )
        builder = LOCAL_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ConfigError(f"dataset.path = {str(local)!r}: use a .jsonl, .json, .csv or .parquet file.")
        try:
            data = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # datasets raises many types for a malformed file
            raise ConfigError(
                f"dataset.path = {str(local)!r} could not be read as {builder}: {str(e).splitlines()[0]}"
            ) from None
        return [dict(r) for r in data]
    try:
        data = datasets.load_dataset(ds.path, ds.config, split=split)
    except Exception as e:  # offline, unknown id, unknown config or split
        raise ConfigError(
            f"dataset.path = {ds.path!r} could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); offline, point dataset.path at a local "
            f"file, e.g. dataset.path=../shared/data/gsm8k/train.jsonl."
        ) from None
    return [dict(r) for r in data]


# ---------------------------------------------------------------- rendering
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)


def check_template_variables(tmpl: DataTemplate, columns: list[str]) -> None:
    for part in ("instruction", "input", "output"):
        source = getattr(tmpl, part)
        try:
            names = jinja2.meta.find_undeclared_variables(_ENV.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"template.{part} is not a valid Jinja2 template: {e.message}.") from None
        missing = sorted(set(names) - set(columns))
        if missing:
            raise ConfigError(
                f"template.{part} uses {{{{{missing[0]}}}}}, which the dataset lacks; its columns "
                f"are: {', '.join(columns)}."
            )


def input_variable(template_input: str) -> str | None:
    """The one variable a template's input uses (e.g. `question` in "{{question}}"), or None."""
    names = jinja2.meta.find_undeclared_variables(_ENV.parse(template_input))
    return next(iter(names)) if len(names) == 1 else None


def reference_answer(rendered_output: str) -> str:
    """GSM8K puts the final answer after '#### '; other datasets use the whole rendered output."""
    return rendered_output.split("####")[-1].strip() if "####" in rendered_output else rendered_output.strip()


def build_prompts(
    rows: list[dict[str, Any]],
    tmpl: DataTemplate,
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    drop_long: bool = False,
) -> list[Prompt]:
    """Render each row, apply the chat template, tokenize once. A prompt over max_prompt_tokens is cut from the
    left (which can cut the system prompt), or with `drop_long` left out."""
    if not rows:
        raise ConfigError("The dataset has no rows; check dataset.path, dataset.split and dataset.limit.")
    check_template_variables(tmpl, list(rows[0].keys()))
    instruction, user, output = (_ENV.from_string(s) for s in (tmpl.instruction, tmpl.input, tmpl.output))
    prompts: list[Prompt] = []
    dropped: list[int] = []  # token counts of the prompts left out
    for row in rows:
        messages = [{"role": "user", "content": user.render(**row)}]
        system = instruction.render(**row)
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += tmpl.response_prefix
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = len(ids) > max_prompt_tokens
        if cut and drop_long:
            dropped.append(len(ids))
            continue
        if cut:
            ids = ids[-max_prompt_tokens:]
        prompts.append(
            Prompt(
                text=text,
                ids=ids,
                reference=reference_answer(output.render(**row)),
                row=row,
                truncated=cut,
                messages=messages,
            )
        )
    if not prompts:
        raise ConfigError(
            f"Every prompt is longer than maximum_sequence_length - maximum_completion_length = "
            f"{max_prompt_tokens} tokens (the shortest has {min(dropped)}); raise maximum_sequence_length or set "
            f"long_prompts: truncate."
        )
    return prompts


class PromptSampler:
    """Seeded epoch-wise shuffling with a resumable position; rank r of w takes every w-th prompt of the global
    batch, so mini-batch j of every rank together is the same prompts whatever the number of processes."""

    def __init__(self, num_prompts: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = num_prompts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self.global_batch > num_prompts:
            raise ConfigError(
                f"config.batch_size = {batch_size} x {world_size} process(es) needs at least "
                f"{self.global_batch} prompts, but the dataset has {num_prompts}."
            )
        self.steps_per_epoch = num_prompts // self.global_batch
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[int]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order(self.epoch)
        start = self.position * self.global_batch
        chunk = order[start : start + self.global_batch]
        self.position += 1
        return chunk[self.rank :: self.world_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
