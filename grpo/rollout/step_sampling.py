"""One step's samples: the batch of prompts, its rollout, and its reward scores (grpo/rewards/rollout_scores.py),
and DAPO's dynamic sampling over several such rounds (grpo/rollout/dynamic_sampling.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from grpo import rewards as rw
from grpo.config import Template
from grpo.data import Prompt, PromptSampler
from grpo.parallel.collectives import any_over_ranks
from grpo.parallel.launch import DistEnv
from grpo.rollout.dynamic_sampling import fill_batch
from grpo.rollout.generate import Rollout, SamplingSettings
from grpo.rollout.pipeline import RolloutPipeline
from grpo.rollout.sampler import Sampler
from grpo.rollout.turns.multi_turn import MultiTurn
from grpo.samples import Samples


@dataclass
class StepSampling:
    """What a step samples with: the prompts and their order, the sampler and its settings, the run's random
    stream, and the rewards."""

    template: Template
    env: DistEnv
    prompts: list[Prompt]
    order: PromptSampler
    tokenizer: Any
    rewards: list[rw.Reward]
    tags: rw.Tags
    turns: MultiTurn | None
    sampler: Sampler
    settings: SamplingSettings
    generator: torch.Generator
    pipeline: RolloutPipeline | None = None  # async_level or rollout_process: grpo/rollout/pipeline.py

    def rollout(self, batch: list[int], version: int) -> Rollout:
        """G samples of each prompt of `batch`, from the weights of step `version`."""
        g, prompts = self.template.config.num_generations, [self.prompts[i] for i in batch]
        if self.turns is not None:  # tools or an environment: grpo/rollout/turns/multi_turn.py
            return self.turns.rollout(
                self.sampler,
                prompts,
                self.settings,
                self.tokenizer,
                self.generator,
                num_generations=g,
                version=version,
            )
        ids = [p.ids for p in prompts]
        return self.sampler.sample(
            ids, self.settings, num_generations=g, generator=self.generator, version=version
        )

    def sample_round(self, timings: dict[str, float], version: int) -> Samples:
        """One batch of prompts: rollout, then the rewards."""
        t0 = time.perf_counter()
        batch = self.order.next_batch()
        ro = self.rollout(batch, version)
        timings["time/rollout_s"] += time.perf_counter() - t0
        return self.scored(batch, ro, timings)

    def scored(self, batch: list[int], ro: Rollout, timings: dict[str, float]) -> Samples:
        """A batch's rollout with its reward scores."""
        c, t1 = self.template.config, time.perf_counter()
        expanded = [self.prompts[i] for i in batch for _ in range(c.num_generations)]
        scored = rw.score_rollouts(
            self.rewards,
            [ro],
            expanded,
            self.tokenizer,
            response_prefix=self.template.template.response_prefix,
            tags=self.tags,
            max_completion_length=c.maximum_completion_length,
        )
        total = (scored.scores * torch.tensor([r.weight for r in self.rewards])).sum(dim=1)  # [N]
        timings["time/reward_s"] += time.perf_counter() - t1
        refs, rows = [p.reference for p in expanded], [p.row for p in expanded]
        return Samples(batch, ro, scored.texts, refs, rows, scored.scores, total)

    def sample_step(
        self, timings: dict[str, float], version: int
    ) -> tuple[Samples, Samples, dict[str, float]]:
        """(the first round, the batch to train on, sampling metrics). Without dynamic_sampling both are the
        same single round; with it, see grpo/rollout/dynamic_sampling.py."""
        c = self.template.config
        if self.pipeline is not None:  # drawn ahead by the pipeline's engine; the wait is the rollout time
            batch, ro, metrics = self.pipeline.take(version)
            timings["time/rollout_s"] += metrics["time/rollout_wait_s"]
            first = self.scored(batch, ro, timings)
            return first, first, {"tokens": ro.num_completion_tokens, **metrics}
        if not c.dynamic_sampling:
            first = self.sample_round(timings, version)
            return first, first, {"tokens": first.rollout.num_completion_tokens}
        return fill_batch(
            lambda: self.sample_round(timings, version),
            batch_size=c.batch_size,
            max_rounds=c.dynamic_sampling_max_rounds,
            pad_id=self.tokenizer.pad_token_id,
            any_rank=lambda flag: any_over_ranks(flag, self.env),
            mini_batches=c.mini_batches,
        )
