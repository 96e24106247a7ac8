"""Scoring rollouts, the one way training and evaluation share: what each sample's text is, what its reward
functions are handed, and the scores. Several rollouts (an evaluation's chunks) are scored in one call of each
reward function, so a function sees the whole set at once either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from grpo.rewards.scoring import Reward, RewardInputs, score

if TYPE_CHECKING:
    from grpo.rollout.generate import Rollout


@dataclass
class RolloutScores:
    """Per sample, in the rollouts' order: the text the rewards scored, the tokens the model wrote, the
    conversation (None without turns), and the raw scores [N, R]."""

    texts: list[str]
    lengths: list[int]
    conversations: list[Any] | None
    scores: torch.Tensor


def completion_texts(ro: Rollout, tokenizer: Any, response_prefix: str) -> list[str]:
    """What the rewards score: with turns the model's own replies (a tool's output is in the messages), else
    the decoded completion after the response prefix, which the prompt prefilled but is part of the reply."""
    if ro.conversations is not None:
        return [conv.text for conv in ro.conversations]
    ids = ro.completion_ids.masked_fill(ro.completion_mask == 0, tokenizer.pad_token_id)
    return [response_prefix + text for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def score_rollouts(
    rewards: list[Reward],
    rollouts: list[Rollout],
    prompts: list[Any],
    tokenizer: Any,
    *,
    response_prefix: str,
    tags: Any,
    max_completion_length: int,
) -> RolloutScores:
    """Score the samples of `rollouts`, in order; `prompts` holds each sample's Prompt (a prompt once per
    sample). The rollouts all have turns or none do."""
    texts = [text for ro in rollouts for text in completion_texts(ro, tokenizer, response_prefix)]
    lengths = [n for ro in rollouts for n in ro.trained_mask.sum(-1).tolist()]  # the tokens the model wrote
    with_turns = rollouts[0].conversations is not None
    conversations = [conv for ro in rollouts for conv in ro.conversations] if with_turns else None
    inputs = RewardInputs.of(
        prompts,
        lengths,
        tags=tags,
        max_completion_length=max_completion_length,
        completions=texts,
        conversations=conversations,
    )
    references = [p.reference for p in prompts]
    scores = score(rewards, texts, references, **inputs.as_kwargs())  # [N, R]
    return RolloutScores(texts, lengths, conversations, scores)
