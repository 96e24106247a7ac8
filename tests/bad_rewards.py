"""User reward functions that break the reward contract (loaded as tests.bad_rewards:NAME): one that always
raises (the job queue tests use it to make a job fail mid-run), one that scores a NaN, one that returns text,
and one that never returns."""

from __future__ import annotations

import math
import time
from typing import Any


def explode(completions: list[str], references: list[str], **_: Any) -> list[float]:
    raise ValueError("boom: this reward always fails")


def nan_on_second(completions: list[str], references: list[str], **_: Any) -> list[float]:
    """A division by zero turned into NaN, on the second completion only."""
    return [math.nan if i == 1 else 0.5 for i in range(len(completions))]


def text(completions: list[str], references: list[str], **_: Any) -> str:
    """A grade as text instead of numbers: float() would read it character by character."""
    return "good"


def hangs(completions: list[str], references: list[str], **_: Any) -> list[float]:
    """Waits on something that never answers (an unreachable judge, a lock)."""
    time.sleep(3600)
    return [0.0 for _ in completions]
