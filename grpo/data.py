"""Rows in, prompts out: load a dataset (hub id, local file, or the built-in task) and render the template."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

from grpo.builtin_tasks import BUILTIN_TASKS
from grpo.config import ConfigError, DatasetConfig, DataTemplate, Template

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Prompt:
    """One training example: the chat-formatted prompt, its token ids and the reference answer."""

    text: str
    ids: list[int]
    reference: str
    row: dict[str, Any]
    truncated: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)  # system + user, before the chat template


# ---------------------------------------------------------------- loading rows
def load_rows(ds: DatasetConfig, split: str | None = None) -> list[dict[str, Any]]:
    """Rows as plain dicts. Raises ConfigError with a plain sentence when the data cannot be had or has no rows."""
    split = split or ds.split
    if ds.path.startswith("builtin:"):
        if ds.path not in BUILTIN_TASKS:
            raise ConfigError(
                f"dataset.path = {ds.path!r}: the built-in datasets are {', '.join(BUILTIN_TASKS)}."
            )
        rows = BUILTIN_TASKS[ds.path](split)
    else:
        rows = _read_rows(ds, split)
    if not rows:
        raise ConfigError(f"{dataset_source(ds, split)} has no rows; a dataset needs at least one.")
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


def local_file(ds: DatasetConfig, split: str) -> Path | None:
    """The local file a split is read from, or None for a hub id or the built-in task."""
    if ds.path.startswith("builtin:") or not (
        Path(ds.path).suffix.lower() in LOCAL_BUILDERS or Path(ds.path).exists()
    ):
        return None
    local = resolve_local_split(ds.path, split) if split != ds.split else Path(ds.path)
    if local is None or not local.exists():
        raise ConfigError(
            f"dataset.path = {ds.path!r} is a local file; split {split!r} needs a sibling "
            f"file or a path (for example dataset.eval_split=test.jsonl)."
        )
    return local


def dataset_source(ds: DatasetConfig, split: str) -> str:
    """How an error names where the rows come from: the local file, or the dataset and its split."""
    local = local_file(ds, split)
    return f"dataset file {str(local)!r}" if local is not None else f"dataset {ds.path!r} split {split!r}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped), read here rather than by `datasets` so that a bad line is
    reported by its line number. Columns absent from a row are None, as `datasets` would fill them."""
    rows: list[dict[str, Any]] = []
    invalid = f"dataset file {str(path)!r} is not valid JSON Lines: line"
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ConfigError(
                    f"{invalid} {number} is not UTF-8 text; each line must be one JSON object."
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{invalid} {number} is not JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(row, dict):
                raise ConfigError(
                    f"{invalid} {number} holds a JSON {type(row).__name__}; each line must be one object of "
                    'columns, e.g. {"question": ..., "answer": ...}.'
                )
            rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in columns} for row in rows]


