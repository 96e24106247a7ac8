"""The policy loss of GRPO and its variants. Pure: tensors in, (loss, stats) out.

Shapes: B sequences, T completion tokens. All inputs are [B, T] except advantages [B].

A variant (config.loss_type) is one entry of the loss table, grpo/config/loss_table.py: a per-token objective
(the clipped ratio, CISPO, SAPO, VESPO, each with its formula and paper there) and a reduction. Here are what
every variant shares, the ratio, the KL term and the reductions, and `token_terms`, which runs an objective:

    r_t   = exp(logp_t - old_logp_t)                                  (token level, GRPO)
    r_t   = exp(sum_t m_t (logp_t - old_logp_t) / sum_t m_t)          (sequence level, GSPO arXiv:2507.18071)
    l_t   = objective_t(r, A) x token_mask_t x token_weights_t + beta * KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3 estimator, always >= 0)
    KL_t  = (logp_t - ref_t)^2 / 2                                     (kl_estimator: k2)
           Both estimate KL(pi || ref) as values; as losses, on samples from pi, the k3 term's expected
           gradient is that of KL(ref || pi), the k2 term's that of KL(pi || ref) (reverse KL, the usual aim)
    use_bias_correction_kl: KL_t becomes r_t KL_t, the token ratio r_t = pi / pi_old keeping its gradient
           (DeepSeek-V3.2, arXiv:2512.02556): the k3 term's gradient is then that of KL(pi || ref) also when
           the tokens were drawn by pi_old
    (an objective that folds the token weights in, VESPO's, takes them inside instead of being multiplied)

The reductions of the per-token terms l to one number (m = loss mask, B sequences of the update, N its tokens on
every rank):
    sequence_mean     mean_b [ sum_t m l / sum_t m ]      grpo (arXiv:2402.03300)
    batch_token_mean  sum_bt m l / sum_bt m, per rank     bnpo: each rank's token mean, then the mean over ranks
    constant          sum_bt m l / (B * max_completion)   dr_grpo, no length bias (arXiv:2503.20783)
    global_token_mean sum_bt m l / N                      dapo, cispo, sapo, vespo (arXiv:2503.14476)
    sequence_sum      mean_b [ sum_t m l ]                 luspo (arXiv:2602.05261)

`policy_loss` applies a variant to one batch. In training, `UpdateScale` turns each micro-batch's terms into its
share of the update's reduction, weighted so that the micro-batches summed and the ranks averaged (DDP, FSDP)
give the reduction of the whole update, whatever micro_batch_size and the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from grpo.config.loss_table import (
    OBJECTIVES,
    OPTION_FIELDS,
    REDUCTIONS,
    VARIANTS,
    KlOptions,
    TokenInputs,
    cispo_objective,
    clipped_objective,
    masked_mean,
    options_of,
    sapo_objective,
    vespo_objective,
    vespo_weight,
)

__all__ = [  # the objectives' building blocks live in the loss table; they are importable from here too
    "KL_ESTIMATORS",
    "REDUCTIONS",
    "UpdateScale",
    "adaptive_entropy_coef",
    "cispo_objective",
    "clipped_objective",
    "importance_ratio",
    "kl_term",
    "policy_loss",
    "reduce",
    "reduced_by",
    "rollout_gap",
    "rollout_is_weights",
    "rollout_mismatch_kl",
    "sapo_objective",
    "token_terms",
    "vespo_objective",
    "vespo_weight",
]

KL_ESTIMATORS = ("k3", "k2")
LossFn = TypeVar("LossFn", bound=Callable)


def reduced_by(reduction: str) -> Callable[[LossFn], LossFn]:
    """Declare how a user loss is reduced: `@reduced_by("global_token_mean")` above `def my_loss(...)`.

    A loss that returns per-token terms [B, T] is reduced that way by the trainer; one that returns a scalar
    declares the reduction it computed over the batch it was handed (with num_items_in_batch, the update's
    token count on every rank, for global_token_mean), and the trainer weighs the micro-batches to match."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction = {reduction!r} is not allowed: use one of {', '.join(REDUCTIONS)}.")

    def declare(fn: LossFn) -> LossFn:
        fn.reduction = reduction
        return fn

    return declare


