"""The sampler contract: what training, evaluation and multi-turn rollouts see of whoever draws the samples.

A sampler takes prompt token ids and `SamplingSettings` and returns a `Rollout` (grpo/rollout/generate.py); after
each step's optimizer updates it is handed the new weights. Every sampler holds the weights of one training step
(`version`) and refuses to sample for any other, so a forgotten weight update fails loudly instead of training
on samples from a stale policy. Ours is grpo/rollout/decoding/torch_sampler.py; the vLLM engines are in
grpo/rollout/engines/; grpo/rollout/registry.py picks one from the config.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from grpo.rollout.generate import Rollout, SamplingSettings

if TYPE_CHECKING:
    from grpo.config import Template, TrainConfig
    from grpo.model.precision import SamplingWeights
    from grpo.parallel.launch import DistEnv


class Sampler(Protocol):
    version: int  # the training step whose weights it holds
    startup_s: float  # its start and its latest weight update, for scripts/bench.py
    push_s: float

    def sample(
        self,
        prompts: list[list[int]],
        settings: SamplingSettings,
        *,
        num_generations: int,
        generator: torch.Generator | None,
        version: int,
    ) -> Rollout:
        """G = num_generations samples of each prompt, the G of a prompt contiguous, drawn from the weights of
        step `version` with the random stream `generator`."""
        ...

    def update_weights(self, model: torch.nn.Module, *, version: int) -> None:
        """After a step's optimizer updates: sample from `model`'s weights as those of step `version`."""
        ...

    def gathered(self) -> AbstractContextManager[None]:
        """A block in which every rank holds the full weights, for rollouts that only some ranks run (the
        evaluation on rank 0) or that run a rank-dependent number of turns; `sample` inside reuses them."""
        ...

    def close(self) -> None:
        """At the end of the run: release what the sampler holds (a vLLM server is left free)."""
        ...


class SamplerBase:
    """What the samplers share: the step whose weights they hold and the refusal of any other, the timings,
    and the defaults of the calls that most samplers do not need. The class methods are the registry's
    (grpo/rollout/registry.py): the checks before anything loads, the connection before the model loads, and
    the start once it has."""

    holder = "the sampler"  # how the refusal names it

    def __init__(self, *, version: int):
        self.version = version
        self.startup_s = self.push_s = 0.0

    def require_version(self, version: int) -> None:
        if version != self.version:
            raise RuntimeError(
                f"{self.holder} holds the weights of step {self.version}, not those of step {version}: "
                "update its weights after every optimizer step"
            )

    def gathered(self) -> AbstractContextManager[None]:
        return nullcontext()  # an engine holds its own copy of the weights

    def close(self) -> None:
        """Nothing to release by default: a colocated sampler ends with the process."""

    @classmethod
    def problem(cls, c: TrainConfig, *, device: torch.device, world_size: int) -> str | None:
        """The one-sentence reason this sampler cannot run here, or None."""
        return None

    @classmethod
    def connect(cls, template: Template, *, output_dir: Path, env: DistEnv) -> Any:
        """A sampler reached before any model loads (a server), or None."""
        return None

    @classmethod
    def start(
        cls,
        template: Template,
        *,
        model: torch.nn.Module,
        policy: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        version: int,
        connected: Any,
        pad_id: int,
        sampling_weights: SamplingWeights | None,
    ) -> Sampler:
        """The sampler, holding `model`'s weights as those of step `version`."""
        raise NotImplementedError
