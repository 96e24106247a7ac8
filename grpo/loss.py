"""The clipped policy loss of GRPO and its variants. Pure: tensors in, (loss, stats) out.

Shapes: B sequences, T completion tokens. All inputs are [B, T] except advantages [B].

    r_t   = exp(logp_t - old_logp_t)                                  (token level, GRPO)
    r_t   = exp(sum_t m_t (logp_t - old_logp_t) / sum_t m_t)          (sequence level, GSPO arXiv:2507.18071)
    l_t   = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3 estimator, always >= 0)
    KL_t  = (logp_t - ref_t)^2 / 2                                     (kl_estimator: k2)
           Both estimate KL(pi || ref) as values; as losses, on samples from pi, the k3 term's expected
           gradient is that of KL(ref || pi), the k2 term's that of KL(pi || ref) (reverse KL, the usual aim)
    delta: the first r_t in l_t becomes min(r_t, delta) (two-sided clipping, INTELLECT-2): with A < 0 the
           unclipped term r_t A otherwise grows without bound as r_t does
    cispo: l_t = -sg(min(r_t, 1 + epsilon_high)) A logp_t + beta * KL_t   (CISPO, arXiv:2506.13585)
           the ratio is capped and held constant instead of clipping the objective: no token loses its
           gradient, a stale one only counts less; no lower cap (epsilon unused); normalised as dapo
    sapo:  l_t = -(4 / tau) sigmoid(tau (r_t - 1)) A + beta * KL_t, tau = tau_pos if A > 0 else tau_neg
           (SAPO, arXiv:2511.20347): a smooth gate instead of a hard clip; normalised as dapo
    luspo: the clipped objective, each sequence's term times its length (LUSPO, arXiv:2602.05261)
    vespo: l_t = -sg(phi(W)) A logp_t, W = prod_t r_t, phi(W) = W^k exp(lambda (1 - W)), (k, lambda) by the
           sign of A (VESPO, arXiv:2602.10693): a smooth reshaping of the whole sequence's weight; as dapo
    use_bias_correction_kl: KL_t becomes r_t KL_t, the token ratio r_t = pi / pi_old keeping its gradient
           (DeepSeek-V3.2, arXiv:2512.02556): the k3 term's gradient is then that of KL(pi || ref) also when
           the tokens were drawn by pi_old

A variant is a per-token objective (clipped ratio, CISPO; GSPO changes the ratio) and a reduction of the
per-token terms l to one number (m = loss mask, B sequences of the update, N its tokens on every rank):
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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL_ESTIMATORS = ("k3", "k2")
REDUCTIONS = ("sequence_mean", "batch_token_mean", "constant", "global_token_mean", "sequence_sum")
PRESETS = {  # loss_type -> (per-token objective, reduction)
    "grpo": ("clipped", "sequence_mean"),
    "bnpo": ("clipped", "batch_token_mean"),
    "dr_grpo": ("clipped", "constant"),
    "dapo": ("clipped", "global_token_mean"),
    "cispo": ("cispo", "global_token_mean"),
    "sapo": ("sapo", "global_token_mean"),
    "luspo": ("clipped", "sequence_sum"),
    "vespo": ("vespo", "global_token_mean"),
}
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


def clipped_objective(
    ratio: torch.Tensor, adv: torch.Tensor, *, low: float, high: float, delta: float | None = None
) -> torch.Tensor:
    """PPO's pessimistic clipped term -min(r A, clip(r, 1 - low, 1 + high) A); delta caps the unclipped r."""
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return -torch.min(unclipped * adv, torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv)


def cispo_objective(
    ratio: torch.Tensor, adv: torch.Tensor, logps: torch.Tensor, *, high: float
) -> torch.Tensor:
    """CISPO (arXiv:2506.13585): -sg(min(r, 1 + high)) A logp; the capped ratio is a constant weight."""
    return -(torch.clamp(ratio, max=1.0 + high).detach() * adv) * logps


