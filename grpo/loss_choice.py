"""The loss a template names (config.loss_type): an entry of the loss table (grpo/config/loss_table.py) or a
user function, checked before any model loads, and how one micro-batch's share of the update's loss is computed
with it (grpo/loss.py)."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from grpo.config import TrainConfig
from grpo.config.loss_table import (
    ALLOWED_LOSS_TYPES,
    OPTION_FIELDS,
    REDUCTIONS,
    TERMS,
    VARIANTS,
    LossVariant,
    option_default,
)
from grpo.errors import ConfigError
from grpo.loss import UpdateScale, policy_loss
from grpo.rewards.scoring import resolve_function


@dataclass(frozen=True)
class LossChoice:
    """The loss a template names: a variant of the loss table, or one made for a user function; both run the
    same way (`terms`)."""

    variant: LossVariant
    config: TrainConfig

    @property
    def reduction(self) -> str:
        return self.variant.reduction

    def terms(
        self,
        logps: torch.Tensor,
        old: torch.Tensor | None,
        ref: torch.Tensor | None,
        advantages: torch.Tensor,
        loss_mask: torch.Tensor,
        scale: UpdateScale,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch's share of the rank's loss, and its stats; every tensor is the micro-batch's [b, T]
        (advantages [b]). The loss, a built-in's `policy_loss` or the user's function, returns per-token terms
        [b, T] or a scalar of its declared reduction over the micro-batch (num_items_in_batch: the update's token
        count on every rank); `scale` makes either its share."""
        c = self.config
        loss = self.variant.function or policy_loss  # a built-in is policy_loss under its own name
        out, stats = loss(
            logps,
            old,
            ref,
            advantages,
            loss_mask,
            loss_type=c.loss_type,
            max_completion_length=c.maximum_completion_length,
            num_items_in_batch=scale.global_tokens,
            **fixed_loss_settings(c),
            **extra,
        )
        if out.dim() == 2:
            return scale.of_terms(out, loss_mask), stats
        return scale.of_scalar(out, loss_mask), stats


def loss_keywords(c: TrainConfig) -> list[str]:
    """The keyword arguments a user loss is called with under this config (see LossChoice.terms)."""
    names = ["loss_type", "max_completion_length", "num_items_in_batch", *fixed_loss_settings(c)]
    names += [*loss_options(c), *(["token_weights"] if weighs_samples(c) else [])]
    return names + (["token_mask"] if c.top_entropy_quantile < 1 else [])


def weighs_samples(c: TrainConfig) -> bool:
    """Whether the policy term gets token_weights: rollout correction or off-policy sequence masking."""
    correction = c.rollout_is_cap > 0 or c.vllm_importance_sampling_correction
    return correction or c.off_policy_mask_threshold is not None


def fixed_loss_settings(c: TrainConfig) -> dict[str, Any]:
    """The settings every loss is called with."""
    return {
        "epsilon": c.epsilon,
        "epsilon_high": c.epsilon_high,
        "beta": c.beta,
        "importance_sampling_level": c.importance_sampling_level,
    }


def loss_options(c: TrainConfig) -> dict[str, Any]:
    """The loss table's options (grpo/config/loss_table.py) set away from their defaults: a loss is called with
    only these, so a user loss need not know the others."""
    return {
        name: getattr(c, name) for name, f in OPTION_FIELDS.items() if getattr(c, name) != option_default(f)
    }


def resolve_loss(c: TrainConfig) -> LossChoice:
    """The loss config.loss_type names: an entry of the loss table, or a user function with its declared
    reduction whose signature takes what the trainer passes (checked now, not after the first rollout)."""
    loss_type = c.loss_type
    if ":" not in loss_type:
        if loss_type not in VARIANTS:
            raise ConfigError(f"config.loss_type = {loss_type!r} is not allowed: {ALLOWED_LOSS_TYPES}.")
        return LossChoice(VARIANTS[loss_type], c)
    fn = resolve_function(loss_type, field="config.loss_type")
    reduction = getattr(fn, "reduction", None)
    if reduction not in REDUCTIONS:
        raise ConfigError(
            f"config.loss_type = {loss_type!r} does not declare its reduction: decorate it with "
            f"@grpo.loss.reduced_by(NAME), NAME one of {', '.join(REDUCTIONS)} (docs/losses.md)."
        )
    try:
        inspect.signature(fn).bind(*[None] * 5, **dict.fromkeys(loss_keywords(c)))
    except TypeError as e:
        raise ConfigError(
            f"config.loss_type = {loss_type!r} cannot be called as a loss ({e}): it must take (logps, "
            "old_logps, ref_logps, advantages, mask, **kwargs) (docs/losses.md)."
        ) from None
    return LossChoice(LossVariant(loss_type, None, reduction, function=fn), c)


def loss_table_markdown() -> str:
    """The tables of docs/losses.md, from the loss table: every variant, then where we differ from TRL 1.16 on
    purpose (tests/test_loss_table.py checks the page; `python -m grpo.loss_choice` prints them)."""
    lines = [
        "| `loss_type` | objective | reduction | options (default) | paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    described: set[str] = set()
    for v in VARIANTS.values():
        o = v.objective
        objective = o.summary + (f" ([{o.see.split('#')[0]}]({o.see}))" if o.see else "")
        reduction = f"`{v.reduction}`" + ("" if v.reduction in described else f": {REDUCTIONS[v.reduction]}")
        described.add(v.reduction)
        lines.append(f"| `{v.name}` | {objective} | {reduction} | {_options_cell(o.options)} | {v.paper} |")
    lines += ["", "| | where we differ from TRL 1.16, on purpose |", "| --- | --- |"]
    lines += [f"| `{v.name}` | {v.differs_from_trl} |" for v in VARIANTS.values() if v.differs_from_trl]
    for t in TERMS:
        options = f" ({_options_cell(t.options)})" if t.options is not None else ""
        lines.append(f"| {t.name}{options} | {t.differs_from_trl} |")
    return "\n".join(lines)


def _options_cell(cls: type | None) -> str:
    """`name` (default) for each field of an options dataclass, the defaults as a template writes them."""
    if cls is None:
        return "none"
    return ", ".join(f"`{f.name}` ({_as_yaml(option_default(f))})" for f in dataclasses.fields(cls))


def _as_yaml(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


if __name__ == "__main__":
    print(loss_table_markdown())
