"""Reward functions. Every one has the same signature, the one user functions implement too:

    def my_reward(completions: list[str], references: list[str], **kwargs) -> list[float]

`completions[i]` is the decoded text of sample i, `references[i]` its prompt's reference answer. kwargs holds
`prompts` (list[str], chat-formatted), `prompt_messages` (list of the prompt's chat messages, system + user),
`rows` (list[dict], the dataset rows), `tags` (a `Tags` with the template's four tag strings),
`completion_lengths` (list[int], completion tokens) and `max_completion_length` (int,
config.maximum_completion_length). Accept **kwargs so that new keys do not break your function. A template entry
{name: ..., weight: ..., KEY: VALUE} also passes KEY=VALUE to its function on every call.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from grpo.config import ConfigError, TrainConfig
from grpo.reward_model import options_problem as reward_model_options_problem
from grpo.reward_model import reward_model

RewardFn = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Tags:
    think_open: str = "<reasoning>"
    think_close: str = "</reasoning>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"

    @classmethod
    def from_config(cls, c: TrainConfig) -> Tags:
        return cls(c.start_thinking_string, c.end_thinking_string, c.start_answer_string, c.end_answer_string)


def extract_answer(text: str, tags: Tags) -> str | None:
    """The text inside the last complete answer tag pair (across newlines), or None."""
    pattern = re.escape(tags.answer_open) + r"(.*?)" + re.escape(tags.answer_close)
    found = re.findall(pattern, text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def normalize_number(text: str) -> Decimal | None:
    """'1,000' = '1000' = '1000.0' = '$1000'; None when the text is not a single number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(answer: str, reference: str) -> bool:
    a, r = normalize_number(answer), normalize_number(reference)
    if a is not None and r is not None:
        return a == r
    return answer.strip().lower() == reference.strip().lower()


# ---------------------------------------------------------------- built-ins
def correctness(completions: list[str], references: list[str], *, tags: Tags, **_: Any) -> list[float]:
    """2.0 when the answer inside the tags equals the reference (numbers normalised)."""
    out = []
    for text, ref in zip(completions, references):
        answer = extract_answer(text, tags)
        out.append(2.0 if answer is not None and answers_match(answer, ref) else 0.0)
    return out


def int_answer(completions: list[str], references: list[str], *, tags: Tags, **_: Any) -> list[float]:
    """0.5 when the answer inside the tags is an integer."""
    out = []
    for text in completions:
        answer = extract_answer(text, tags)
        value = normalize_number(answer) if answer is not None else None
        out.append(0.5 if value is not None and value == value.to_integral_value() else 0.0)
    return out


def strict_format(completions: list[str], references: list[str], *, tags: Tags, **_: Any) -> list[float]:
    """0.5 when the completion is exactly: think tags on their own lines, then answer tags on their own lines."""
    t = tags
    pattern = (
        rf"\s*{re.escape(t.think_open)}\n.*?\n{re.escape(t.think_close)}\n"
        rf"{re.escape(t.answer_open)}\n.*?\n{re.escape(t.answer_close)}\s*"
    )
    return [0.5 if re.fullmatch(pattern, c, flags=re.DOTALL) else 0.0 for c in completions]


def soft_format(completions: list[str], references: list[str], *, tags: Tags, **_: Any) -> list[float]:
    """0.5 when a think block is followed by an answer block anywhere, whitespace and newlines allowed."""
    t = tags
    pattern = (
        rf"{re.escape(t.think_open)}.*?{re.escape(t.think_close)}\s*"
        rf"{re.escape(t.answer_open)}.*?{re.escape(t.answer_close)}"
    )
    return [0.5 if re.search(pattern, c, flags=re.DOTALL) else 0.0 for c in completions]


def tag_count(completions: list[str], references: list[str], *, tags: Tags, **_: Any) -> list[float]:
    """0.125 for each of the four tags used exactly once; text after the closing answer tag costs 0.001/char."""
    out = []
    for text in completions:
        score = sum(
            0.125
            for tag in (tags.think_open, tags.think_close, tags.answer_open, tags.answer_close)
            if text.count(tag) == 1
        )
        if text.count(tags.answer_close) == 1:
            score -= 0.001 * len(text.split(tags.answer_close)[-1].strip())
        out.append(score)
    return out


