"""The template's checks that read more than one field (each field's own allowed values are declared next to it
in schema.py), the local paths that must exist, and the warnings about settings that run but are probably not
meant. Each failure is one sentence naming the field and what is allowed."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grpo.config.loss_table import VARIANTS
from grpo.config.schema import LEAF_PATHS, Template, TrainConfig, leaf_field
from grpo.errors import ConfigError


def check_fields(t: Template) -> None:
    """Each field against what its declaration allows (the `check` next to it in schema.py)."""
    for dotted, path in LEAF_PATHS.items():
        check = leaf_field(dotted).metadata["check"]
        value = getattr(getattr(t, path[0]), path[1]) if len(path) == 2 else getattr(t, path[0])
        if isinstance(value, float) and not math.isfinite(value):  # inf and nan pass every comparison check
            raise ConfigError(f"{dotted} = {value!r} is not allowed: it must be a finite number.")
        if check is not None and not check.ok(value):
            raise ConfigError(f"{dotted} = {value!r} is not allowed: {check.allowed}.")


def check_relations(t: Template) -> None:
    """Values each field allows on its own but not together with another field."""
    c = t.config

    def need(ok: bool, where: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{where} = {value!r} is not allowed: {allowed}.")

    need(
        c.batch_size % c.mini_batches == 0,
        "config.mini_batches",
        c.mini_batches,
        f"it must divide batch_size ({c.batch_size}): each mini-batch takes whole prompts, the same number on "
        "every process",
    )
    need(
        not c.save_best or c.eval_steps > 0,
        "config.save_best",
        c.save_best,
        "it keeps the model of the best evaluation, so it needs eval_steps > 0",
    )
    need(
        c.maximum_completion_length < c.maximum_sequence_length,
        "config.maximum_completion_length",
        c.maximum_completion_length,
        f"it must be below maximum_sequence_length ({c.maximum_sequence_length})",
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
    if c.delta is not None:
        upper = 1 + (c.epsilon if c.epsilon_high is None else c.epsilon_high)
        need(
            c.delta >= upper,
            "config.delta",
            c.delta,
            f"it must be null or at least 1 + epsilon_high ({upper:g})",
        )
    if c.rollout_engine == "vllm":
        need(
            c.backend != "unsloth",
            "config.rollout_engine",
            c.rollout_engine,
            "unsloth patches the model in ways vLLM does not load; use backend: torch or rollout_engine: torch",
        )
        need(
            c.vllm_mode != "server" or c.vllm_server_url is not None,
            "config.vllm_server_url",
            c.vllm_server_url,
            "vllm_mode: server needs the URL of a running `grpo vllm-serve`, e.g. http://127.0.0.1:8000",
        )
        need(
            c.vllm_max_model_length is None or c.vllm_max_model_length >= c.maximum_sequence_length,
            "config.vllm_max_model_length",
            c.vllm_max_model_length,
            f"it must be null or at least maximum_sequence_length ({c.maximum_sequence_length})",
        )
    check_variant_options(c, need)
    check_async(c, need)
    need(
        not (c.rollout_is_cap > 0 and c.vllm_importance_sampling_correction),
        "config.rollout_is_cap",
        c.rollout_is_cap,
        "it is the token_truncate form of vllm_importance_sampling_correction; use one of the two",
    )
    need(
        not c.use_bias_correction_kl or c.beta > 0,
        "config.use_bias_correction_kl",
        c.use_bias_correction_kl,
        "it corrects the KL term, and beta = 0 has none; set beta > 0",
    )
    need(
        c.rollout_engine == "vllm" or (c.vllm_mode == "colocate" and c.vllm_server_url is None),
        "config.vllm_mode" if c.vllm_mode != "colocate" else "config.vllm_server_url",
        c.vllm_mode if c.vllm_mode != "colocate" else c.vllm_server_url,
        "it sets up the vLLM engine, and rollout_engine is torch; set rollout_engine: vllm",
    )
    if c.use_adaptive_entropy:
        need(
            c.entropy_coef_min <= c.entropy_coef_max,
            "config.entropy_coef_min",
            c.entropy_coef_min,
            f"it must be at most entropy_coef_max ({c.entropy_coef_max:g})",
        )
        need(
            c.entropy_coef_min <= c.entropy_coef <= c.entropy_coef_max,
            "config.entropy_coef",
            c.entropy_coef,
            f"the adaptive coefficient starts there, so it must be in [entropy_coef_min, entropy_coef_max] = "
            f"[{c.entropy_coef_min:g}, {c.entropy_coef_max:g}]",
        )
    need(
        not c.load_in_4bit or c.backend == "unsloth",
        "config.load_in_4bit",
        c.load_in_4bit,
        "4-bit loading needs backend: unsloth",
    )


def check_variant_options(c: TrainConfig, need: Callable[[bool, str, Any, str], None]) -> None:
    """What a built-in variant's objective (grpo/config/loss_table.py) cannot take: delta, the clipped objective's
    option, and sequence-level rollout correction where the token weights fold into the objective (vespo)."""
    objective = VARIANTS[c.loss_type].objective if c.loss_type in VARIANTS else None
    if objective is None:  # a user's loss takes whatever it takes
        return
    owns_delta = objective.options is not None and "delta" in objective.options.__dataclass_fields__
    need(
        c.delta is None or owns_delta,
        "config.delta",
        c.delta,
        f"it caps the unclipped ratio of the clipped objective, and {c.loss_type}'s objective is {objective.summary}",
    )
    mode = c.vllm_importance_sampling_mode
    need(
        not (objective.folds_token_weights and c.vllm_importance_sampling_correction)
        or mode.startswith("token_"),
        "config.vllm_importance_sampling_mode",
        mode,
        f"with loss_type {c.loss_type} use token_truncate or token_mask: {c.loss_type} folds each token's correction "
        "ratio into its sequence weight W, where a sequence mode's one weight per sequence would count once per token",
    )


def check_async(c: TrainConfig, need: Callable[[bool, str, Any, str], None]) -> None:
    """What asynchronous rollouts and the rollout process cannot run with (docs/async.md)."""
    process = c.runs_rollout_process()
    if c.async_level > 0:
        for on, what in (
            (c.dynamic_sampling, "dynamic_sampling draws a number of rounds per step known only once scored"),
            (bool(c.tools or c.environment), "tools and environments run their turns in the training process"),
            (c.rollout_engine == "vllm" and c.vllm_mode == "colocate", "a colocated engine shares the trainer's "
             "device and process, so nothing overlaps; use vllm_mode: server or rollout_engine: torch"),
        ):  # fmt: skip
            need(not on, "config.async_level", c.async_level, f"it must be 0 here: {what}")
    if c.rollout_process:
        need(
            c.rollout_engine == "torch" and c.backend != "unsloth",
            "config.rollout_process",
            c.rollout_process,
            "the rollout process runs our decoder on our model; use rollout_engine: torch and backend: torch",
        )
    if process:
        need(
            c.distributed_strategy != "fsdp",
            "config.rollout_process",
            True,
            "it takes each rank's full weights, and FSDP holds shards; use distributed_strategy: ddp",
        )
    for name in ("rollout_device", "rollout_cpus"):
        need(process or not getattr(c, name), f"config.{name}", getattr(c, name), "it sets up the rollout "
             "process, which is off; set async_level >= 1 or rollout_process: true")  # fmt: skip


GSPO_EPSILON = 0.01  # clip ranges above this are token-level ones; GSPO's paper clips at 3e-4 / 4e-4


def config_warnings(t: Template) -> list[str]:
    """Settings that run but are probably not what the user meant; the run's log prints each."""
    c, notes = t.config, []
    if c.importance_sampling_level == "sequence" and max(c.epsilon, c.epsilon_high or 0.0) > GSPO_EPSILON:
        notes.append(
            f"importance_sampling_level: sequence (GSPO) with epsilon {c.epsilon} / epsilon_high "
            f"{c.epsilon_high}: a sequence ratio rarely moves that far, so almost nothing is clipped; "
            "GSPO clips at 3e-4 / 4e-4 (docs/losses.md)."
        )
    if c.loss_type == "cispo" and c.epsilon_high is not None and c.epsilon_high > 1:
        notes.append(
            f"loss_type: cispo caps the ratio at 1 + epsilon_high = {1 + c.epsilon_high:g} here (MiniMax-M1's "
            f"form); TRL caps it at epsilon_high itself (ScaleRL's form). For TRL's cap of {c.epsilon_high:g}, "
            f"set epsilon_high: {c.epsilon_high - 1:g} (docs/losses.md)."
        )
    if c.loss_type == "luspo" and c.importance_sampling_level != "sequence":
        notes.append(
            "loss_type: luspo is GSPO with each sequence's term times its length; the paper uses "
            "importance_sampling_level: sequence (docs/loss-variants.md)."
        )
    if c.async_level > 0 and c.rollout_is_cap == 0 and not c.vllm_importance_sampling_correction:
        notes.append(
            f"async_level: {c.async_level} without rollout correction: the gap between the policy that drew the "
            "samples and the one before the update is only logged (rollout/mismatch_kl); set "
            "vllm_importance_sampling_correction: true to weight it out (docs/async.md)."
        )
    return notes


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
