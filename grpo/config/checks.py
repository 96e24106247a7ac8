"""The template's range checks: every value a type allows but the trainer cannot use, and local paths that do not
exist, each reported as one sentence naming the field and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grpo.config.schema import Template
from grpo.errors import ConfigError


def check_ranges(t: Template) -> None:
    c = t.config

    def need(ok: bool, where: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{where} = {value!r} is not allowed: {allowed}.")

    for name in (
        "maximum_sequence_length",
        "maximum_completion_length",
        "batch_size",
        "num_generations",
        "num_iterations",
        "mini_batches",
        "dynamic_sampling_max_rounds",
        "num_train_epochs",
        "lora_r",
        "logging_steps",
    ):
        need(getattr(c, name) >= 1, f"config.{name}", getattr(c, name), "it must be at least 1")
    need(
        c.batch_size % c.mini_batches == 0,
        "config.mini_batches",
        c.mini_batches,
        f"it must divide batch_size ({c.batch_size}): each mini-batch takes whole prompts, the same number on "
        "every process",
    )
    need(c.save_steps >= 0, "config.save_steps", c.save_steps, "it must be 0 or more")
    need(c.save_total_limit >= 0, "config.save_total_limit", c.save_total_limit, "it must be 0 or more")
    need(c.micro_batch_size >= 0, "config.micro_batch_size", c.micro_batch_size, "it must be 0 or more")
    need(c.eval_steps >= 0, "config.eval_steps", c.eval_steps, "it must be 0 (off) or more")
    need(c.eval_limit >= 1, "config.eval_limit", c.eval_limit, "it must be at least 1")
    need(
        not c.save_best or c.eval_steps > 0,
        "config.save_best",
        c.save_best,
        "it keeps the model of the best evaluation, so it needs eval_steps > 0",
    )
    need(c.max_steps == -1 or c.max_steps >= 1, "config.max_steps", c.max_steps, "use -1 or a positive count")
    need(
        c.maximum_completion_length < c.maximum_sequence_length,
        "config.maximum_completion_length",
        c.maximum_completion_length,
        f"it must be below maximum_sequence_length ({c.maximum_sequence_length})",
    )
    need(
        c.num_generations >= 2,
        "config.num_generations",
        c.num_generations,
        "GRPO needs at least 2 generations per prompt to compare them",
    )
    need(c.learning_rate > 0, "config.learning_rate", c.learning_rate, "it must be positive")
    need(c.temperature > 0, "config.temperature", c.temperature, "it must be positive")
    need(0 < c.top_p <= 1, "config.top_p", c.top_p, "it must be in (0, 1]")
    need(
        c.rollout_is_cap == 0 or c.rollout_is_cap >= 1,
        "config.rollout_is_cap",
        c.rollout_is_cap,
        "it must be 0 (off) or at least 1",
    )
    need(c.top_k >= 0, "config.top_k", c.top_k, "it must be 0 (no limit) or more")
    need(0 <= c.min_p <= 1, "config.min_p", c.min_p, "it must be in [0, 1]")
    need(c.beta >= 0, "config.beta", c.beta, "it must be 0 or more")
    need(c.entropy_coef >= 0, "config.entropy_coef", c.entropy_coef, "it must be 0 (off) or more")
    need(
        c.ref_model_sync_steps >= 0,
        "config.ref_model_sync_steps",
        c.ref_model_sync_steps,
        "it must be 0 (off) or more",
    )
    need(
        0 < c.ref_model_mixup_alpha <= 1,
        "config.ref_model_mixup_alpha",
        c.ref_model_mixup_alpha,
        "it must be in (0, 1]",
    )
    if c.ref_model_sync_steps > 0:
        need(
            c.beta > 0,
            "config.ref_model_sync_steps",
            c.ref_model_sync_steps,
            "it updates the KL reference, and beta = 0 loads none; set beta > 0 or ref_model_sync_steps: 0",
        )
        need(
            not c.use_lora and c.backend != "unsloth",
            "config.ref_model_sync_steps",
            c.ref_model_sync_steps,
            "with LoRA the reference is the base model with the adapters off, which cannot follow the policy; "
            "use full fine-tuning or ref_model_sync_steps: 0",
        )
    need(c.epsilon >= 0, "config.epsilon", c.epsilon, "it must be 0 or more")
    need(
        0 < c.top_entropy_quantile <= 1,
        "config.top_entropy_quantile",
        c.top_entropy_quantile,
        "it must be in (0, 1]",
    )
    need(
        c.epsilon_high is None or c.epsilon_high >= 0,
        "config.epsilon_high",
        c.epsilon_high,
        "it must be null or 0 or more",
    )
    if c.delta is not None:
        upper = 1 + (c.epsilon if c.epsilon_high is None else c.epsilon_high)
        need(
            c.delta >= upper,
            "config.delta",
            c.delta,
            f"it must be null or at least 1 + epsilon_high ({upper:g})",
        )
        need(
            c.loss_type != "cispo",
            "config.delta",
            c.delta,
            "cispo has no clipped objective to cap (its ratio cap is 1 + epsilon_high)",
        )
    need(0 <= c.warmup_ratio < 1, "config.warmup_ratio", c.warmup_ratio, "it must be in [0, 1)")
    need(0 <= c.lora_dropout < 1, "config.lora_dropout", c.lora_dropout, "it must be in [0, 1)")
    need(
        not c.load_in_4bit or c.backend == "unsloth",
        "config.load_in_4bit",
        c.load_in_4bit,
        "4-bit loading needs backend: unsloth",
    )
    need(c.max_grad_norm >= 0, "config.max_grad_norm", c.max_grad_norm, "it must be 0 or more")
    need(c.weight_decay >= 0, "config.weight_decay", c.weight_decay, "it must be 0 or more")
    need(0 <= c.adam_beta1 < 1, "config.adam_beta1", c.adam_beta1, "it must be in [0, 1)")
    need(0 <= c.adam_beta2 < 1, "config.adam_beta2", c.adam_beta2, "it must be in [0, 1)")
    need(c.adam_epsilon > 0, "config.adam_epsilon", c.adam_epsilon, "it must be positive")
    need(
        t.dataset.limit is None or t.dataset.limit >= 1,
        "dataset.limit",
        t.dataset.limit,
        "use null or a positive count",
    )
    need(len(c.rewards) >= 1, "config.rewards", c.rewards, "name at least one reward function")
    for name in ("start_thinking_string", "end_thinking_string", "start_answer_string", "end_answer_string"):
        need(getattr(c, name).strip() != "", f"config.{name}", getattr(c, name), "it must not be empty")
    if isinstance(c.gpu_ids, list):
        need(
            len(c.gpu_ids) > 0 and all(i >= 0 for i in c.gpu_ids),
            "config.gpu_ids",
            c.gpu_ids,
            "use auto or a non-empty list of GPU indices",
        )
    need(t.name.strip() != "", "name", t.name, "give the template a name")


def check_paths(t: Template) -> None:
    """Local paths that do not exist are reported plainly; hub ids are checked when loading."""
    if _looks_local(t.model) and not Path(t.model).exists():
        raise ConfigError(f"model = {t.model!r}: no such file or folder.")
    path = t.dataset.path
    if not path.startswith("builtin:") and _looks_local(path) and not Path(path).exists():
        raise ConfigError(f"dataset.path = {path!r}: no such file.")


def _looks_local(path: str) -> bool:
    """A hub id is 'owner/name' or 'name'; anything with a file suffix, ./, ../, / or ~ is a local path."""
    if path.startswith(("embedded:", "builtin:")):
        return False
    return (
        path.startswith(("/", "./", "../", "~"))
        or os.sep in path.strip("/").split("/", 1)[-1]
        or Path(path).suffix.lower() in {".jsonl", ".json", ".csv", ".parquet", ".gguf", ".safetensors"}
        or Path(path).exists()
    )