def _read_rows(ds: DatasetConfig, split: str) -> list[dict[str, Any]]:
    """A local .jsonl file is read here; other files and hub ids through `datasets`."""
    local = local_file(ds, split)
    if local is not None and local.suffix.lower() == ".jsonl":
        return read_jsonl(local)
    import datasets

    datasets.disable_progress_bars()
    if local is not None:
        builder = LOCAL_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ConfigError(f"dataset.path = {str(local)!r}: use a .jsonl, .json, .csv or .parquet file.")
        if local.stat().st_size == 0:  # datasets fails on it with an empty message
            return []
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log line would repeat our error
        try:
            data = datasets.load_dataset(builder, data_files=str(local), split="train")
        except Exception as e:  # datasets raises many types for a malformed file
            if "corresponds to no data" in str(e):  # a header without rows, an empty JSON list
                return []
            raise ConfigError(
                f"dataset.path = {str(local)!r} could not be read as {builder}: {_first_line(e.__cause__ or e)}"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
        return [dict(r) for r in data]
    try:
        data = datasets.load_dataset(ds.path, ds.config, split=split)
    except Exception as e:  # offline, unknown id, unknown config or split
        raise ConfigError(
            f"dataset.path = {ds.path!r} could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {_first_line(e)[:200]}); offline, point dataset.path at a local "
            f"file, e.g. dataset.path=../shared/data/gsm8k/train.jsonl."
        ) from None
    return [dict(r) for r in data]


def _first_line(e: BaseException) -> str:
    """An exception's first line; its type when the message is empty (datasets raises a bare StopIteration)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------- rendering
# Templates come from users, gallery files and queued jobs: the sandbox keeps `{{ cycler.__init__.__globals__.os
# .system(...) }}` and its kin from reaching Python's internals, and the immutable one from mutating a row.
_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False
)


def _render(template: jinja2.Template, part: str, row: dict[str, Any], index: int) -> str:
    try:
        text = template.render(**row)
        text.encode("utf-8")  # the tokenizer refuses what UTF-8 cannot hold, deep in its Rust code
        return text
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"Row {index + 1} of the dataset gives template.{part} text that is not valid Unicode ({e.reason}, "
            f"{e.object[e.start : e.end]!r}: a lone surrogate, as a broken \\u escape in JSON leaves); fix or drop "
            "that row."
        ) from None
    except jinja2.exceptions.SecurityError as e:
        raise ConfigError(
            f"template.{part} reaches beyond the row it renders ({e}); a template may use the row's columns, "
            "Jinja2's filters and tests, and nothing of Python's internals."
        ) from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError) as e:
        raise ConfigError(f"template.{part} cannot be rendered: {_first_line(e)}.") from None


def template_columns(tmpl: DataTemplate) -> dict[str, str]:
    """Each column the template renders (a Jinja2 variable of its instruction, input or output), with the first
    field that uses it."""
    used: dict[str, str] = {}
    for part in ("input", "instruction", "output"):
        try:
            names = jinja2.meta.find_undeclared_variables(_ENV.parse(getattr(tmpl, part)))
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"template.{part} is not a valid Jinja2 template: {e.message}.") from None
        for name in sorted(names):
            used.setdefault(name, f"template.{part}")
    return used


def check_template_variables(tmpl: DataTemplate, columns: list[str]) -> None:
    """Every column the template renders must be one of the dataset's."""
    for name, part in template_columns(tmpl).items():
        if name not in columns:
            raise ConfigError(
                f"{part} uses {{{{{name}}}}}, which the dataset lacks; its columns are: {', '.join(columns)}."
            )


def rows_lacking(rows: list[dict[str, Any]], tmpl: DataTemplate) -> dict[str, list[int]]:
    """For each column the template renders that some rows have no value for (absent or null: rendered, it
    would be the text "None"), the indices of those rows."""
    check_template_variables(tmpl, list(dict.fromkeys(k for row in rows for k in row)))
    lacking = {
        name: [i for i, row in enumerate(rows) if row.get(name) is None] for name in template_columns(tmpl)
    }
    return {name: found for name, found in lacking.items() if found}


def complete_rows(
    rows: list[dict[str, Any]], tmpl: DataTemplate, ds: DatasetConfig, split: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Every row checked for the columns the template renders, before any model loads. dataset.missing_columns:
    error refuses rows without a value, naming the file, the column and the first rows; drop leaves them out and
    returns the line the run's log prints (None when every row is complete)."""
    lacking = rows_lacking(rows, tmpl)
    if not lacking:
        return rows, None
    source = dataset_source(ds, split or ds.split)
    if ds.missing_columns == "error":
        raise ConfigError(_lacking_message(source, rows, tmpl, lacking))
    left_out = set().union(*lacking.values())
    kept = [row for i, row in enumerate(rows) if i not in left_out]
    names = ", ".join(map(repr, lacking))
    if not kept:
        raise ConfigError(
            f"Every one of the {len(rows)} rows of {source} lacks a value for {names}, which the template "
            "uses, so dataset.missing_columns: drop leaves no rows."
        )
    return (
        kept,
        f"Dropped {len(left_out)} of {len(rows)} rows of {source} without a value for {names} "
        "(dataset.missing_columns: drop)",
    )


def _lacking_message(
    source: str, rows: list[dict[str, Any]], tmpl: DataTemplate, lacking: dict[str, list[int]]
) -> str:
    name, found = next(iter(lacking.items()))
    first = ", ".join(str(i + 1) for i in found[:5]) + (", ..." if len(found) > 5 else "")
    return (
        f"{len(found)} of {len(rows)} rows of {source} have no value for {name!r}, which "
        f"{template_columns(tmpl)[name]} uses (rows {first}); give every row one, or set dataset.missing_columns: "
        "drop to leave those rows out."
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
    tools: list[dict[str, Any]] | None = None,
    system_text: str = "",
) -> list[Prompt]:
    """Render each row, apply the chat template, tokenize once. A prompt over max_prompt_tokens is cut from the
    left (which can cut the system prompt), or with `drop_long` left out. `tools` (JSON schemas) go to the chat
    template; `system_text` is added to the system prompt (the tools, for a template that ignores them)."""
    if not rows:
        raise ConfigError("The dataset has no rows; check dataset.path, dataset.split and dataset.limit.")
    lacking = rows_lacking(rows, tmpl)  # complete_rows names the file; this keeps "None" out of any prompt
    if lacking:
        raise ConfigError(_lacking_message("the dataset", rows, tmpl, lacking))
    instruction, user, output = (_ENV.from_string(s) for s in (tmpl.instruction, tmpl.input, tmpl.output))
    prompts: list[Prompt] = []
    dropped: list[int] = []  # token counts of the prompts left out
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": _render(user, "input", row, i)}]
        system = "\n\n".join(
            t for t in (_render(instruction, "instruction", row, i), system_text) if t.strip()
        )
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
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
                reference=reference_answer(_render(output, "output", row, i)),
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


def training_prompts(
    template: Template, tokenizer: Any, *, tools: list[dict[str, Any]] | None = None, system_text: str = ""
) -> tuple[list[Prompt], int, str | None]:
    """The training split's prompts, how many were dropped as too long (long_prompts: drop), and the note on
    rows left out for lacking a column (None: none were)."""
    c, ds = template.config, template.dataset
    rows, note = complete_rows(load_rows(ds), template.template, ds)
    prompts = build_prompts(
        rows,
        template.template,
        tokenizer,
        max_prompt_tokens=c.maximum_sequence_length - c.maximum_completion_length,
        drop_long=c.long_prompts == "drop",
        tools=tools,
        system_text=system_text,
    )
    return prompts, len(rows) - len(prompts), note


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

    @classmethod
    def for_run(cls, num_prompts: int, c: Any, env: Any) -> PromptSampler:
        """This rank's order of a run's prompts (c: the TrainConfig, env: the DistEnv)."""
        return cls(
            num_prompts, batch_size=c.batch_size, seed=c.seed, rank=env.rank, world_size=env.world_size
        )

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
