"""Building a run's models once: the policy (with LoRA, gradient checkpointing, mixed precision), the KL
reference, the DDP / FSDP2 wrapping, the bf16 copy the rollout samples from, the optimizer and its schedule.

The switches interact, and this is the one place that reads them together:
- LoRA (ours, or unsloth's) trains fp32 adapters over a frozen base that needs only the compute dtype; its KL
  reference is the same model with the adapters off, never a second copy.
- Full fine-tuning with beta > 0 keeps a frozen copy of the policy, made before the wrapping.
- Gradient checkpointing (and unsloth) take the concatenated log-prob pass instead of the shared-prefix one.
- bf16-mixed autocasts the passes, except under FSDP, which gathers bf16 weights itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from grpo.config import Template
from grpo.model.loading import enable_checkpointing, has_dropout, load_model
from grpo.model.logprobs import CompletionLogprobs
from grpo.model.lora import AdaptersDisabled, inject_lora
from grpo.model.precision import Precision, SamplingWeights
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import wrap_models
from grpo.rollout.decoding.decoders import require_decode_impl
from grpo.run.cpu_memory import keep_freed_memory
from grpo.schedule import build_optimizer


@dataclass
class RunModels:
    """What a run trains and compares against, built once."""

    model: torch.nn.Module  # the policy's own module (adapters injected), unwrapped
    policy: Any  # CompletionLogprobs over `model`, possibly wrapped by DDP / FSDP2
    ref: Any  # the reference's log-probs (a frozen copy, or the policy with its adapters off); None: beta 0
    sampling_weights: SamplingWeights | None  # bf16-mixed: the copy the rollout samples from
    optimizer: torch.optim.Optimizer
    scheduler: Any
    lora: bool  # only adapters train
    shared_prefix: bool  # the log-prob passes run each distinct prompt once
    old_from_first_update: bool  # no dropout in training forwards: the first forward is the old policy


def prepare_device(c: Any, device: torch.device) -> None:
    """What the device needs before anything loads: on a CPU, freed memory kept mapped; for unsloth, CUDA and
    the package (c: the TrainConfig)."""
    if device.type == "cpu":
        keep_freed_memory()  # no page faults on memory the last step freed (grpo/run/cpu_memory.py)
    if c.backend == "unsloth":
        from grpo.model.unsloth_backend import require_unsloth

        require_unsloth(device)  # no CUDA or no package: stop before anything loads


def load_policy(template: Template, device: torch.device, precision: Precision) -> torch.nn.Module:
    """The policy's module: unsloth's LoRA model, or the model with our adapters injected when use_lora."""
    c = template.config
    if c.backend == "unsloth":  # unsloth always trains a LoRA adapter (its own PEFT layers)
        from grpo.model.unsloth_backend import load_unsloth_model

        return load_unsloth_model(template, dtype=precision.compute)
    dtype = precision.compute if c.use_lora else precision.weights
    model = load_model(template.model, device=device, dtype=dtype)
    if c.use_lora:
        inject_lora(
            model,
            r=c.lora_r,
            alpha=c.lora_alpha,
            dropout=c.lora_dropout,
            target_modules=c.lora_target_modules,
        )
    return model


def build_models(
    template: Template, env: DistEnv, device: torch.device, precision: Precision, *, total_updates: int
) -> RunModels:
    c = template.config
    torch.manual_seed(c.seed)  # the adapters' initialisation
    lora = c.use_lora or c.backend == "unsloth"
    model = load_policy(template, device, precision)
    if lora or c.gradient_checkpointing:
        # from_pretrained returns eval mode; LoRA dropout acts only in training forwards, and
        # transformers recomputes (checkpoints) layers only in training mode.
        model.train()
    # The shared-prefix pass writes each layer's keys/values into a cache during forward, which a
    # recomputing (checkpointed) layer would write twice; unsloth patches the forward in ways it may not
    # survive. Both take the concatenated pass instead.
    shared_prefix = c.backend != "unsloth" and not c.gradient_checkpointing
    if c.gradient_checkpointing and c.backend != "unsloth":  # unsloth turns on its own variant
        enable_checkpointing(model)
    mixed = precision.mixed and c.backend != "unsloth"
    autocast = precision.compute if mixed and not env.fsdp else None
    head = {"temperature": c.temperature, "impl": c.logprob_impl, "fp32_head": c.cast_lm_head_to_fp32}
    policy = CompletionLogprobs(model, autocast=autocast, **head)
    ref = None
    if c.beta > 0 and not lora:  # frozen: the compute dtype is all it needs
        ref_model = copy.deepcopy(model).to(precision.compute).eval().requires_grad_(False)
        ref = CompletionLogprobs(ref_model, autocast=autocast, **head)
    # torchrun: DDP around the policy, or FSDP2 around policy and reference (grpo/parallel/wrapping.py).
    policy, ref = wrap_models(policy, ref, env, device=device, compute_dtype=precision.compute)
    if c.beta > 0 and lora:
        ref = AdaptersDisabled(policy, model)
    require_decode_impl(c.decode_impl, model, device, precision.compute, c.maximum_sequence_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, c, total_updates=total_updates)
    return RunModels(
        model=model,
        policy=policy,
        ref=ref,
        # Sampling reads every weight per token: from a bf16 copy, not the fp32 master weights. FSDP gathers
        # bf16 weights for the rollout anyway, and a LoRA base is bf16 already.
        sampling_weights=SamplingWeights(model, precision.compute)
        if mixed and not lora and not env.fsdp
        else None,
        optimizer=optimizer,
        scheduler=scheduler,
        lora=lora,
        shared_prefix=shared_prefix,
        # With dropout active in training forwards, the old-policy log-probs need their own no-grad pass.
        old_from_first_update=not (model.training and has_dropout(model)),
    )
