"""Side-by-side step benchmark of our trainer and TRL's GRPOTrainer on identical work (scripts/bench.py).

Both sides get the same model files, the same prompt token ids in the same order (ours samples them with its
seeded PromptSampler; TRL gets that sequence unshuffled), the same G, completion length, beta, temperature,
learning rate and reward functions. Each system runs in its own child process so its peak memory is its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
LOCAL_GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@dataclass(frozen=True)
class BenchConfig:
    name: str
    device: str  # cpu | cuda
    dtype: str  # ours: config.dtype (float32 | bf16-mixed | bfloat16); TRL: float32, or bf16 for the others
    prompts_per_step: int
    num_generations: int
    completion_tokens: int
    beta: float = 0.04
    steps: int = 6
    warmup_steps: int = 1  # not counted in the medians: first-call allocations, lazy inits
    learning_rate: float = 1e-6
    temperature: float = 1.0
    seed: int = 0
    model: str = "embedded:smollm2-135m-instruct"
    data: str = ""  # empty: the shared GSM8K train file when present, else the hub's openai/gsm8k
    ignore_eos: bool = False  # sample every completion to full length on both sides (equal work)
    rollout_engine: str = "torch"  # ours: torch (our decoder) or vllm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIGS = {
    # The CPU setting: fp32, one GSM8K prompt per step, G=4, 64 tokens, beta 0.04.
    "cpu": BenchConfig("cpu", "cpu", "float32", 1, 4, 64),
    # The GPU setting: each side's bf16 default. Ours trains fp32 weights with bf16 compute (bf16-mixed, more
    # work per step); TRL trains the weights in bf16 as loaded (the model's own dtype) with bf16=True.
    "gpu": BenchConfig("gpu", "cuda", "bf16-mixed", 16, 8, 256, steps=8, warmup_steps=2),
}


def resolve_config(name: str, overrides: dict[str, Any]) -> BenchConfig:
    if name not in CONFIGS:
        raise ValueError(f"benchmark config {name!r} is unknown: use one of {', '.join(CONFIGS)}.")
    cfg = replace(CONFIGS[name], **overrides)
    if cfg.steps <= cfg.warmup_steps:
        raise ValueError(f"--steps = {cfg.steps} must be larger than the {cfg.warmup_steps} warm-up step(s).")
    return cfg


def gsm8k_template(cfg: BenchConfig, output_dir: str) -> dict[str, Any]:
    """The seed's GSM8K template (configs/gsm8k.yaml) with the benchmark's sizes."""
    data = yaml.safe_load((REPO / "configs" / "gsm8k.yaml").read_text())
    path = cfg.data or (str(LOCAL_GSM8K) if LOCAL_GSM8K.is_file() else "openai/gsm8k")
    data["model"] = cfg.model
    data["dataset"] = {"path": path, "split": "train", "limit": cfg.steps * cfg.prompts_per_step}
    if path == "openai/gsm8k":
        data["dataset"]["config"] = "main"
    data["config"].update(
        train_device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.prompts_per_step,
        num_generations=cfg.num_generations,
        maximum_completion_length=cfg.completion_tokens,
        maximum_sequence_length=512 + cfg.completion_tokens,  # no GSM8K prompt is cut
        beta=cfg.beta,
        learning_rate=cfg.learning_rate,
        learning_rate_schedule="constant",
        warmup_ratio=0.0,
        temperature=cfg.temperature,
        rollout_engine=cfg.rollout_engine,
        max_steps=cfg.steps,
        loss_type="grpo",
        seed=cfg.seed,
        output_dir=output_dir,
        log_to_wandb=False,
    )
    return data


def sync(device: str) -> None:
    """Wait for queued GPU work so wall-clock timings cover it; nothing to wait for on CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def step_record(step_s: float, rollout_s: float, tokens: int) -> dict[str, float]:
    return {"step_s": step_s, "rollout_s": rollout_s, "tokens": tokens}


def kv_cache_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """Bytes of one token's keys and values over all layers, for one row: 2 x layers x kv_heads x head_dim x
    dtype bytes. With grouped-query attention kv_heads is below the query heads."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def mean_decode_context(prompt_tokens: float, completion_tokens: float) -> float:
    """Mean number of cached tokens a decode step reads per row: the prefill gives the first of T completion
    tokens, and decode step k = 1 .. T-1 reads the prompt's P tokens and k more, so the mean is P + T / 2."""
    return prompt_tokens + completion_tokens / 2


def decode_bound(
    rows: int, bandwidth: float, weight_bytes: int, kv_bytes_per_token: int, mean_context: float
) -> dict[str, float]:
    """Upper bounds on decoding tokens/s from memory bandwidth (bytes/s). Each decode step reads every weight
    once and, for every row, the keys and values of its whole context: at the decode steps' mean context length,
    rows x bandwidth / (weight bytes + rows x mean context x KV bytes per token). The weights-only figure, the
    one this bench reported before, leaves the cache out; with many rows and long contexts the cache dominates."""
    kv_bytes = rows * mean_context * kv_bytes_per_token
    return {
        "tokens_per_s": rows * bandwidth / (weight_bytes + kv_bytes),
        "weights_only_tokens_per_s": rows * bandwidth / weight_bytes,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
    }


def prompts_in_step_order(cfg: BenchConfig) -> list[Any]:
    """The Prompt objects our trainer draws, in the order it draws them (TRL gets them in this order)."""
    from grpo.config import template_from_dict
    from grpo.data import PromptSampler, build_prompts, load_rows
    from grpo.model.loading import load_tokenizer

    t = template_from_dict(gsm8k_template(cfg, "unused"))
    tokenizer = load_tokenizer(t.model)
    max_prompt = t.config.maximum_sequence_length - t.config.maximum_completion_length
    prompts = build_prompts(load_rows(t.dataset), t.template, tokenizer, max_prompt_tokens=max_prompt)
    sampler = PromptSampler(len(prompts), batch_size=cfg.prompts_per_step, seed=cfg.seed)
    return [prompts[i] for _ in range(cfg.steps) for i in sampler.next_batch()]
