"""Group-normalised advantages: how much better each sample did than its siblings from the same prompt."""

from __future__ import annotations

from collections.abc import Callable

import torch


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale: str = "group",
    eps: float = 1e-4,
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """A_i = (r_i - mean(r_group(i))) / (std + eps).

    rewards: [B] total reward per sample, B = prompts * G, the G samples of a prompt contiguous.
    scale: "group" divides by the std of each group (GRPO, DeepSeekMath arXiv:2402.03300),
           "batch" by the std of the whole batch (a more robust scale, as in arXiv:2508.08221),
           "none" leaves the centred rewards as they are (Dr. GRPO, arXiv:2503.20783).
    std is the unbiased sample std (divides by n - 1). batch_rewards: the rewards "batch" takes its std from
    when the batch is larger than `rewards` (every rank's samples; default: `rewards`). Returns [B] float32.
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations={num_generations} entries, "
            f"got shape {tuple(rewards.shape)}."
        )
    grouped = rewards.float().view(-1, num_generations)  # [P, G]
    # A group whose rewards are all equal teaches nothing: its advantages are exactly 0. The float32 mean of G
    # equal values need not equal them (8 x 0.733 gives a residue of 6e-8, which / (0 + eps) becomes 6e-4).
    spread = grouped.amax(dim=1, keepdim=True) > grouped.amin(dim=1, keepdim=True)  # [P, 1]
    centred = torch.where(spread, grouped - grouped.mean(dim=1, keepdim=True), 0.0)  # [P, G]
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True)  # [P, 1]
    elif scale == "batch":
        batch = (rewards if batch_rewards is None else batch_rewards).float()
        std = batch.std() if batch.numel() > 1 else batch.new_zeros(())
    elif scale == "none":
        return centred.reshape(-1)
    else:
        raise ValueError(f"scale = {scale!r} is not allowed: use group, batch or none.")
    # Zero-spread groups have centred == 0 and std == 0: the clamp keeps them 0 when eps is 0 (no 0 / 0).
    return (centred / (std + eps).clamp(min=torch.finfo(centred.dtype).tiny)).reshape(-1)  # [B]


def zero_spread_share(rewards: torch.Tensor, num_generations: int) -> float:
    """Share of groups whose G rewards are all equal: those groups carry no learning signal."""
    grouped = rewards.view(-1, num_generations)  # [P, G]
    return (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()


def reward_advantages(
    scores: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    *,
    scale: str = "group",
    aggregation: str = "sum_then_normalize",
    total: torch.Tensor | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages [B] from the rewards of several functions, scores [B, R] with weights [R].

    sum_then_normalize: group_advantages of the weighted sum sum_r w_r s_r (`total`, when given, is that sum).
    normalize_then_sum (GDPO, arXiv:2601.05242): A = sum_r w_r group_advantages(s_r), then
        (A - mean(A)) / (std(A) + eps) over the batch, so each reward counts by its weight, not by its scale.
    gather: a tensor [b] -> the same tensor of every rank (the batch statistics must not depend on the split
    over ranks; default: this process holds the whole batch)."""
    gather = gather or (lambda x: x)
    if aggregation == "sum_then_normalize":
        total = (scores * weights).sum(dim=1) if total is None else total  # [B]
        batch = gather(total) if scale == "batch" else None
        return group_advantages(total, num_generations, scale=scale, eps=eps, batch_rewards=batch)
    if aggregation != "normalize_then_sum":
        raise ValueError(
            f"aggregation = {aggregation!r} is not allowed: use sum_then_normalize or normalize_then_sum."
        )
    summed = torch.zeros(scores.shape[0], dtype=torch.float32, device=scores.device)  # [B]
    for r in range(scores.shape[1]):
        column = scores[:, r]
        batch = gather(column) if scale == "batch" else None
        summed += float(weights[r]) * group_advantages(
            column, num_generations, scale=scale, eps=eps, batch_rewards=batch
        )
    everyone = gather(summed)
    spread = everyone.std() if everyone.numel() > 1 else everyone.new_zeros(())
    return (summed - everyone.mean()) / (spread + eps)
