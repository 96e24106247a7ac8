"""Held-out evaluation: greedy (or K sampled) answers scored with the template's own reward functions.

Accuracy is the hit rate of the correctness reward (score > 0): the reward named `correctness` in the
template (the built-in, or a user function `package.module:correctness`), else the built-in. Format rates
always use the built-in strict_format / soft_format with the template's tags, so runs stay comparable.
With K > 1 samples per prompt, accuracy is the mean over all samples (pass@1) and pass@K the share of prompts
with at least one correct sample.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm import tqdm

from grpo import rewards as rw
from grpo.builtin_tasks import BUILTIN_SEEDS
from grpo.config import ConfigError, Template
from grpo.data import Prompt, build_prompts, complete_rows, load_rows
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.sampler import Sampler
from grpo.rollout.turns.multi_turn import MultiTurn, turn_records

CORRECTNESS = "correctness"


@dataclass
class EvalResult:
    """Rates in [0, 1]; completion_length in tokens; one record per completion (prompts x samples)."""

    accuracy: float
    strict_format: float
    soft_format: float
    completion_length: float
    truncated: float
    samples: int
    num_prompts: int
    pass_at_k: float | None = None
    reward_means: dict[str, float] = field(default_factory=dict)
    time_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_prompts": self.num_prompts,
            "samples": self.samples,
            "accuracy": self.accuracy,
        }
        if self.pass_at_k is not None:
            out[f"pass@{self.samples}"] = self.pass_at_k
        out.update(
            strict_format=self.strict_format,
            soft_format=self.soft_format,
            completion_length=self.completion_length,
            truncated=self.truncated,
            **{f"reward/{name}": v for name, v in self.reward_means.items()},
            time_s=self.time_s,
        )
        return out

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat floats for metrics.jsonl / TensorBoard / W&B, e.g. eval/accuracy."""
        skip = ("num_prompts", "samples", "time_s")
        return {f"{prefix}{k}": float(v) for k, v in self.summary().items() if k not in skip}


def correctness_index(rewards: list[rw.Reward]) -> int | None:
    for i, r in enumerate(rewards):
        if r.name.rpartition(":")[2] == CORRECTNESS:
            return i
    return None


def load_eval_prompts(
    template: Template, tokenizer: Any, *, split: str | None = None, limit: int | None = None
) -> list[Prompt]:
    """The held-out split rendered like the training prompts. A split that does not exist is a ConfigError."""
    ds = template.dataset
    split = split or ds.eval_split
    if ds.path.startswith("builtin:") and split not in BUILTIN_SEEDS:
        raise ConfigError(
            f"split {split!r} does not exist for {ds.path}: use {' or '.join(map(repr, BUILTIN_SEEDS))}."
        )
    if limit is not None and limit < 1:
        raise ConfigError(f"limit = {limit!r} is not allowed: use a positive count.")
    rows = load_rows(dataclasses.replace(ds, limit=None), split)  # dataset.limit is for training
    if limit is not None:
        rows = rows[:limit]
    rows, note = complete_rows(rows, template.template, ds, split)  # checked like the training rows
    if note:
        print(note, flush=True)
    c = template.config
    turns = MultiTurn.from_config(c, template.template.response_prefix)  # tools: described as in training
    return build_prompts(
        rows,
        template.template,
        tokenizer,
        max_prompt_tokens=c.maximum_sequence_length - c.maximum_completion_length,
        tools=turns.schemas if turns else None,
        system_text=turns.system_text(tokenizer) if turns else "",
    )


