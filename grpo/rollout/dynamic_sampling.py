"""DAPO's dynamic sampling (arXiv:2503.14476, section 3.2): train only on prompts whose G samples disagree.

A group whose G rewards are all equal has zero advantages: it adds nothing to the policy gradient and only
shrinks the effective batch. With `dynamic_sampling` the trainer drops such groups and samples further batches
of prompts until `batch_size` informative groups are collected or `dynamic_sampling_max_rounds` rollouts have
run; a batch still short is topped up with dropped groups (zero advantages), so every step trains on the same
number of sequences and every rank runs the same number of rollouts (FSDP gathers weights for each one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from grpo.samples import Samples, concat_samples


def fill_batch(
    sample_round: Callable[[], Samples],
    *,
    batch_size: int,
    max_rounds: int,
    pad_id: int,
    any_rank: Callable[[bool], bool] = lambda flag: flag,
    mini_batches: int = 1,
) -> tuple[Samples, Samples, dict[str, float]]:
    """Call `sample_round` (one rollout of batch_size prompts, scored) until batch_size informative groups are
    kept or max_rounds rounds have run, then top up with dropped groups. `any_rank(flag)` is True when the flag
    is set on any rank: every rank goes on while one still needs groups. The top-ups are spread evenly over the
    `mini_batches` (else a whole mini-batch could be groups that teach nothing). Returns (the first round, the
    batch to train on, metrics: completion tokens sampled, rounds, informative share of the batch)."""
    first = current = sample_round()
    kept, dropped, have, rounds, tokens = [], [], 0, 1, first.rollout.num_completion_tokens
    while True:
        flags = informative_groups(current.total, current.rollout.group_size)
        good = [k for k, f in enumerate(flags) if f][: batch_size - have]
        bad = [k for k, f in enumerate(flags) if not f]
        kept += [current.select(good, pad_id)] if good else []
        dropped += [current.select(bad, pad_id)] if bad else []
        have += len(good)
        # Every rank takes the same decision, so all run the same number of rollouts.
        if rounds >= max_rounds or not any_rank(have < batch_size):
            break
        current = sample_round()
        tokens += current.rollout.num_completion_tokens
        rounds += 1
    for part in dropped:  # top up a short batch with groups that teach nothing (zero advantages)
        short = batch_size - sum(k.num_groups for k in kept)
        if short <= 0:
            break
        kept.append(part.select(list(range(min(short, part.num_groups))), pad_id))
    stats = {
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/informative_share": have / batch_size,
    }
    batch = concat_samples(kept, pad_id)
    if have < batch.num_groups and mini_batches > 1:
        batch = batch.select(spread_top_ups(have, batch.num_groups - have, mini_batches), pad_id)
    return first, batch, {"tokens": tokens, **stats}


def spread_top_ups(informative: int, top_ups: int, mini_batches: int) -> list[int]:
    """An order of the groups [informative..., top-ups...] in which each of the equal, contiguous mini-batches
    holds an even share of the top-ups."""
    size = (informative + top_ups) // mini_batches
    good, filler = list(range(informative)), list(range(informative, informative + top_ups))
    order: list[int] = []
    for j in range(mini_batches):
        share = top_ups * (j + 1) // mini_batches - top_ups * j // mini_batches
        order += filler[:share] + good[: size - share]
        filler, good = filler[share:], good[size - share :]
    return order


def informative_groups(total: torch.Tensor, group_size: int) -> list[bool]:
    """Per group: do its G total rewards differ (a non-zero advantage somewhere)?"""
    grouped = total.view(-1, group_size)  # [B, G]
    return (grouped.max(dim=1).values != grouped.min(dim=1).values).tolist()
