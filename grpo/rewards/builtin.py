"""The built-in reward functions, and the answer parsing they share; each has the signature of the contract in
grpo/rewards/__init__.py."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from grpo.config import TrainConfig
from grpo.rewards.learned_model import reward_model

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


def final_answer(
    completions: list[str], references: list[str], *, tags: Tags, messages: list[list[dict]], **_: Any
) -> list[float]:
    """1.0 when the final reply's answer equals the reference: the text inside its answer tags when it has them,
    else its last number (the "flexible extract" of GSM8K evaluations). With tools, the final reply is the one
    after the last tool result, so the credit is for reporting what the tools computed."""
    out = []
    for conversation, ref in zip(messages, references):
        replies = [m["content"] for m in conversation if m["role"] == "assistant"]
        last = replies[-1] if replies else ""
        answer = extract_answer(last, tags)
        if answer is None:
            numbers = _NUMBER.findall(last)
            answer = numbers[-1] if numbers else None
        out.append(1.0 if answer is not None and answers_match(answer, ref) else 0.0)
    return out


def tool_used(
    completions: list[str], references: list[str], *, tool_calls: list[list[dict]], **_: Any
) -> list[float]:
    """0.5 when the sample made at least one tool call that returned without error: partial credit for using
    the tools at all (docs/tools.md)."""
    return [0.5 if any(call["error"] is None for call in calls) else 0.0 for calls in tool_calls]


def tool_answer(
    completions: list[str], references: list[str], *, tool_calls: list[list[dict]], **_: Any
) -> list[float]:
    """0.5 when a tool call returned the reference number: partial credit for the call that computes the answer.
    Unlike tool_used it cannot be earned by a call that runs but computes nothing (a bare number to the
    calculator), which a policy trained on tool_used alone learns to make."""
    out = []
    for calls, ref in zip(tool_calls, references):
        r = normalize_number(ref)
        hit = r is not None and any(
            call["error"] is None and normalize_number(str(call["result"]).strip()) == r for call in calls
        )
        out.append(0.5 if hit else 0.0)
    return out


def overlong_buffer_problem(buffer: Any, max_completion_length: int | None) -> str | None:
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
    problem = overlong_buffer_problem(buffer, max_completion_length)
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
        final_answer,
        tool_used,
        tool_answer,
        overlong_penalty,
        reward_model,
    )
}
