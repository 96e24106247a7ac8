"""Which sampler draws the rollouts: one entry per `rollout_engine` (vLLM's two `vllm_mode`s are two entries),
each the class that implements grpo/rollout/sampler.py's contract, imported only when the config names it, so
vllm is never imported unless chosen. The table itself is grpo/rollout/samplers.py: a new sampler is its own file plus one line there
(`rollout_engine` and `vllm_mode` accept the names it lists).

The trainer calls the three entry points in order: `check_sampler` before anything loads, `connect_sampler`
before the model loads, `start_sampler` once the policy is built (and restored, on a resume).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpo.errors import ConfigError
from grpo.rollout.samplers import SAMPLERS

if TYPE_CHECKING:
    from grpo.config import Template, TrainConfig
    from grpo.model.precision import SamplingWeights
    from grpo.parallel.launch import DistEnv
    from grpo.rollout.sampler import Sampler


def sampler_name(c: TrainConfig) -> str:
    """The entry the config names: its rollout_engine, and for vllm its mode."""
    return f"vllm/{c.vllm_mode}" if c.rollout_engine == "vllm" else c.rollout_engine


def sampler_class(c: TrainConfig) -> Any:
    """The chosen sampler's class, its module imported now; a name without an entry is refused in one
    sentence that names the field and the values it allows."""
    name = sampler_name(c)
    if name not in SAMPLERS:
        raise ConfigError(unknown_sampler(c, name))
    module, _, cls = SAMPLERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def unknown_sampler(c: TrainConfig, name: str) -> str:
    engine, _, mode = name.partition("/")
    engines = sorted({n.partition("/")[0] for n in SAMPLERS})
    if engine not in engines:
        field, value, allowed = "rollout_engine", engine, engines
    else:  # a known engine whose mode has no entry
        field, value = f"{engine}_mode", mode
        allowed = sorted(n.partition("/")[2] for n in SAMPLERS if n.startswith(engine + "/"))
    return f"config.{field} = {value!r} names no sampler: use one of {', '.join(allowed)}."


def check_sampler(c: TrainConfig, device: torch.device, world_size: int) -> None:
    """Raise ConfigError before anything loads when the chosen sampler cannot run here."""
    problem = sampler_class(c).problem(c, device=device, world_size=world_size)
    if problem is not None:
        raise ConfigError(problem)


def connect_sampler(template: Template, output_dir: Path, env: DistEnv) -> Sampler | None:
    """A sampler reached before any model loads (vllm_mode server: up, and free for this run), else None."""
    return sampler_class(template.config).connect(template, output_dir=output_dir, env=env)


def start_sampler(
    template: Template,
    *,
    model: torch.nn.Module,
    policy: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    version: int,
    connected: Sampler | None,
    pad_id: int,
    sampling_weights: SamplingWeights | None,
) -> Sampler:
    """The chosen sampler holding `model`'s weights as those of step `version`: `model` is the bare module,
    `policy` what FSDP wraps, `connected` what connect_sampler returned, `sampling_weights` the bf16 copy."""
    return sampler_class(template.config).start(
        template,
        model=model,
        policy=policy,
        device=device,
        dtype=dtype,
        version=version,
        connected=connected,
        pad_id=pad_id,
        sampling_weights=sampling_weights,
    )
