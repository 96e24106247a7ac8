"""The loss table: each built-in `loss_type` is one entry of VARIANTS (its per-token objective, its reduction,
its paper and, beside it, where it differs from TRL on purpose); each objective's options are a small dataclass
whose fields are template fields (description, default and check, each stated once, here). Each objective's
formula and paper are in its function's docstring; r_t = pi / pi_old, A the sequence's advantage, m the mask.

grpo/loss.py adds the KL term and the reduction, and `token_terms` runs an objective with its options taken from
the flat settings. A new variant is its objective (an options dataclass, a function (TokenInputs, options) ->
(terms, stats), an `Objective`) and one entry of VARIANTS: the template gets its fields (loss_settings.py
inherits `LossOptions`), the trainer passes them to the loss, and the lists of loss types (the field's help, the
messages, docs/losses.md) follow from VARIANTS.

The template reads this module, so torch is imported only inside the functions that compute: checking a template
never loads it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from grpo.config.fields import POSITIVE, ZERO_OR_MORE, doc

if TYPE_CHECKING:
    from torch import Tensor

# reduction -> what it computes (m = loss mask, l = per-token terms, B the update's sequences, N its loss tokens
# on every rank); grpo/loss.py `reduce` implements each
REDUCTIONS = {
    "sequence_mean": "mean over each completion's tokens, then over the completions",
    "batch_token_mean": "sum of m l / sum of m over each rank's share of the update; ranks averaged",
    "constant": "sum of m l / (B x `maximum_completion_length`): no length bias",
    "global_token_mean": "sum of m l / N, every micro-batch and every rank together",
    "sequence_sum": "sum of m l over each completion, mean over the completions",
}


@dataclass(frozen=True)
class TokenInputs:
    """What an objective sees of one batch."""

    logps: Tensor  # [B, T], carries the gradient
    old_logps: Tensor | None  # [B, T]; None on-policy
    ratio: Tensor  # [B, T], or [B, 1] at importance_sampling_level sequence (GSPO)
    adv: Tensor  # [B, 1]
    mask: Tensor  # [B, T], in logps' dtype
    low: float  # epsilon
    high: float  # epsilon_high (epsilon when null)
    token_weights: Tensor | None  # [B, T], only for an objective that folds them in (folds_token_weights)


@dataclass(frozen=True)
class Objective:
    """A per-token objective: terms(inputs, options) -> (per-token terms [B, T] or [B, 1], stats)."""

    name: str
    terms: Callable[[TokenInputs, Any], tuple[Tensor, dict[str, Tensor]]]
    summary: str  # what it is, in a few words: the docs' objective column and the messages
    options: type | None = None  # its options dataclass, whose fields are template fields
    folds_token_weights: bool = (
        False  # the token weights enter the objective instead of multiplying its terms
    )
    see: str = ""  # where the docs describe it


@dataclass(frozen=True)
class LossVariant:
    """One loss_type: a built-in's objective and reduction, or a user's function and the reduction it declares."""

    name: str
    objective: Objective | None  # None for a user function
    reduction: str  # a key of REDUCTIONS
    paper: str = ""
    differs_from_trl: str = ""  # where we differ from TRL 1.16 on purpose
    function: Callable | None = None  # a user's loss (package.module:function); None for a built-in

    @property
    def options(self) -> type | None:
        return self.objective.options if self.objective is not None else None


@dataclass(frozen=True)
class SharedTerm:
    """A part of the loss every variant shares, with its options (if the loss receives them) and its TRL note."""

    name: str
    options: type | None
    differs_from_trl: str


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def clip_stats(x: TokenInputs, *, capped: bool = False) -> dict[str, Tensor]:
    """The share of tokens whose clipping removed the gradient (the sign of A decides which side); `capped`
    (cispo): tokens whose ratio weight was capped, whatever the sign."""
    import torch

    with torch.no_grad():
        ratio, mask = x.ratio.expand_as(x.mask), x.mask
        if capped:
            low = torch.zeros_like(mask)
            high = (ratio > 1.0 + x.high).to(mask.dtype)
        else:
            low = ((ratio < 1.0 - x.low) & (x.adv < 0)).to(mask.dtype)
            high = ((ratio > 1.0 + x.high) & (x.adv > 0)).to(mask.dtype)
        both = torch.clamp(low + high, max=1.0)
        return {
            "clip_ratio_low": masked_mean(low, mask),
            "clip_ratio_high": masked_mean(high, mask),
            "clip_ratio": masked_mean(both, mask),
        }


def kept_stat(name: str, kept: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Nothing is clipped: the mean share of the plain policy gradient each token keeps shows the variant acting."""
    return {f"{name}/gradient_kept": masked_mean(kept.expand_as(mask), mask)}


