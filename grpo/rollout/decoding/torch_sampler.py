"""`rollout_engine: torch`: our decoders as a sampler. `generate` (grpo/rollout/generate.py) draws the samples
with the decoder `decode_impl` picks (grpo/rollout/decoding/decoders.py), from the policy itself or, under
bf16-mixed, from its bf16 copy (grpo/model/precision.py), which each weight update refreshes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from grpo.parallel.wrapping import full_params
from grpo.rollout.generate import Rollout, SamplingSettings, generate
from grpo.rollout.sampler import SamplerBase

if TYPE_CHECKING:
    from grpo.config import Template
    from grpo.model.precision import SamplingWeights


class TorchSampler(SamplerBase):
    """Decodes with `model` (or its bf16 copy `sampling_weights`); `policy` is the module FSDP wraps, whose
    sharded weights are gathered for the rollout."""

    holder = "our decoder"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_id: int,
        policy: torch.nn.Module | None = None,
        decode_impl: str = "auto",
        sampling_weights: SamplingWeights | None = None,
        version: int = 0,
    ):
        super().__init__(version=version)
        self.model, self.policy = model, policy if policy is not None else model
        self.pad_id, self.decode_impl, self.sampling_weights = pad_id, decode_impl, sampling_weights
        self.depth = 0  # nested gathered() blocks: only the outermost gathers
        if sampling_weights is not None:
            sampling_weights.refresh()  # the copy was made before a resume restored the weights

    @classmethod
    def start(
        cls,
        template: Template,
        *,
        model: torch.nn.Module,
        policy: torch.nn.Module,
        version: int,
        pad_id: int,
        sampling_weights: SamplingWeights | None,
        **_: Any,  # the device and dtype are the model's; nothing to connect to
    ) -> TorchSampler:
        return cls(
            model,
            pad_id=pad_id,
            policy=policy,
            decode_impl=template.config.decode_impl,
            sampling_weights=sampling_weights,
            version=version,
        )

    @property
    def decoding_model(self) -> torch.nn.Module:
        return self.model if self.sampling_weights is None else self.sampling_weights.model

    def sample(
        self,
        prompts: list[list[int]],
        settings: SamplingSettings,
        *,
        num_generations: int,
        generator: torch.Generator | None,
        version: int,
    ) -> Rollout:
        self.require_version(version)  # the bf16 copy holds that step's weights only after an update
        with self.gathered():
            return generate(
                self.decoding_model,
                prompts,
                settings,
                num_generations=num_generations,
                pad_id=self.pad_id,
                generator=generator,
                decode_impl=self.decode_impl,
            )

    def update_weights(self, model: torch.nn.Module, *, version: int) -> None:
        """The decoder reads the policy's own weights; only the bf16 copy needs them copied in."""
        if self.sampling_weights is not None:
            self.sampling_weights.refresh()
        self.version = version

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """FSDP: every parameter gathered once for the block (grpo/parallel/wrapping.py); a block inside one
        reuses it, so a rollout of several turns or chunks gathers once, as every rank must."""
        if self.depth:
            yield
            return
        self.depth += 1
        try:
            with full_params(self.policy):
                yield
        finally:
            self.depth -= 1