def sapo_objective(
    ratio: torch.Tensor, adv: torch.Tensor, *, temperature_pos: float, temperature_neg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO (arXiv:2511.20347): -(4 / tau) sigmoid(tau (r - 1)) A, tau = temperature_pos where A > 0, else
    temperature_neg. d/dr at r = 1 is exactly A (sigmoid' (0) = 1/4), so on-policy it is the plain policy
    gradient; away from 1 the gate fades smoothly instead of cutting off, faster for the larger temperature.
    Returns the per-token terms and the gate 4 s (1 - s), s = sigmoid(tau (r - 1)) (no gradient): the share of
    the plain policy gradient r A d logp each token keeps, 1 at r = 1."""
    tau = torch.where(adv > 0, temperature_pos, temperature_neg).to(ratio.dtype)  # [B, 1]
    s = torch.sigmoid(tau * (ratio - 1.0))
    gate = (4.0 * s * (1.0 - s)).detach()
    return -(4.0 / tau) * s * adv, gate


def vespo_weight(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    k: tuple[float, float],
    lam: tuple[float, float],
) -> torch.Tensor:
    """VESPO's sequence weight phi(W) [B, 1] (no gradient): W = prod_t pi / pi_old over the sequence and
    phi(W) = W^k exp(lam (1 - W)), (k, lam) = (k[0], lam[0]) where A >= 0, else (k[1], lam[1]). phi(1) = 1; far
    from 1 either way it fades smoothly. log W is kept within [log 1e-8, 20] so that phi stays finite."""
    log_ratio = (logps - (logps if old_logps is None else old_logps)).detach().clamp(-20.0, 20.0)
    log_w = (log_ratio * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)  # [B, 1]
    pos = adv >= 0
    power = torch.where(pos, k[0], k[1]).to(logps.dtype)
    decay = torch.where(pos, lam[0], lam[1]).to(logps.dtype)
    return torch.exp(power * log_w + decay * (1.0 - torch.exp(log_w)))


def vespo_objective(logps: torch.Tensor, weight: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """VESPO (arXiv:2602.10693): -sg(phi(W)) A logp [B, T], with phi(W) [B, 1] from `vespo_weight`. phi(1) = 1,
    so on-policy it is the plain policy gradient."""
    return -(weight * adv) * logps


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
    kl_estimator: str = "k3",
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss l [B, T] (not yet masked) and its stats: the policy term, times token_mask and
    token_weights, plus beta x KL (times the token ratio pi / pi_old with use_bias_correction_kl)."""
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator = {kl_estimator!r} is not allowed: use {' or '.join(KL_ESTIMATORS)}.")
    mask = mask.to(logps.dtype)  # [B, T]
    ratio = importance_ratio(logps, old_logps, mask, importance_sampling_level)  # [B, T] or [B, 1]
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1).to(logps.dtype)  # [B, 1]
    kept = None  # sapo and vespo: the share of the plain policy gradient each token keeps
    if objective == "cispo":
        per_token = cispo_objective(ratio, adv, logps, high=high)  # [B, T]
    elif objective == "sapo":
        per_token, kept = sapo_objective(
            ratio, adv, temperature_pos=sapo_temperature_pos, temperature_neg=sapo_temperature_neg
        )
    elif objective == "vespo":
        k, lam = (vespo_k_pos, vespo_k_neg), (vespo_lambda_pos, vespo_lambda_neg)
        kept = vespo_weight(logps, old_logps, adv, mask, k=k, lam=lam)  # [B, 1]
        per_token = vespo_objective(logps, kept, adv)
    else:
        per_token = clipped_objective(ratio, adv, low=epsilon, high=high, delta=delta)
    per_token = per_token.expand_as(mask)
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)
    kl = None
    if beta > 0:
        kl = kl_term(logps, ref_logps, kl_estimator)
        if use_bias_correction_kl:  # the token ratio, whatever importance_sampling_level says
            kl = importance_ratio(logps, old_logps, mask) * kl
        per_token = per_token + beta * kl
    stats = _stats(ratio.expand_as(mask), adv, mask, kl, epsilon, high, capped=objective == "cispo")
    if kept is not None:  # nothing is clipped: the share of the gradient kept shows the variant acting
        stats = {"kl": stats["kl"], f"{objective}/gradient_kept": _masked_mean(kept.expand_as(mask), mask)}
    return per_token, stats


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
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    delta: float | None = None,
    **variant: float | bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A built-in variant on one batch: (scalar loss, stats). old_logps None means on-policy (ratio exactly 1).

    token_mask [B, T] (0/1): tokens whose clipped policy term counts, e.g. the high-entropy minority of
    arXiv:2506.01939; the KL term and every normaliser still use `mask`, so dropping a token scales nothing up.
    token_weights [B, T] (no gradient): a factor on each token's policy term, e.g. `rollout_is_weights`.
    variant: the settings of one variant (sapo_*, vespo_*, use_bias_correction_kl); see token_terms.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type = {loss_type!r} is not allowed: use one of {', '.join(LOSS_TYPES)}.")
    objective, reduction = PRESETS[loss_type]
    terms, stats = token_terms(
        logps,
        old_logps,
        ref_logps,
        advantages,
        mask,
        objective=objective,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        importance_sampling_level=importance_sampling_level,
        token_mask=token_mask,
        token_weights=token_weights,
        kl_estimator=kl_estimator,
        delta=delta,
        **variant,
    )
    loss = reduce(
        terms,
        mask,
        reduction,
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


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def _stats(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    low: float,
    high: float,
    capped: bool = False,
) -> dict[str, torch.Tensor]:
    """Clip ratios count tokens where clipping actually removed the gradient (the sign of A decides which side);
    `capped` (cispo): tokens whose ratio weight was capped, whatever the sign."""
    if capped:
        low_clipped = torch.zeros_like(mask)
        high_clipped = (ratio > 1.0 + high).to(mask.dtype)
    else:
        low_clipped = ((ratio < 1.0 - low) & (adv < 0)).to(mask.dtype)
        high_clipped = ((ratio > 1.0 + high) & (adv > 0)).to(mask.dtype)
    return {
        "kl": _masked_mean(kl, mask) if kl is not None else mask.new_zeros(()),
        "clip_ratio_low": _masked_mean(low_clipped, mask),
        "clip_ratio_high": _masked_mean(high_clipped, mask),
        "clip_ratio": _masked_mean(torch.clamp(low_clipped + high_clipped, max=1.0), mask),
    }
