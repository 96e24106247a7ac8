"""What every rollout engine shares (grpo/rollout/vllm_engine.py colocated, grpo/rollout/vllm_server.py behind
HTTP): the trainer's view of an engine, the policy as the plain state dict an engine loads, the seeds drawn from
our generator, and the conversion of an engine's completions into our `Rollout`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from grpo.model.lora import lora_layers, merged_state_dict
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import full_state_dict
from grpo.rollout.generate import Rollout, left_pad


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


class EngineSampler:
    """What the trainer sees of a rollout engine: the step whose weights it holds, a sampler refused for any
    other step, a push after every optimizer step, and a close at the end."""

    def __init__(self, *, version: int):
        self.version = version
        self.startup_s = self.push_s = 0.0  # the engine's start and the latest push, for the benchmark

    def sampler(self, version: int) -> Callable[..., Rollout]:
        """A function with grpo.rollout.generate.generate's signature that samples on this engine, for step
        `version`; refused when the engine holds another step's weights."""
        if version != self.version:
            raise RuntimeError(
                f"the vLLM engine holds the weights of step {self.version}, not those of step {version}: "
                "push the policy after every optimizer step"
            )
        return self.generate

    def generate(
        self,
        model: torch.nn.Module | None,
        prompts: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        eos_ids: list[int],
        pad_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        decode_impl: str = "auto",  # our decoder's setting; the engine has its own kernels
        check_done_every: int | None = None,
    ) -> Rollout:
        """G samples per prompt, as grpo.rollout.generate.generate returns them. `model` gives the device only
        (the engine holds the pushed weights); the random seeds come from `generator`, so a run is reproducible
        and a resumed one continues the same stream."""
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        settings: dict[str, Any] = {
            "n": 1 if greedy else num_generations,  # vLLM refuses G > 1 greedy copies: made below instead
            "max_tokens": max_new_tokens,
            "stop_token_ids": list(eos_ids),
            "ignore_eos": not eos_ids,  # as our decoder: no end tokens, every completion runs to the limit
        }
        if greedy:
            settings["temperature"] = 0.0
        else:
            settings.update(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, logprobs=0)
        groups = self.sample_groups(prompts, settings, prompt_seeds(generator, len(prompts), num_generations))
        samples = [s for group in groups for s in (group * num_generations if greedy else group)]
        return to_rollout(
            prompts, samples, num_generations=num_generations, eos_ids=eos_ids, pad_id=pad_id, device=device
        )

    def sample_groups(
        self, prompts: list[list[int]], settings: dict[str, Any], seeds: list[int]
    ) -> list[list[tuple[list[int], list[float] | None]]]:
        """Each prompt's samples with vLLM's sampling `settings` and the prompt's seed, in the order of their
        index: the token ids and, when sampled, each one's log-prob."""
        raise NotImplementedError

    def push(self, model: torch.nn.Module, *, version: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to release by default: a colocated engine ends with the process."""


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
