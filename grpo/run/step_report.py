"""What a step reports about its samples: reward and length metrics, and one sample record per prompt for
samples.jsonl. The trainer adds the loss statistics, timings and memory."""

from __future__ import annotations

from typing import Any

import torch

from grpo.advantages import zero_spread_share
from grpo.data import Prompt
from grpo.rewards import Reward
from grpo.rollout.turns.multi_turn import conversation_metrics, turn_records
from grpo.samples import Samples


def sample_metrics(
    first: Samples, rewards: list[Reward], num_generations: int, all_totals: torch.Tensor
) -> dict[str, float]:
    """reward/* and completion/* of the step's first round: the prompts a run without dynamic sampling sees.
    all_totals holds the total rewards of every rank's first round, for a spread over the whole batch."""
    scores, total = first.scores, first.total  # [N, R], [N]
    lengths = first.rollout.trained_mask.sum(-1).float()  # [N] the tokens the model wrote
    return {
        **{f"reward/{r.name}": float(scores[:, i].mean()) for i, r in enumerate(rewards)},
        "reward/total_mean": float(total.mean()),
        "reward/total_std": float(all_totals.std()) if all_totals.numel() > 1 else 0.0,
        "reward/zero_spread_groups": zero_spread_share(total, num_generations),
        "completion/length_mean": float(lengths.mean()),
        "completion/length_max": float(lengths.max()),
        "completion/truncated_share": float(first.rollout.truncated.float().mean()),
        **(conversation_metrics(first.rollout.conversations) if first.rollout.conversations else {}),
    }


def sample_records(
    step: Samples, prompts: list[Prompt], rewards: list[Reward], num_generations: int
) -> list[dict[str, Any]]:
    """The first completion of each prompt the step trained on, with its rewards (and turns)."""
    g, conversations = max(1, num_generations), step.rollout.conversations
    return [
        {
            "prompt": prompts[step.prompts[i // g]].row,
            "completion": step.texts[i],
            "reference": step.references[i],
            "reward": float(step.total[i]),
            "rewards": {r.name: float(step.scores[i, j]) for j, r in enumerate(rewards)},
            # with tools or an environment: each turn, and each call with its result
            **({"turns": turn_records(conversations[i])} if conversations else {}),
        }
        for i in range(0, len(step.texts), g)
    ]