def answer_mentioned(completions: list[str], references: list[str], **_: Any) -> list[float]:
    """0.5 when the reference number appears anywhere in the completion: partial credit for small models."""
    out = []
    for text, ref in zip(completions, references):
        r = normalize_number(ref)
        found = r is not None and any(normalize_number(m) == r for m in _NUMBER.findall(text))
        out.append(0.5 if found else 0.0)
    return out


def _buffer_problem(buffer: Any, max_completion_length: int | None) -> str | None:
    """Why `buffer` is not a valid overlong_penalty buffer, or None; max_completion_length None = not known yet."""
    if isinstance(buffer, int) and not isinstance(buffer, bool) and buffer > 0:
        if max_completion_length is None or buffer <= max_completion_length:
            return None
    if max_completion_length is None:
        return f"overlong_penalty buffer = {buffer!r} is not allowed: expected an integer of at least 1."
    return (
        f"overlong_penalty buffer = {buffer!r} is not allowed: expected an integer from 1 to "
        f"max_completion_length ({max_completion_length})."
    )


def overlong_penalty(
    completions: list[str],
    references: list[str],
    *,
    completion_lengths: list[int] | None = None,
    max_completion_length: int | None = None,
    buffer: int | None = None,
    **_: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), by completion length L in tokens.

    With L_max = max_completion_length and B = buffer: 0 when L <= L_max - B, (L_max - B - L) / B inside the
    last B tokens (a straight line from just under 0 down to -1), and -1 from L = L_max on: a completion cut at
    the limit always gets -1. buffer defaults to a fifth of L_max (at least 1), DAPO's 4096 of 20480.
    """
    if completion_lengths is None or max_completion_length is None:
        raise ValueError(
            "overlong_penalty needs completion_lengths and max_completion_length, which grpo.rewards.score "
            "gets from the trainer and evaluator."
        )
    if len(completion_lengths) != len(completions):
        raise ValueError(
            f"overlong_penalty got {len(completion_lengths)} completion_lengths for {len(completions)} completions."
        )
    if buffer is None:
        buffer = max(1, max_completion_length // 5)
    problem = _buffer_problem(buffer, max_completion_length)
    if problem:
        raise ValueError(problem)
    start = max_completion_length - buffer  # the last length that costs nothing
    out = []
    for length in completion_lengths:
        if length <= start:
            out.append(0.0)
        elif length <= max_completion_length:
            out.append((start - length) / buffer)
        else:
            out.append(-1.0)
    return out


BUILTIN: dict[str, RewardFn] = {
    f.__name__: f
    for f in (
        correctness,
        int_answer,
        strict_format,
        soft_format,
        tag_count,
        answer_mentioned,
        overlong_penalty,
        reward_model,
    )
}
# What the trainer and evaluator pass to every reward function; a template entry cannot set these.
PASSED_KWARGS = (
    "completions",
    "references",
    "tags",
    "rows",
    "prompts",
    "completion_lengths",
    "max_completion_length",
    "prompt_messages",
)


# ---------------------------------------------------------------- registry
@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    # The template entry's extra keys, passed to fn as keyword arguments on every call.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, completions: list[str], references: list[str], **kwargs: Any) -> list[float]:
        return self.fn(completions, references, **kwargs, **self.kwargs)


def resolve_function(spec: str, *, field: str) -> Callable[..., Any]:
    """Import 'package.module:function'."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{field} = {spec!r}: write package.module:function.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{field} = {spec!r}: cannot import module {module_name!r} ({e}).") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{field} = {spec!r}: module {module_name!r} has no function {attr!r}.")
    return fn


