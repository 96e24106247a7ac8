"""Reward functions for the distributed tests (loaded as tests.dist_rewards:NAME)."""

from __future__ import annotations

import os
import time
from typing import Any


def fails_on_rank_one(completions: list[str], references: list[str], **_: Any) -> list[float]:
    if os.environ.get("RANK") == "1":
        raise ValueError("boom on rank 1")
    return [0.0 for _ in completions]


def hangs_on_rank_one(completions: list[str], references: list[str], **_: Any) -> list[float]:
    if os.environ.get("RANK") == "1":
        time.sleep(3600)
    return [0.0 for _ in completions]