# ---------------------------------------------------------------- the clipped ratio (grpo, bnpo, ...)
@dataclass
class ClipOptions:
    delta: float | None = doc(
        "Two-sided clipping (INTELLECT-2): cap the unclipped ratio at delta, so tokens with a negative advantage "
        "and a large ratio stop growing the loss; null = off; at least 1 + epsilon_high.",
        default=None,
    )


def clipped_objective(
    ratio: Tensor, adv: Tensor, *, low: float, high: float, delta: float | None = None
) -> Tensor:
    """PPO's pessimistic clipped term -min(r A, clip(r, 1 - low, 1 + high) A); delta caps the unclipped r."""
    import torch

    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(unclipped * adv, torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)


def _clipped(x: TokenInputs, o: ClipOptions) -> tuple[Tensor, dict[str, Tensor]]:
    return clipped_objective(x.ratio, x.adv, low=x.low, high=x.high, delta=o.delta), clip_stats(x)


CLIPPED = Objective("clipped", _clipped, "the clipped ratio", ClipOptions)


# ---------------------------------------------------------------- CISPO
def cispo_objective(ratio: Tensor, adv: Tensor, logps: Tensor, *, high: float) -> Tensor:
    """CISPO (arXiv:2506.13585): -sg(min(r, 1 + high)) A logp. The ratio is capped and held constant instead of
    clipping the objective: no token loses its gradient, a stale one only counts less; no lower cap."""
    import torch

    return -(torch.clamp(ratio, max=1.0 + high).detach() * adv) * logps


def _cispo(x: TokenInputs, o: None) -> tuple[Tensor, dict[str, Tensor]]:
    return cispo_objective(x.ratio, x.adv, x.logps, high=x.high), clip_stats(x, capped=True)


CISPO = Objective("cispo", _cispo, "CISPO's ratio weight, capped at 1 + epsilon_high and held constant")


# ---------------------------------------------------------------- SAPO
@dataclass
class SapoOptions:
    sapo_temperature_pos: float = doc(
        "sapo: the gate's temperature where A > 0.", default=1.0, check=POSITIVE
    )
    sapo_temperature_neg: float = doc(
        "sapo: the gate's temperature where A <= 0.", default=1.05, check=POSITIVE
    )


def sapo_objective(
    ratio: Tensor, adv: Tensor, *, temperature_pos: float, temperature_neg: float
) -> tuple[Tensor, Tensor]:
    """SAPO (arXiv:2511.20347): -(4 / tau) sigmoid(tau (r - 1)) A, tau = temperature_pos where A > 0, else
    temperature_neg. d/dr at r = 1 is exactly A (sigmoid' (0) = 1/4), so on-policy it is the plain policy
    gradient; away from 1 the gate fades smoothly instead of cutting off, faster for the larger temperature.
    Returns the per-token terms and the gate 4 s (1 - s), s = sigmoid(tau (r - 1)) (no gradient): the share of
    the plain policy gradient r A d logp each token keeps, 1 at r = 1."""
    import torch

    tau = torch.where(adv > 0, temperature_pos, temperature_neg).to(ratio.dtype)  # [B, 1]
    s = torch.sigmoid(tau * (ratio - 1.0))
    gate = (4.0 * s * (1.0 - s)).detach()
    return -(4.0 / tau) * s * adv, gate


def _sapo(x: TokenInputs, o: SapoOptions) -> tuple[Tensor, dict[str, Tensor]]:
    terms, gate = sapo_objective(
        x.ratio, x.adv, temperature_pos=o.sapo_temperature_pos, temperature_neg=o.sapo_temperature_neg
    )
    return terms, kept_stat("sapo", gate, x.mask)


