"""`Samples`, the record of one step's sampled groups (rollout, texts, references, dataset rows, reward
scores), and the row surgery on it and on a `Rollout`: picking whole groups and concatenating batches, with
columns that became all padding trimmed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grpo.rollout.generate import Rollout


@dataclass
class Samples:
    """One step's sampled groups: `prompts` holds each group's prompt index, the rest has G rows per group."""

    prompts: list[int]
    rollout: Rollout
    texts: list[str]
    references: list[str]
    rows: list[dict[str, Any]]
    scores: torch.Tensor  # [N, R] raw reward scores
    total: torch.Tensor  # [N] weighted sum

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def select(self, groups: list[int], pad_id: int) -> Samples:
        """The groups `groups` (indices into this batch), in that order."""
        g = self.rollout.group_size
        rows = [k * g + j for k in groups for j in range(g)]
        index = torch.tensor(rows, dtype=torch.long)
        return Samples(
            prompts=[self.prompts[k] for k in groups],
            rollout=select_rows(self.rollout, index, pad_id),
            texts=[self.texts[i] for i in rows],
            references=[self.references[i] for i in rows],
            rows=[self.rows[i] for i in rows],
            scores=self.scores[index],
            total=self.total[index],
        )


def select_rows(ro: Rollout, index: torch.Tensor, pad_id: int) -> Rollout:
    """Rows `index` of a rollout (whole groups), with columns that became all padding trimmed."""
    return concat_rollouts([ro.rows(index.to(ro.prompt_ids.device))], pad_id)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts in one: prompts left-padded and completions right-padded to common widths."""
    if not rollouts or len({ro.group_size for ro in rollouts}) != 1:
        raise ValueError("concat_rollouts needs at least one rollout, all with the same group_size.")
    prompt_width = max(_used_width(ro.prompt_mask.flip(1)) for ro in rollouts)  # left-padded
    completion_width = max(_used_width(ro.completion_mask) for ro in rollouts)  # right-padded

    def left(x: torch.Tensor, value: int) -> torch.Tensor:  # keep the last prompt_width columns
        x = x[:, max(x.shape[1] - prompt_width, 0) :]
        return F.pad(x, (prompt_width - x.shape[1], 0), value=value)

    def right(x: torch.Tensor, value: int) -> torch.Tensor:  # keep the first completion_width columns
        x = x[:, :completion_width]
        return F.pad(x, (0, completion_width - x.shape[1]), value=value)

    return Rollout(
        prompt_ids=torch.cat([left(ro.prompt_ids, pad_id) for ro in rollouts]),
        prompt_mask=torch.cat([left(ro.prompt_mask, 0) for ro in rollouts]),
        completion_ids=torch.cat([right(ro.completion_ids, pad_id) for ro in rollouts]),
        completion_mask=torch.cat([right(ro.completion_mask, 0) for ro in rollouts]),
        truncated=torch.cat([ro.truncated for ro in rollouts]),
        group_size=rollouts[0].group_size,
        sampling_logps=None
        if any(ro.sampling_logps is None for ro in rollouts)
        else torch.cat([right(ro.sampling_logps, 0) for ro in rollouts]),
        model_written=None
        if all(ro.model_written is None for ro in rollouts)
        else torch.cat([right(ro.trained_mask, 0) for ro in rollouts]),
        conversations=None
        if any(ro.conversations is None for ro in rollouts)
        else [c for ro in rollouts for c in ro.conversations],
    )


def _used_width(mask: torch.Tensor) -> int:
    """Columns up to the last one that holds a token in some row."""
    used = mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if used.numel() else 0


def concat_samples(parts: list[Samples], pad_id: int) -> Samples:
    return Samples(
        prompts=[i for p in parts for i in p.prompts],
        rollout=concat_rollouts([p.rollout for p in parts], pad_id),
        texts=[t for p in parts for t in p.texts],
        references=[r for p in parts for r in p.references],
        rows=[r for p in parts for r in p.rows],
        scores=torch.cat([p.scores for p in parts]),
        total=torch.cat([p.total for p in parts]),
    )
