"""Transformer Lab GRPO plugin configs (JSON) -> our templates.

Transformer Lab saves a training template either flat or as {"name": ..., "config": {...}}; its GRPO plugins use
the field names we use, so the mapping is mostly one-to-one:

    model_name (model_path when set)          -> model
    dataset_name                               -> dataset.path
    instruction / instruction_template         -> template.instruction
    input_template                             -> template.input
    output_template                            -> template.output
    template_name / name                       -> name
    every config field (learning_rate, lora_r, max_steps, start_thinking_string, ...) -> config.<same name>

Keys that describe Transformer Lab itself rather than the run (plugin_name, model_architecture, type, job ids,
sweep settings, ...) are dropped, except that the Unsloth GRPO plugins (unsloth_grpo_trainer and its multi-GPU
twin) always train a LoRA adapter, so their configs get use_lora: true; their lora_r / lora_alpha /
lora_dropout would otherwise be stored for a full fine-tune. Values it stores as strings ("0.0001", "true", "8", "0,1") become the field's
type. Any other key is refused with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from grpo.config import ConfigError, TrainConfig

TOP_LEVEL = {
    "model_name": ("model",),
    "model_path": ("model",),
    "dataset_name": ("dataset", "path"),
    "instruction": ("template", "instruction"),
    "instruction_template": ("template", "instruction"),
    "input_template": ("template", "input"),
    "output_template": ("template", "output"),
    "template_name": ("name",),
    "name": ("name",),
}
DROPPED = {
    "plugin_name",
    "model_architecture",
    "embedding_model",
    "embedding_model_architecture",
    "embedding_model_file_path",
    "type",
    "description",
    "job_id",
    "template_id",
    "adaptor_output_dir",
    "fuse_model",
    "run_sweeps",
    "sweep_config",
    "sweep_metric",
    "lower_is_better",
    "_tlab_recipe_datasets",
    "_tlab_recipe_models",
    "_tlab_recipe_workflows",
}
# Plugins whose script always wraps the model in LoRA (FastLanguageModel.get_peft_model), with no setting for it.
ALWAYS_LORA = {"unsloth_grpo_trainer", "unsloth_grpo_trainer_multi_gpu"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
_BOOLS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def read_tlab(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Transformer Lab config {str(p)!r} does not exist.")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"Transformer Lab config {str(p)!r} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Transformer Lab config {str(p)!r} must hold a JSON object.")
    return tlab_to_template(data, source=str(p))


def tlab_to_template(data: dict[str, Any], *, source: str = "the config") -> dict[str, Any]:
    """Map a Transformer Lab config to a template dict (not yet validated: template_from_dict does that)."""
    flat = dict(data)
    inner = flat.pop("config", None)
    if isinstance(inner, str):  # Transformer Lab sometimes stores the plugin config as a JSON string
        try:
            inner = json.loads(inner)
        except json.JSONDecodeError:
            raise ConfigError(f"{source}: 'config' is a string but not JSON.") from None
    if isinstance(inner, dict):
        flat = {**flat, **inner}
    elif inner is not None:
        raise ConfigError(f"{source}: 'config' must be an object of plugin settings.")
    out: dict[str, Any] = {"dataset": {}, "template": {}, "config": {}}
    for key, value in flat.items():
        if key in DROPPED or (key == "model_path" and not value):
            continue
        if key in TOP_LEVEL:
            path = TOP_LEVEL[key]
            if len(path) == 1:
                out[path[0]] = value
            else:
                out[path[0]][path[1]] = value
        elif key in CONFIG_FIELDS:
            out["config"][key] = _from_string(value, _HINTS[key])
        else:
            match = difflib.get_close_matches(key, [*TOP_LEVEL, *CONFIG_FIELDS], n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"{source}: unknown Transformer Lab field '{key}'{hint}.")
    if flat.get("plugin_name") in ALWAYS_LORA:
        out["config"].setdefault("use_lora", True)
    return {k: v for k, v in out.items() if v != {}}


def _from_string(value: Any, tp: Any) -> Any:
    """'8' -> 8, '1e-4' -> 0.0001, 'true' -> True, '0,1' -> [0, 1], for the field's annotation."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    origin = typing.get_origin(tp)
    options = typing.get_args(tp) if origin in (Union, types.UnionType) else (tp,)
    for option in options:
        if typing.get_origin(option) is Literal and text in typing.get_args(option):
            return text
    for option in options:
        if option is type(None) and text.lower() in ("", "none", "null"):
            return None
        if option is bool and text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        if option in (int, float):
            try:
                return option(text)
            except ValueError:
                continue
        if typing.get_origin(option) is list:
            items = [s.strip() for s in text.strip("[]").split(",") if s.strip()]
            (item_tp,) = typing.get_args(option)
            try:
                return [int(s) for s in items] if item_tp is int else items
            except ValueError:
                continue
    return value
