"""Which dtype holds the trained weights and which one computes: `config.dtype`.

bf16-mixed (the GPU default) keeps the trained weights and AdamW's state in fp32 and runs the matmuls in bf16.
Pure bf16 weights lose every AdamW step smaller than half a bf16 step of the weight (2^-9 of its size): at a
learning rate of 1e-6 that is almost all of them, and training silently stands still.

Where the bf16 compute comes from:
- the log-prob passes (policy and reference) run under torch.autocast, or, under FSDP, gather their weights
  in bf16 (FSDP's MixedPrecisionPolicy) and then need no autocast;
- the rollout samples from a bf16 copy of the policy, refreshed before each rollout (`SamplingWeights`):
  decoding is bound by reading the weights, and autocast would re-read fp32 weights and write bf16 copies of
  them at every token. Under FSDP the gathered weights already are that copy; with LoRA the frozen base is
  loaded in bf16 and the fp32 adapters cast their input, so neither needs one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # the trained parameters (and so AdamW's state)
    compute: torch.dtype  # matmuls of the log-prob passes and the rollout

    @property
    def mixed(self) -> bool:
        return self.weights != self.compute


def resolve_precision(dtype: str, device: torch.device) -> Precision:
    if dtype == "auto":
        dtype = "bf16-mixed" if device.type == "cuda" else "float32"
    if dtype == "bf16-mixed":
        return Precision(torch.float32, torch.bfloat16)
    pure = getattr(torch, dtype)
    return Precision(pure, pure)


class SamplingWeights:
    """A copy of the policy in the compute dtype to sample from; refresh() copies the current weights in."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.source = model
        self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.pairs = list(zip(self.model.parameters(), model.parameters(), strict=True))

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        self.model.train(self.source.training)  # the rollout sees the mode the policy is in
        torch._foreach_copy_([c for c, _ in self.pairs], [p for _, p in self.pairs])
        return self.model