def _check_reward_kwargs(fn: Callable[..., Any], name: str, options: dict[str, Any], where: str) -> None:
    """Each extra key must be a parameter of `fn` (any key when a user function takes **kwargs) and not one the
    trainer passes. A built-in's **kwargs only swallows the trainer's keys, so it takes its named parameters only."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to check against (a C function)
        params = None
    positional = [p.name for p in params or [] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:2]
    reserved = set(PASSED_KWARGS) | set(positional)
    for key, value in options.items():
        if key in reserved:
            raise ConfigError(f"{where} {key} = {value!r} is not allowed: the trainer passes {key} itself.")
    if params is None or (fn not in BUILTIN.values() and any(p.kind is p.VAR_KEYWORD for p in params)):
        return
    takes = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in reserved
    ]
    for key, value in options.items():
        if key not in takes:
            allowed = f"takes only {', '.join(takes)}" if takes else "takes no keyword arguments"
            raise ConfigError(f"{where} {key} = {value!r} is not allowed: {name} {allowed}.")


def resolve_rewards(entries: list[Any], *, max_completion_length: int | None = None) -> list[Reward]:
    """Entries are 'name', 'pkg.mod:fn', or {name: ..., weight: ..., KEY: VALUE...}, the extra keys passed to the
    function as keyword arguments; checked before anything heavy loads (overlong_penalty's buffer against
    max_completion_length when given)."""
    rewards: list[Reward] = []
    for i, entry in enumerate(entries):
        where = f"config.rewards[{i}]"
        weight: Any = 1.0
        options: dict[str, Any] = {}
        if isinstance(entry, dict):
            if "name" not in entry or not all(isinstance(k, str) for k in entry):
                raise ConfigError(
                    f"{where} = {entry!r}: a mapping needs 'name', may have 'weight', and passes its other "
                    "keys (strings) to the function as keyword arguments."
                )
            options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
            entry, weight = entry["name"], entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where} weight = {weight!r} is not allowed: expected a number.")
        if not isinstance(entry, str):
            raise ConfigError(f"{where} = {entry!r}: name a built-in reward or package.module:function.")
        if ":" in entry:
            fn = resolve_function(entry, field=where)
        elif entry in BUILTIN:
            fn = BUILTIN[entry]
        else:
            raise ConfigError(
                f"{where} = {entry!r} is not a built-in reward; use one of "
                f"{', '.join(BUILTIN)} or package.module:function."
            )
        _check_reward_kwargs(fn, entry, options, where)
        problem = None
        if fn is overlong_penalty and "buffer" in options:
            problem = _buffer_problem(options["buffer"], max_completion_length)
        elif fn is reward_model:
            problem = reward_model_options_problem(options)
        if problem:
            raise ConfigError(f"{where} {problem}")
        # The same function twice (e.g. with other options) is logged apart: reward/<name>, reward/<name>#2.
        repeats = sum(r.fn is fn for r in rewards)
        label = entry if not repeats else f"{entry}#{repeats + 1}"
        rewards.append(Reward(label, fn, float(weight), options))
    return rewards


class RewardError(RuntimeError):
    pass


def score(
    rewards: list[Reward], completions: list[str], references: list[str], **kwargs: Any
) -> torch.Tensor:
    """[N, R] raw scores, one column per reward function. A failing function is named with its input."""
    columns = []
    for r in rewards:
        try:
            values = r(completions, references, **kwargs)
            values = [float(v) for v in values]
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        except Exception as e:
            raise RewardError(_locate_failure(r, completions, references, kwargs, e)) from e
        columns.append(torch.tensor(values, dtype=torch.float32))
    return torch.stack(columns, dim=1)  # [N, R]


def _locate_failure(
    r: Reward, completions: list[str], references: list[str], kwargs: dict[str, Any], error: Exception
) -> str:
    """Re-run one completion at a time to show the user which one broke their function."""
    for i in range(len(completions)):
        one = {
            k: (v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
            for k, v in kwargs.items()
        }
        try:
            r(completions[i : i + 1], references[i : i + 1], **one)
        except Exception as e:
            return (
                f"Reward function {r.name!r} raised {type(e).__name__}: {e}\n"
                f"on completion {i}:\n{completions[i]!r}"
            )
    return f"Reward function {r.name!r} raised {type(error).__name__}: {error}"
