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

Normalisations (m = completion mask):
    grpo    mean_b [ sum_t m l / sum_t m ]            per-sequence mean, then mean (arXiv:2402.03300)
    bnpo    sum_bt m l / sum_bt m                     token mean over this batch
    dr_grpo sum_bt m l / (B * max_completion_length)  constant normaliser, no length bias (arXiv:2503.20783)
    dapo    sum_bt m l / num_items_in_batch           token mean over the whole global batch (arXiv:2503.14476)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
KL_ESTIMATORS = ("k3", "k2")
# Divided by the token count of the whole global batch (all ranks, all micro-batches), not per micro-batch.
GLOBAL_TOKEN_LOSSES = ("dapo", "cispo")


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (scalar loss, stats). old_logps None means the samples are on-policy (ratio exactly 1).

    token_mask [B, T] (0/1): tokens whose clipped policy term counts, e.g. the high-entropy minority of
    arXiv:2506.01939; the KL term and every normaliser still use `mask`, so dropping a token scales nothing up.
    token_weights [B, T] (no gradient): a factor on each token's policy term, e.g. `rollout_is_weights`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type = {loss_type!r} is not allowed: use one of {', '.join(LOSS_TYPES)}.")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0.")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator = {kl_estimator!r} is not allowed: use {' or '.join(KL_ESTIMATORS)}.")
    mask = mask.to(logps.dtype)  # [B, T]
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old  # [B, T]
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level = {importance_sampling_level!r}: use token or sequence.")
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.unsqueeze(-1).to(logps.dtype)  # [B, 1]
    if loss_type == "cispo":
        per_token = -(torch.clamp(ratio, max=1.0 + high).detach() * adv) * logps  # [B, T]
    else:
        clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.min(unclipped * adv, clipped * adv)  # [B, T]
    per_token = per_token.expand_as(mask)
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)

    kl = None
    if beta > 0:
        delta = ref_logps - logps  # [B, T]
        kl = torch.exp(delta) - delta - 1.0 if kl_estimator == "k3" else 0.5 * delta**2
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * length)
    else:
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / torch.as_tensor(count, dtype=logps.dtype).clamp(min=1.0)

    stats = _stats(ratio.expand_as(mask), adv, mask, kl, epsilon, high, capped=loss_type == "cispo")
    return loss, stats


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


LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def micro_batch_weight(loss_type: str, micro_batch: int, local_batch: int) -> float:
    """Factor that makes the sum of micro-batch losses equal the full-batch loss.

    grpo and dr_grpo average over sequences, so each micro-batch counts by its share of sequences. dapo and
    cispo already divide by the global token count. bnpo is a token mean per micro-batch (as in TRL),
    weighted by sequences.
    """
    return 1.0 if loss_type in GLOBAL_TOKEN_LOSSES else micro_batch / local_batch
