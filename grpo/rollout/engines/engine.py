"""What every rollout engine shares (grpo/rollout/engines/vllm_engine.py colocated,
grpo/rollout/engines/vllm_server.py behind HTTP): the sampler contract on top of an engine's own sampling, the
policy as the plain state dict an engine loads, the seeds drawn from our generator, and the conversion of an
engine's completions into our `Rollout`."""

from __future__ import annotations

from typing import Any

import torch

from grpo.model.lora import lora_layers, merged_state_dict
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import full_state_dict
from grpo.rollout.generate import Rollout, SamplingSettings, left_pad
from grpo.rollout.sampler import SamplerBase


def policy_weights(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """The policy as a plain HF state dict: merged for LoRA, gathered to rank 0 under FSDP (every rank calls).
    Tied embeddings keep lm_head.weight: without it vLLM's in-place reload puts the old output layer back
    (measured: a gap of 27 nats in the log-probs after moving the embedding)."""
    state = full_state_dict(model, env)  # None without FSDP; {} on the ranks other than 0
    if state == {}:
        return state
    return merged_state_dict(model, state) if lora_layers(model) else (state or model.state_dict())


def prompt_seeds(generator: torch.Generator | None, prompts: int, num_generations: int) -> list[int]:
    """One vLLM seed per prompt, drawn from our generator so a run is reproducible and a resumed one goes on
    with the same stream. vLLM seeds a prompt's G samples seed, seed + 1, ..., seed + G - 1; samples that
    shared a seed would draw the same noise, so the prompts' seeds are G apart."""
    if generator is None:
        base = int(torch.randint(0, 2**31 - 1, ()))
    else:
        base = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
    return [(base + i * num_generations) % 2**31 for i in range(prompts)]


class EngineSampler(SamplerBase):
    """A rollout engine as a sampler (grpo/rollout/sampler.py): our settings as vLLM's, the seeds from our
    generator, and its completions as our `Rollout` on `device`, padded with `pad_id` (both set at the start)."""

    holder = "the vLLM engine"

    def __init__(self, *, version: int):
        super().__init__(version=version)
        self.device, self.pad_id = torch.device("cpu"), 0

    def sample(
        self,
        prompts: list[list[int]],
        settings: SamplingSettings,
        *,
        num_generations: int,
        generator: torch.Generator | None,
        version: int,
    ) -> Rollout:
        """The random seeds come from `generator`, so a run is reproducible and a resumed one continues the
        same stream."""
        self.require_version(version)
        greedy = settings.greedy
        seeds = prompt_seeds(generator, len(prompts), num_generations)
        groups = self.sample_groups(prompts, vllm_settings(settings, num_generations), seeds)
        samples = [s for group in groups for s in (group * num_generations if greedy else group)]
        return to_rollout(
            prompts,
            samples,
            num_generations=num_generations,
            eos_ids=list(settings.end_ids),
            pad_id=self.pad_id,
            device=self.device,
        )

    def sample_groups(
        self, prompts: list[list[int]], settings: dict[str, Any], seeds: list[int]
    ) -> list[list[tuple[list[int], list[float] | None]]]:
        """Each prompt's samples with vLLM's sampling `settings` and the prompt's seed, in the order of their
        index: the token ids and, when sampled, each one's log-prob."""
        raise NotImplementedError


def vllm_settings(settings: SamplingSettings, num_generations: int) -> dict[str, Any]:
    """Our settings as vLLM's SamplingParams (and the server's request fields)."""
    out: dict[str, Any] = {
        # vLLM refuses G > 1 greedy copies: one sample, which the caller repeats
        "n": 1 if settings.greedy else num_generations,
        "max_tokens": settings.max_new_tokens,
        "stop_token_ids": list(settings.end_ids),
        "ignore_eos": not settings.end_ids,  # as our decoder: no end tokens, every completion runs to the limit
    }
    if settings.greedy:
        out["temperature"] = 0.0
    else:
        filters = {k: getattr(settings, k) for k in ("temperature", "top_p", "top_k", "min_p")}
        out.update(**filters, logprobs=0)
    return out


def to_rollout(
    prompts: list[list[int]],
    samples: list[tuple[list[int], list[float] | None]],
    *,
    num_generations: int,
    eos_ids: list[int],
    pad_id: int,
    device: torch.device,
) -> Rollout:
    """vLLM's completions (token ids, and their log-probs when sampled) as a Rollout with our padding: the end
    token is part of the completion, pad_id after it, and a completion without one is truncated."""
    ids, mask = left_pad(prompts, pad_id, device)  # [B, P]
    n, width = len(samples), max(len(tokens) for tokens, _ in samples)
    completion = torch.full((n, width), pad_id, dtype=torch.long)  # [N, T]
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    logps = torch.zeros((n, width), dtype=torch.float32) if samples[0][1] is not None else None
    truncated = torch.zeros(n, dtype=torch.bool)
    eos = set(eos_ids)
    for i, (tokens, token_logps) in enumerate(samples):
        completion[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[i, : len(tokens)] = 1
        truncated[i] = tokens[-1] not in eos
        if logps is not None:
            logps[i, : len(tokens)] = torch.tensor(token_logps, dtype=torch.float32)
    return Rollout(
        prompt_ids=ids.repeat_interleave(num_generations, dim=0),
        prompt_mask=mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion.to(device),
        completion_mask=completion_mask.to(device),
        truncated=truncated.to(device),
        group_size=num_generations,
        sampling_logps=None if logps is None else logps.to(device),
    )
