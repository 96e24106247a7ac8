"""How a template field is declared: its description, the values it allows beyond its type (`Check`), and
whether a resume may change it. The fields themselves are in schema.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """The values a field allows beyond its type: `ok(value)` must hold, else `allowed` tells the user why."""

    ok: Callable[[Any], bool]
    allowed: str


AT_LEAST_1 = Check(lambda v: v >= 1, "it must be at least 1")
ZERO_OR_MORE = Check(lambda v: v >= 0, "it must be 0 or more")
OFF_OR_MORE = Check(lambda v: v >= 0, "it must be 0 (off) or more")
POSITIVE = Check(lambda v: v > 0, "it must be positive")
NOT_BLANK = Check(lambda v: v.strip() != "", "it must not be empty")
UNIT = Check(lambda v: 0 < v <= 1, "it must be in (0, 1]")
NULL_OR_COUNT = Check(lambda v: v is None or v >= 1, "use null or a positive count")
# Seconds: waits run through threading and select, whose limits overflow far below 1e10 s; a week is plenty.
WEEK = 7 * 24 * 3600
TIMEOUT = Check(lambda v: 0 < v <= WEEK, f"it must be positive and at most {WEEK} seconds (a week)")
TIMEOUT_OR_OFF = Check(
    lambda v: 0 <= v <= WEEK, f"it must be 0 (no limit) or at most {WEEK} seconds (a week)"
)
SEED = Check(
    lambda v: 0 <= v < 2**63, "it must be in [0, 2**63), the range every generator seeded from it takes"
)
# Prompt + completion tokens: beyond a million, no model's context and no memory for its activations reach.
MAX_TOKENS = 2**20
SEQUENCE_LENGTH = Check(lambda v: 1 <= v <= MAX_TOKENS, f"it must be in [1, {MAX_TOKENS}]")
URL = Check(
    lambda v: v is None or v.startswith(("http://", "https://")), "use null or an http:// or https:// URL"
)


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    above = (lambda v: v > low) if low_open else (lambda v: v >= low)
    below = (lambda v: v < high) if high_open else (lambda v: v <= high)
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Check(lambda v: above(v) and below(v), f"it must be in {span}")


def doc(text: str, *, check: Check | None = None, resume_safe: bool = False, **kw: Any) -> Any:
    """A field with its description and, next to it, what it allows (checked before anything loads, with the
    relations between fields in grpo/config/checks.py) and whether a resume may change it: resume_safe fields
    change how a run is carried out or logged, not what it computes."""
    return field(metadata={"doc": text, "check": check, "resume_safe": resume_safe}, **kw)


def leaf_paths(root: type, sections: dict[str, type]) -> dict[str, tuple[str, ...]]:
    """Every settable field of the dataclass `root` as dotted path -> path tuple, the fields named in
    `sections` opened one level (config.max_steps -> ("config", "max_steps"))."""
    paths: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(root):
        if f.name in sections:
            paths.update(
                {f"{f.name}.{sub.name}": (f.name, sub.name) for sub in dataclasses.fields(sections[f.name])}
            )
        else:
            paths[f.name] = (f.name,)
    return paths
