"""Sample weights and masks for tokens drawn by another policy than the one being trained: the decode path's
numerics (rollout correction) and the staleness of num_iterations > 1 (off-policy sequence masking).

Each returns a factor [B, T] or [B, 1] without gradient that multiplies the policy term of the loss (its
token_weights), so the KL term and every normaliser are untouched. Each works row by row, so it is the same
whatever micro_batch_size and the number of ranks.

    gap_t = log pi_train(y_t) - log pi_sampling(y_t)            (grpo/loss.py rollout_gap; 0 at padding)
    token_truncate     w_t = clamp(exp(gap_t), low, high)
    token_mask         w_t = exp(gap_t) if low <= exp(gap_t) <= high else 0
    sequence_truncate  w_t = clamp(exp(sum_t gap_t), low, high)     one weight per sequence
    sequence_mask      w_t = exp(sum_t gap_t) if low <= exp(sum_t gap_t) <= high else 0
(low, high: vllm_importance_sampling_clip_min, _clip_max; no low bound when clip_min is null)
(Yao et al., "Your efficient RL framework secretly brings you off-policy RL training", 2025; the masked forms
as in "When speed kills stability", Liu et al., 2025.)
"""

from __future__ import annotations

import torch

ROLLOUT_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@torch.no_grad()
def rollout_correction_weights(
    gap: torch.Tensor, mask: torch.Tensor, *, mode: str, high: float, low: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [B, T], masked [B, T] bool) from the log gap [B, T] (module docstring): the importance weight of
    each token, clamped to [low, high] or set to 0 outside it, and which tokens of `mask` a mask mode dropped.
    A sequence weight is the product of its token ratios, the exact importance weight of the whole sequence."""
    if mode not in ROLLOUT_CORRECTION_MODES:
        raise ValueError(f"mode = {mode!r} is not allowed: use one of {', '.join(ROLLOUT_CORRECTION_MODES)}.")
    level, action = mode.split("_")
    log_ratio = gap if level == "token" else (gap * mask).sum(-1, keepdim=True)  # [B, T] or [B, 1]
    ratio = torch.exp(log_ratio.double())  # a sequence's sum of gaps can exceed float32's exp range
    if action == "truncate":
        weights, kept = ratio.clamp(min=low, max=high), torch.ones_like(ratio, dtype=torch.bool)
    else:
        kept = (ratio >= (low or 0.0)) & (ratio <= high)
        weights = torch.where(kept, ratio, 0.0)
    masked = (~kept).expand_as(mask) & mask.bool()
    return weights.expand_as(mask).to(gap.dtype), masked


@torch.no_grad()
def off_policy_sequence_mask(
    logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """Off-policy sequence masking (DeepSeek-V3.2, arXiv:2512.02556, eq. 9): 0 for a sequence with A < 0 whose
    mean log(pi_sampling / pi) over its tokens exceeds threshold, else 1; [B, 1] in logps' dtype.

    A negative advantage on a sequence the current policy already finds much less likely than the sampler did
    pushes it down further still, for little to learn: those sequences are the ones that destabilise training."""
    m = mask.to(logps.dtype)
    divergence = ((sampling_logps - logps) * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
    drop = (advantages < 0) & (divergence > threshold)
    return (~drop).to(logps.dtype).unsqueeze(-1)
