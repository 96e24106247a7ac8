"""Group-normalised advantages: how much better each sample did than its siblings from the same prompt."""

from __future__ import annotations

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
