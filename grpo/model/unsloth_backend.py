"""`backend: unsloth`: load the model and its LoRA through unsloth's FastLanguageModel; the GRPO math stays ours.

unsloth is an optional extra (`pip install .[unsloth]`) that needs a CUDA GPU. It is imported only inside
`load_unsloth_model`, after `require_unsloth` has checked both, so nothing else in the package depends on it.
The model it returns is a PEFT model: `grpo.model.lora.disabled_adapters` switches its adapters off for the KL
reference through PEFT's own `disable_adapter()`, and it saves in the same PEFT format as ours.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from grpo.config import ConfigError, Template

NO_CUDA = (
    "config.backend = 'unsloth' needs a CUDA GPU and none is visible to this run: "
    "use backend: torch here, or run on a CUDA machine after pip install .[unsloth]."
)
NO_PACKAGE = (
    "config.backend = 'unsloth' needs the unsloth package, which is not installed: "
    "pip install .[unsloth] (it needs a CUDA GPU), or use backend: torch."
)
NEITHER = (
    "config.backend = 'unsloth' needs a CUDA GPU and the unsloth package, and this run has neither: "
    "use backend: torch here, or run on a CUDA machine after pip install .[unsloth]."
)


def unsloth_problem(*, has_cuda: bool, has_package: bool) -> str | None:
    """The one-sentence reason the unsloth backend cannot run, or None."""
    if not has_cuda and not has_package:
        return NEITHER
    if not has_cuda:
        return NO_CUDA
    if not has_package:
        return NO_PACKAGE
    return None


def require_unsloth(device: torch.device) -> None:
    """Raise ConfigError before anything loads when the unsloth backend cannot run on `device`."""
    problem = unsloth_problem(
        has_cuda=device.type == "cuda" and torch.cuda.is_available(),
        has_package=importlib.util.find_spec("unsloth") is not None,
    )
    if problem is not None:
        raise ConfigError(problem)


def load_unsloth_model(template: Template, *, dtype: torch.dtype) -> Any:
    """FastLanguageModel.from_pretrained + get_peft_model with the template's LoRA fields."""
    from unsloth import FastLanguageModel  # the only import of unsloth in the package

    from grpo.model.loading import resolve_model_source
    from grpo.model.lora import DEFAULT_TARGETS

    c = template.config
    source, kwargs = resolve_model_source(template.model)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=source,
        max_seq_length=c.maximum_sequence_length,
        dtype=dtype,
        load_in_4bit=c.load_in_4bit,
        **kwargs,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        target_modules=list(c.lora_target_modules or DEFAULT_TARGETS),
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=c.seed,
    )
    model.config.use_cache = False  # training forwards never need the cache; rollout asks for it explicitly
    return model


def save_unsloth(model: Any, tokenizer: Any, folder: Path, *, export_merged: bool) -> None:
    """The adapter in PEFT format, and optionally the merged 16-bit model beside it (`<folder>-merged`)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if export_merged:
        merged = folder.with_name(folder.name + "-merged")
        model.save_pretrained_merged(str(merged), tokenizer, save_method="merged_16bit")
