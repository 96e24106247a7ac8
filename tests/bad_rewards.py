"""A user reward function that always fails: the job queue tests use it to make a job fail mid-run."""

from __future__ import annotations

from typing import Any


def explode(completions: list[str], references: list[str], **_: Any) -> list[float]:
    raise ValueError("boom: this reward always fails")