def importance_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """pi / pi_old per token [B, T], or GSPO's length-normalised sequence ratio [B, 1] (arXiv:2507.18071)."""
    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)  # [B, T]
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    elif level != "token":
        raise ValueError(f"importance_sampling_level = {level!r}: use token or sequence.")
    return torch.exp(log_ratio)


def kl_term(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) [B, T]: k3 = e^d - d - 1, k2 = d^2 / 2, with d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0 if estimator == "k3" else 0.5 * d**2


def token_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str = "clipped",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    token_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss l [B, T] (not yet masked) and its stats: the objective's term (grpo/config/
    loss_table.py), times token_mask and token_weights, plus beta x KL (times the token ratio pi / pi_old with
    use_bias_correction_kl). options: any option of the loss table by its template name (kl_estimator, delta,
    sapo_*, vespo_*, ...); each objective reads its own, the rest default as its dataclass says."""
    unknown = [name for name in options if name not in OPTION_FIELDS]
    if unknown:
        raise TypeError(f"token_terms() got an unexpected keyword argument {unknown[0]!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective = {objective!r} is not allowed: use one of {', '.join(OBJECTIVES)}.")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0.")
    kl_options: KlOptions = options_of(KlOptions, options)
    if kl_options.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"kl_estimator = {kl_options.kl_estimator!r} is not allowed: use {' or '.join(KL_ESTIMATORS)}."
        )
    chosen = OBJECTIVES[objective]
    mask = mask.to(logps.dtype)  # [B, T]
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)  # [B, T] or [B, 1]
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1).to(logps.dtype)  # [B, 1]
    folded = token_weights if chosen.folds_token_weights else None
    inputs = TokenInputs(logps, old_logps, ratio, adv, mask, epsilon, high, folded)
    per_token, stats = chosen.terms(inputs, options_of(chosen.options, options))
    per_token = per_token.expand_as(mask)
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)
    if token_weights is not None and folded is None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    kl = None
    if beta > 0:
        kl = kl_term(logps, ref_logps, kl_options.kl_estimator)
        if kl_options.use_bias_correction_kl:  # the token ratio, whatever importance_sampling_level says
            kl = importance_ratio(logps, old_logps, mask) * kl
        per_token = per_token + beta * kl
    with torch.no_grad():
        kl_mean = masked_mean(kl, mask) if kl is not None else mask.new_zeros(())
    return per_token, {"kl": kl_mean, **stats}


def reduce(
    terms: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One batch's per-token terms [B, T] to a scalar (module docstring); global_token_mean divides by
    num_items_in_batch when given, else by this batch's tokens."""
    mask = mask.to(terms.dtype)
    masked = terms * mask  # [B, T]
    if reduction == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if reduction == "batch_token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if reduction == "constant":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        return masked.sum() / (mask.shape[0] * length)
    if reduction == "global_token_mean":
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return masked.sum() / torch.as_tensor(count, dtype=terms.dtype).clamp(min=1.0)
    if reduction == "sequence_sum":
        return masked.sum(-1).mean()
    raise ValueError(f"reduction = {reduction!r} is not allowed: use one of {', '.join(REDUCTIONS)}.")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    **settings: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A built-in variant on one batch: (scalar loss, stats). old_logps None means on-policy (ratio exactly 1).
    It takes what a user loss is called with, so the trainer calls a built-in the same way.

    settings: token_terms' (epsilon, epsilon_high, beta, importance_sampling_level, the options of the loss
    table), and token_mask [B, T] (0/1): tokens whose policy term counts, e.g. the high-entropy minority of
    arXiv:2506.01939; the KL term and every normaliser still use `mask`, so dropping a token scales nothing up;
    token_weights [B, T] (no gradient): a factor on each token's policy term, e.g. `rollout_is_weights`.
    """
    variant = VARIANTS.get(loss_type)
    if variant is None:
        raise ValueError(f"loss_type = {loss_type!r} is not allowed: use one of {', '.join(VARIANTS)}.")
    terms, stats = token_terms(
        logps, old_logps, ref_logps, advantages, mask, objective=variant.objective.name, **settings
    )
    loss = reduce(
        terms,
        mask,
        variant.reduction,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )
    return loss, stats


@dataclass(frozen=True)
class UpdateScale:
    """How one optimizer update's micro-batches add up to its reduction over every rank.

    Each micro-batch backpropagates its share of the rank's objective; backward then averages the ranks
    (DDP, FSDP). The shares are weighted so that sum over micro-batches, mean over ranks = the reduction of the
    whole update: exact for any micro_batch_size and any number of ranks (batch_token_mean is per rank).
    """

    reduction: str
    rows: int  # this rank's sequences in the update
    tokens: torch.Tensor  # this rank's loss tokens in the update
    global_tokens: torch.Tensor  # every rank's
    world_size: int  # the ranks backward averages over
    max_completion_length: int

    def of_terms(self, terms: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's per-token terms [b, T] as its share of the rank's objective."""
        loss = reduce(
            terms,
            mask,
            self.reduction,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=self.global_tokens,
        )
        return self.of_scalar(loss, mask)

    def of_scalar(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's scalar, computed with the declared reduction over that micro-batch alone (for
        global_token_mean: divided by every rank's tokens, num_items_in_batch), as its share of the rank's
        objective."""
        if self.reduction == "batch_token_mean":
            return loss * (mask.sum() / self.tokens.clamp(min=1.0))
        if self.reduction == "global_token_mean":
            return loss * float(self.world_size)  # backward's rank average would shrink a global mean
        return loss * (mask.shape[0] / self.rows)

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the mean of `values` [b, T] over the update's loss tokens on every rank (the
        entropy bonus)."""
        return (values * mask.to(values.dtype)).sum() / (self.global_tokens.clamp(min=1) / self.world_size)


def rollout_gap(train_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_train / pi_rollout) per sampled token [B, T], 0 at padding: how much more (or less) likely the
    training forward finds each token than the decode path that drew it. Both are the same policy, so any gap is
    numerical: bf16, fused or packed decode kernels, CUDA graphs, LoRA dropout in the training forward."""
    return (train_logps.detach() - rollout_logps) * mask.to(train_logps.dtype)


def rollout_mismatch_kl(gap: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the k3 estimate of KL(pi_rollout || pi_train) from tokens drawn by the rollout:
    with r = pi_train / pi_rollout = exp(gap), r - 1 - log r >= 0 per token (0 at padding, where gap = 0)."""
    gap = gap.double()  # the terms are ~gap^2 / 2: fp32 cancellation would make small ones negative
    return (torch.expm1(gap) - gap).sum()


def rollout_is_weights(gap: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al., "Your efficient RL framework secretly brings you off-policy
    RL training", 2025): min(pi_train / pi_rollout, cap) per token, so the gradient estimate is taken as if the
    training policy had drawn the samples, with the cap bounding its variance."""
    return torch.exp(gap).clamp(max=cap)


def adaptive_entropy_coef(
    coef: float, entropy: float, *, target: float, delta: float, low: float = 0.0, high: float = 1.0
) -> float:
    """Adaptive entropy control (Skywork-OR1, arXiv:2505.22312): the next update's coefficient is coef + delta
    when the measured entropy is below target, else coef - delta, kept within [low, high]; the bonus
    -coef x entropy then pulls the entropy towards the target from either side."""
    return min(max(coef + (delta if entropy < target else -delta), low), high)
