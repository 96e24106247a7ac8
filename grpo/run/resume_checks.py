"""Whether a checkpoint may be resumed by this template, before anything loads: the fields that change the
math must match (grpo/config/schema.py marks the others `resume_safe`), the global batch must stay the same,
and the run must not be past max_steps already; and how a damaged checkpoint file reads as one reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from grpo.config import RESUME_SAFE_FIELDS, ConfigError, Template


class UnreadableCheckpoint(Exception):
    """A checkpoint file that exists but does not load: truncated, corrupt, or from a different model."""


def reading(path: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as e:  # any failure to read a file of a complete checkpoint means the file is damaged
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpoint(f"{path.name} does not load: {reason}") from e


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def math_differences(saved: dict[str, Any], current: Template) -> list[str]:
    """Fields whose values differ between the checkpoint's template and this run's, ignoring the safe ones. A
    field the checkpoint lacks (saved by an older version) counts with its default, which that version used."""
    a, b = {**_flatten(asdict(Template())), **_flatten(saved)}, _flatten(asdict(current))
    return sorted(k for k in set(a) | set(b) if k not in RESUME_SAFE_FIELDS and a.get(k) != b.get(k))


def check_compatible(path: Path, current: Template, *, force: bool, world_size: int = 1) -> None:
    """Refuse a resume whose template changes the math. batch_size is per process: a different process count
    is fine as long as the global batch (batch_size x processes) stays the same."""
    saved = reading(
        path / "template.yaml", lambda: dict(yaml.safe_load((path / "template.yaml").read_text()))
    )
    diffs = math_differences(saved, current)
    state = reading(path / "trainer_state.json", lambda: read_trainer_state(path))
    saved_world, step, max_steps = (
        int(state.get("world_size", 1)),
        int(state["step"]),
        current.config.max_steps,
    )
    if 0 < max_steps < step:  # the loop would not run, and the model saved at `step` be overwritten
        raise ConfigError(
            f"Cannot resume from {path}: the run is at step {step}, past max_steps = {max_steps}, and resuming "
            f"would overwrite its model and drop the metrics of steps {max_steps + 1}-{step}; raise max_steps "
            f"above {step} or train into a new output_dir."
        )
    if saved["config"]["batch_size"] * saved_world == current.config.batch_size * world_size:
        diffs = [d for d in diffs if d != "config.batch_size"]
    if diffs and not force:
        raise ConfigError(
            f"Cannot resume from {path}: the template differs in fields that change the run "
            f"({', '.join(diffs)}); set force_resume=true to resume anyway."
        )