SAPO = Objective("sapo", _sapo, "SAPO's soft gate on the ratio", SapoOptions, see="loss-variants.md#sapo")


# ---------------------------------------------------------------- VESPO
@dataclass
class VespoOptions:
    vespo_k_pos: float = doc("vespo: the kernel's power where A >= 0.", default=2.0, check=ZERO_OR_MORE)
    vespo_lambda_pos: float = doc("vespo: the kernel's decay where A >= 0.", default=3.0, check=ZERO_OR_MORE)
    vespo_k_neg: float = doc("vespo: the kernel's power where A < 0.", default=3.0, check=ZERO_OR_MORE)
    vespo_lambda_neg: float = doc("vespo: the kernel's decay where A < 0.", default=2.0, check=ZERO_OR_MORE)


def vespo_weight(
    logps: Tensor,
    old_logps: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    *,
    k: tuple[float, float],
    lam: tuple[float, float],
    token_weights: Tensor | None = None,
) -> Tensor:
    """VESPO's sequence weight phi(W) [B, 1] (no gradient): W = prod_t (pi / pi_old) w_t over the sequence's
    tokens and phi(W) = W^k exp(lam (1 - W)), (k, lam) = (k[0], lam[0]) where A >= 0, else (k[1], lam[1]).
    phi(1) = 1; far from 1 either way it fades smoothly. log W is kept within [log 1e-8, 20] so that phi stays
    finite. token_weights w [B, T] (rollout correction, off-policy masking) weigh the sequence against the
    policy that drew it, as the paper's W does: a weight of 0 makes W = 0, so phi = 0 and the sequence drops."""
    import torch

    log_ratio = (logps - (logps if old_logps is None else old_logps)).detach().clamp(-20.0, 20.0)
    log_w = (log_ratio * mask).sum(-1, keepdim=True)  # [B, 1]
    dropped = None
    if token_weights is not None:
        w = torch.where(mask > 0, token_weights.detach().to(logps.dtype), 1.0)
        log_w = log_w + torch.log(w).sum(-1, keepdim=True)
        dropped = (w == 0).any(-1, keepdim=True)
    log_w = log_w.clamp(math.log(1e-8), 20.0)
    pos = adv >= 0
    power = torch.where(pos, k[0], k[1]).to(logps.dtype)
    decay = torch.where(pos, lam[0], lam[1]).to(logps.dtype)
    phi = torch.exp(power * log_w + decay * (1.0 - torch.exp(log_w)))
    return phi if dropped is None else phi.masked_fill(dropped, 0.0)


def vespo_objective(logps: Tensor, weight: Tensor, adv: Tensor) -> Tensor:
    """VESPO (arXiv:2602.10693): -sg(phi(W)) A logp [B, T], with phi(W) [B, 1] from `vespo_weight`. phi(1) = 1,
    so on-policy it is the plain policy gradient."""
    return -(weight * adv) * logps


def _vespo(x: TokenInputs, o: VespoOptions) -> tuple[Tensor, dict[str, Tensor]]:
    k, lam = (o.vespo_k_pos, o.vespo_k_neg), (o.vespo_lambda_pos, o.vespo_lambda_neg)
    weight = vespo_weight(x.logps, x.old_logps, x.adv, x.mask, k=k, lam=lam, token_weights=x.token_weights)
    return vespo_objective(x.logps, weight, x.adv), kept_stat("vespo", weight, x.mask)


VESPO = Objective(
    "vespo", _vespo, "VESPO's kernel on the sequence weight W", VespoOptions, True, "loss-variants.md#vespo"
)


# ---------------------------------------------------------------- the terms every variant shares
@dataclass
class KlOptions:
    kl_estimator: Literal["k3", "k2"] = doc(
        "Per-token KL term of the loss: k3 = exp(ref - logp) - (ref - logp) - 1 (GRPO's), k2 = (logp - ref)^2 / 2, "
        "whose gradient is that of the reverse KL(policy || reference) (grpo/loss.py).",
        default="k3",
    )
    use_bias_correction_kl: bool = doc(
        "Times each token's KL term by its ratio pi / pi_old (DeepSeek-V3.2's unbiased KL); needs beta > 0.",
        default=False,
    )


