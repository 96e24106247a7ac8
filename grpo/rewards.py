"""Reward functions. Every one has the same signature, the one user functions implement too:

    def my_reward(completions: list[str], references: list[str], **kwargs) -> list[float]

`completions[i]` is the decoded text of sample i, `references[i]` its prompt's reference answer. kwargs holds
`prompts` (list[str], chat-formatted), `rows` (list[dict], the dataset rows) and `tags` (a `Tags` with the
template's four tag strings). Accept **kwargs so that new keys do not break your function.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from grpo.config import ConfigError, TrainConfig

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


BUILTIN: dict[str, RewardFn] = {
    f.__name__: f for f in (correctness, int_answer, strict_format, soft_format, tag_count, answer_mentioned)
}


# ---------------------------------------------------------------- registry
@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


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


def resolve_rewards(entries: list[Any]) -> list[Reward]:
    """Entries are 'name', 'pkg.mod:fn', or {name: ..., weight: ...}; checked before anything heavy loads."""
    rewards = []
    for i, entry in enumerate(entries):
        where = f"config.rewards[{i}]"
        weight: Any = 1.0
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "weight"}
            if "name" not in entry or unknown:
                raise ConfigError(
                    f"{where} = {entry!r}: a mapping needs 'name' and may have 'weight', nothing else."
                )
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
        rewards.append(Reward(entry, fn, float(weight)))
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
            values = r.fn(completions, references, **kwargs)
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
            r.fn(completions[i : i + 1], references[i : i + 1], **one)
        except Exception as e:
            return (
                f"Reward function {r.name!r} raised {type(e).__name__}: {e}\n"
                f"on completion {i}:\n{completions[i]!r}"
            )
    return f"Reward function {r.name!r} raised {type(error).__name__}: {error}"