@torch.no_grad()
def evaluate(
    sampler: Sampler,
    tokenizer: Any,
    prompts: list[Prompt],
    rewards: list[rw.Reward],
    tags: rw.Tags,
    settings: SamplingSettings,
    *,
    samples: int = 1,
    batch_size: int = 32,
    response_prefix: str = "",
    generator: torch.Generator | None = None,
    progress: bool = True,
    turns: MultiTurn | None = None,
    version: int = 0,
) -> EvalResult:
    """Answer every prompt on `sampler`, from the weights of step `version` (greedy when samples == 1, else
    `samples` draws under `settings`), and score the answers as training does. `turns`: a template with tools or
    an environment answers over several turns, as in training, and is scored on the whole conversation.

    `batch_size` counts prompts per sampler call; each call decodes batch_size x samples sequences.
    """
    if not prompts:
        raise ConfigError("There are no prompts to evaluate; check the split and the limit.")
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"samples = {samples} and batch_size = {batch_size} must both be at least 1.")
    start = time.perf_counter()
    settings = replace(settings, greedy=samples == 1)
    rollouts, batches = [], range(0, len(prompts), batch_size)
    for i in tqdm(batches, desc="eval", unit="batch", file=sys.stderr, disable=not progress, leave=False):
        chunk = prompts[i : i + batch_size]
        if turns is not None:  # every turn of the chunk's samples, the tools run as in training
            ro = turns.rollout(
                sampler, chunk, settings, tokenizer, generator, num_generations=samples, version=version
            )
        else:
            ids = [p.ids for p in chunk]
            ro = sampler.sample(ids, settings, num_generations=samples, generator=generator, version=version)
        rollouts.append(ro)
    expanded = [p for p in prompts for _ in range(samples)]  # the order a sampler returns: G per prompt
    scored = rw.score_rollouts(
        rewards,
        rollouts,
        expanded,
        tokenizer,
        response_prefix=response_prefix,
        tags=tags,
        max_completion_length=settings.max_new_tokens,
    )
    truncated = [t for ro in rollouts for t in ro.truncated.tolist()]
    result = eval_result(scored, expanded, rewards, tags, samples=samples, truncated=truncated)
    result.time_s = time.perf_counter() - start
    return result


def eval_result(
    scored: rw.RolloutScores,
    expanded: list[Prompt],
    rewards: list[rw.Reward],
    tags: rw.Tags,
    *,
    samples: int,
    truncated: list[bool],
) -> EvalResult:
    """The rates and one record per completion, from the scored answers (each prompt `samples` times)."""
    texts, lengths, scores = scored.texts, scored.lengths, scored.scores
    conversations = scored.conversations or []
    refs = [p.reference for p in expanded]
    j = correctness_index(rewards)
    correct_scores = scores[:, j] if j is not None else torch.tensor(rw.correctness(texts, refs, tags=tags))
    correct = correct_scores > 0  # [N]
    strict = torch.tensor(rw.strict_format(texts, refs, tags=tags)) > 0  # [N]
    soft = torch.tensor(rw.soft_format(texts, refs, tags=tags)) > 0  # [N]
    records = [
        {
            "index": k // samples,
            "sample": k % samples,
            "prompt": expanded[k].row,
            "completion": texts[k],
            "reference": refs[k],
            "correct": bool(correct[k]),
            "strict_format": bool(strict[k]),
            "soft_format": bool(soft[k]),
            "length": int(lengths[k]),
            "rewards": {r.name: float(scores[k, m]) for m, r in enumerate(rewards)},
            **(turn_records(conversations[k]) if conversations else {}),
        }
        for k in range(len(texts))
    ]
    per_prompt = correct.view(len(expanded) // samples, samples)  # [B, K]
    return EvalResult(
        accuracy=_mean(correct),
        strict_format=_mean(strict),
        soft_format=_mean(soft),
        completion_length=_mean(torch.tensor(lengths)),
        truncated=_mean(torch.tensor(truncated)),
        samples=samples,
        num_prompts=len(expanded) // samples,
        pass_at_k=_mean(per_prompt.any(dim=1)) if samples > 1 else None,
        reward_means={r.name: _mean(scores[:, m]) for m, r in enumerate(rewards)},
        records=records,
    )


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean())