TERMS = (
    SharedTerm(
        "the KL term",
        KlOptions,
        "`use_bias_correction_kl` multiplies each token's KL term by its token ratio pi / pi_old, whatever "
        "`importance_sampling_level` says; TRL multiplies it by the ratio of the loss, which under "
        "`importance_sampling_level: sequence` is the sequence's (GSPO's length-normalised) ratio.",
    ),
    SharedTerm(
        "the entropy bonus",
        None,
        "`entropy_coef` x the mean entropy over every loss token of the update (all ranks), whatever "
        "`top_entropy_quantile` keeps for the policy term; TRL takes the mean over the tokens the top-entropy mask "
        "keeps, per micro-batch. `use_adaptive_entropy` applies the coefficient from the first update on and "
        "steps it up while the entropy of all completion tokens is below `entropy_target`; TRL applies no bonus "
        "until a first step has measured the entropy, then only while the last measured entropy is at or below "
        "the target (of the tokens the top-entropy mask keeps).",
    ),
)

VARIANTS = {
    v.name: v
    for v in (
        LossVariant("grpo", CLIPPED, "sequence_mean", "DeepSeekMath, arXiv:2402.03300"),
        LossVariant(
            "bnpo",
            CLIPPED,
            "batch_token_mean",
            differs_from_trl="A token mean over each rank's share of the update, whatever `micro_batch_size`; "
            "TRL averages the token means of its micro-batches.",
        ),
        LossVariant("dr_grpo", CLIPPED, "constant", "Dr. GRPO, arXiv:2503.20783"),
        LossVariant("dapo", CLIPPED, "global_token_mean", "DAPO, arXiv:2503.14476"),
        LossVariant(
            "cispo",
            CISPO,
            "global_token_mean",
            "MiniMax-M1, arXiv:2506.13585",
            "The ratio cap is 1 + `epsilon_high` (MiniMax-M1's form); TRL caps it at `epsilon_high` itself "
            "(ScaleRL's): TRL's cap C is `epsilon_high: C - 1` here, and the log warns at `epsilon_high` above 1.",
        ),
        LossVariant(
            "sapo",
            SAPO,
            "global_token_mean",
            "SAPO, arXiv:2511.20347",
            "Reduced as `dapo`, a token mean over the update's loss tokens on every rank; TRL reduces it as "
            "`grpo`, a mean over each completion's tokens, then over the completions.",
        ),
        LossVariant("luspo", CLIPPED, "sequence_sum", "LUSPO, arXiv:2602.05261"),
        LossVariant(
            "vespo",
            VESPO,
            "global_token_mean",
            "VESPO, arXiv:2602.10693",
            "Like TRL, the token correction ratios fold into log W (TRL refuses the `sequence_*` modes, so do we); "
            "the off-policy mask folds in too, and a weight of 0 gives phi = 0 exactly, where TRL clamps log 0 to "
            "log 1e-8.",
        ),
    )
}
OBJECTIVES = {v.objective.name: v.objective for v in VARIANTS.values() if v.objective is not None}
# every options dataclass the loss receives, the shared ones first; their fields are the template's (LossOptions)
OPTION_CLASSES = tuple(
    dict.fromkeys(
        [t.options for t in TERMS if t.options is not None]
        + [o.options for o in OBJECTIVES.values() if o.options is not None]
    )
)
OPTION_FIELDS = {f.name: f for cls in OPTION_CLASSES for f in dataclasses.fields(cls)}
ALLOWED_LOSS_TYPES = f"use one of {', '.join(VARIANTS)} or package.module:function"


def option_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def options_of(cls: type | None, settings: dict[str, Any]) -> Any:
    """An options dataclass filled from the flat settings (its fields that are there; the rest default)."""
    if cls is None:
        return None
    return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})


# Every option as a flat template field, the first class's first (TrainConfig inherits this, via LossSettings).
LossOptions = dataclass(type("LossOptions", tuple(reversed(OPTION_CLASSES)), {"__module__": __name__}))
