"""The training template: its schema with each field's allowed values (schema.py, with the loss's fields in
loss_settings.py, each variant's options from the loss table in loss_table.py, and the rollout's in
rollout_settings.py), the checks across fields (checks.py), and reading it from YAML with key=value overrides
(loading.py). `from grpo.config import Template, load_template, ConfigError` is the way in."""

from grpo.config.loading import apply_overrides, load_template, parse_override, read_yaml, template_from_dict
from grpo.config.schema import (
    ALIASES,
    BUILTIN_DATASET,
    EMBEDDED_MODEL,
    LEAF_PATHS,
    RESUME_SAFE_FIELDS,
    SECTIONS,
    SEED_INSTRUCTION,
    DatasetConfig,
    DataTemplate,
    Template,
    TrainConfig,
    field_docs,
)
from grpo.errors import ConfigError

__all__ = [
    "ALIASES",
    "BUILTIN_DATASET",
    "EMBEDDED_MODEL",
    "LEAF_PATHS",
    "RESUME_SAFE_FIELDS",
    "SECTIONS",
    "SEED_INSTRUCTION",
    "ConfigError",
    "DataTemplate",
    "DatasetConfig",
    "Template",
    "TrainConfig",
    "apply_overrides",
    "field_docs",
    "load_template",
    "parse_override",
    "read_yaml",
    "template_from_dict",
]
