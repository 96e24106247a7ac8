"""The template fields of who samples the rollouts (our decoder or vLLM), of asynchronous rollouts, and of rollouts over several turns
(tools, an environment). TrainConfig in schema.py inherits them, so they are config.<name> like every other
training field; they live here to keep schema.py readable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grpo.config.fields import AT_LEAST_1, NULL_OR_COUNT, TIMEOUT, UNIT, URL, ZERO_OR_MORE, Check, doc
from grpo.rollout.samplers import ROLLOUT_ENGINES, VLLM_MODES


@dataclass
class RolloutSettings:
    decode_impl: Literal["auto", "graph", "packed", "static", "hf"] = doc(
        "How rollouts decode: graph (CUDA graphs on GPU), packed (CPU fp32), static, hf (transformers' "
        "generation path, the slowest and the reference); auto picks the fastest the model and device allow.",
        default="auto",
        resume_safe=True,
    )
    dynamic_sampling: bool = doc(
        "DAPO's dynamic sampling: drop prompts whose G rewards are all equal and sample more prompts until "
        "batch_size informative ones are found (grpo/rollout/dynamic_sampling.py).",
        default=False,
    )
    dynamic_sampling_max_rounds: int = doc(
        "Most rollouts per step with dynamic_sampling; a batch still short is topped up with dropped prompts.",
        default=3,
        check=AT_LEAST_1,
    )
    # -- the rollout engine; the vllm_* fields (TRL's names) are read only with rollout_engine vllm (docs/vllm.md)
    rollout_engine: Literal[ROLLOUT_ENGINES] = doc(  # the samplers in grpo/rollout/samplers.py
        "Who samples rollouts: torch (our decoder) or vllm, an optional engine given the weights after every step.",
        default="torch",
        resume_safe=True,
    )
    vllm_mode: Literal[VLLM_MODES] = doc(
        "colocate: an engine inside the training process; server: `grpo vllm-serve` at vllm_server_url.",
        default="colocate",
        resume_safe=True,
    )
    vllm_gpu_memory_utilization: float = doc(
        "Share of GPU memory vLLM takes (weights + cache).", default=0.3, check=UNIT, resume_safe=True
    )
    vllm_tensor_parallel_size: int = doc(
        "GPUs each engine shards the model over.", default=1, check=AT_LEAST_1, resume_safe=True
    )
    vllm_enable_sleep_mode: bool = doc(
        "On a GPU: free the engine's memory while the policy updates.", default=False, resume_safe=True
    )
    vllm_server_url: str | None = doc(
        "vllm_mode server: the server's URL (http://HOST:PORT).", default=None, check=URL, resume_safe=True
    )
    vllm_server_timeout: float = doc(
        "vllm_mode server: seconds to wait for the server to come up, and for each of its answers.",
        default=240.0,
        check=TIMEOUT,
        resume_safe=True,
    )
    vllm_max_model_length: int | None = doc(
        "Longest prompt + completion; null = maximum_sequence_length.",
        default=None,
        check=NULL_OR_COUNT,
        resume_safe=True,
    )
    # -- asynchronous rollouts (docs/async.md)
    async_level: int = doc(
        "How many steps the policy that drew a step's samples may lag the one that learns from them: 0 = "
        "synchronous (sample, then learn); k >= 1 = the engine draws the next k batches while the trainer "
        "learns, each from the weights of exactly k steps before (grpo/rollout/pipeline.py).",
        default=0,
        check=ZERO_OR_MORE,
    )
    rollout_process: bool | None = doc(
        "Our decoder in a process of its own, with its own copy of the weights, sent after every step over "
        "torch.distributed (gloo on a CPU, NCCL on a GPU); null = on with async_level >= 1 and rollout_engine "
        "torch.",
        default=None,
        resume_safe=True,
    )
    rollout_device: str | None = doc(
        "The rollout process's device (cuda:1, cpu); null = the training device.",
        default=None,
        resume_safe=True,
    )
    rollout_cpus: list[int] = doc(
        "CPU cores a rollout process on the CPU is pinned to, one thread each; the trainer keeps the other cores "
        "(os.sched_setaffinity); [] = the second half of the cores.",
        default_factory=list,
        check=Check(lambda v: all(i >= 0 for i in v), "it must list CPU numbers (0 or more)"),
        resume_safe=True,
    )
    rollout_timeout: float = doc(
        "Seconds the trainer waits for the rollout process's answer (a batch, a weight update) before it stops "
        "the run; its start may take 600 s or this, whichever is longer.",
        default=600.0,
        check=TIMEOUT,
        resume_safe=True,
    )
    # -- several turns: tools or an environment (docs/tools.md)
    tools: list[str] = doc(
        "Tools the model may call: calculator or package.module:function (type hints and a docstring).",
        default_factory=list,
    )
    environment: str | None = doc(
        "An environment the model acts in over turns: number_guess or package.module:Class (reset, step).",
        default=None,
    )
    tool_call_format: str = doc(
        'How the model writes a call: {json} is {"name": ..., "arguments": {...}}.',
        default="<tool_call>{json}</tool_call>",
    )
    max_tool_calling_iterations: int = doc(
        "Most tool calls (environment steps) per sample.", default=4, check=AT_LEAST_1
    )
    tool_timeout: float = doc(
        "Seconds a tool call, or an environment's reset or step, may take; past it the worker process running "
        "them is killed and replaced.",
        default=10.0,
        check=TIMEOUT,
        resume_safe=True,
    )
    tool_output_chars: int = doc(
        "A tool's output is cut to this many characters.", default=1000, check=AT_LEAST_1
    )

    def runs_rollout_process(self) -> bool:
        """rollout_process, or by default: on with async_level >= 1 and our decoder."""
        if self.rollout_process is not None:
            return self.rollout_process
        return self.async_level > 0 and self.rollout_engine == "torch"
