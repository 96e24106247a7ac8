"""Evaluation during training: greedy answers on the held-out prompts every eval_steps (rank 0 generates, the
other ranks wait), the best model so far with save_best, and eval.json / eval.jsonl beside the saved model at
the end. The evaluation itself is grpo/eval/evaluate.py; these functions only decide when and where it runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo.config import Template
from grpo.data import Prompt
from grpo.eval.evaluate import EvalResult, evaluate
from grpo.parallel.collectives import any_over_ranks
from grpo.parallel.launch import DistEnv
from grpo.parallel.wrapping import full_state_dict
from grpo.rewards import Reward, Tags
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.sampler import Sampler
from grpo.run.atomic_files import atomic_write_text
from grpo.run.logger import RunLogger

BEST_FILE = "best.json"


def best_accuracy_so_far(output_dir: Path) -> float:
    """The accuracy best.json records (a resumed run must beat it), or -inf when there is none."""
    path = Path(output_dir) / BEST_FILE
    return float(json.loads(path.read_text())["accuracy"]) if path.is_file() else float("-inf")


@dataclass
class TrainingEval:
    """The held-out evaluations of one run: what it evaluates on, the newest result and the best accuracy."""

    template: Template
    env: DistEnv
    output_dir: Path
    tokenizer: Any
    prompts: list[Prompt]  # built on rank 0 only; the other ranks wait
    rewards: list[Reward]
    tags: Tags
    last: tuple[int, EvalResult | None] | None = None  # (step, result), on every rank
    best_accuracy: float = float("-inf")
    settings: SamplingSettings | None = None  # the training rollout's: set once the end tokens are known
    turns: Any = None  # tools or an environment: the answers take several turns, as in training

    def run(self, step: int, sampler: Sampler) -> EvalResult | None:
        """Greedy evaluation on the held-out prompts with the run's sampler, which holds the weights of `step`
        (rank 0; None on the other ranks, which wait)."""
        c, result = self.template.config, None
        assert self.settings is not None, "the trainer sets the sampling settings once the model has loaded"
        with sampler.gathered():  # FSDP: every rank takes part in the gather, rank 0 generates
            if self.env.is_main:
                result = evaluate(
                    sampler,
                    self.tokenizer,
                    self.prompts,
                    self.rewards,
                    self.tags,
                    self.settings,
                    batch_size=c.batch_size * c.num_generations,
                    response_prefix=self.template.template.response_prefix,
                    turns=self.turns,
                    version=step,
                )
        self.last = (step, result)  # on every rank, so all agree whether the final one is due
        if self.env.enabled and torch.distributed.is_initialized():
            torch.distributed.barrier()
        return result

    def write_final(
        self,
        step: int,
        final: Path,
        logger: RunLogger | None,
        *,
        evaluate_now: bool,
        sampler: Sampler,
    ) -> None:
        """eval.json (summary) + eval.jsonl (records) beside the saved model; reuses this step's evaluation,
        and runs one only when `evaluate_now` (not for a run stopped early)."""
        if (self.last is None or self.last[0] != step) and evaluate_now:
            self.run(step, sampler)
        if self.last is None or self.last[0] != step or self.last[1] is None:
            return  # stopped early without a current evaluation, or not rank 0
        result = self.last[1]
        split = self.template.dataset.eval_split
        summary = {"step": step, "model": str(final), "split": split, **result.summary()}
        atomic_write_text(self.output_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(
            self.output_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in result.records)
        )
        if logger is not None:
            logger.write(
                f"eval on {split} ({result.num_prompts} problems): accuracy {result.accuracy:.3f}, "
                f"strict format {result.strict_format:.3f}, soft format {result.soft_format:.3f}"
            )

    def best_dir(self) -> Path:
        return self.output_dir / f"{self.template.config.adaptor_name}-best"

    def keep_best(self, step: int, result: EvalResult | None, model: torch.nn.Module) -> None:
        """save_best: when this evaluation beats every earlier one of the run, write the model to
        <output_dir>/<adaptor_name>-best (a complete folder replaces the old one), then best.json. Every rank
        calls this: only rank 0 holds the result, and under FSDP all ranks take part in gathering the weights."""
        improved = result is not None and result.accuracy > self.best_accuracy
        if not any_over_ranks(improved, self.env):
            return
        state = full_state_dict(model, self.env)
        if self.env.is_main:
            from grpo.run.checkpoint import write_model

            folder = self.best_dir()
            write_model(self.template, model, self.tokenizer, folder, state)
            self.best_accuracy = result.accuracy
            best = {"step": step, "accuracy": result.accuracy, "model": str(folder)}
            atomic_write_text(self.output_dir / BEST_FILE, json.dumps(best, indent=2) + "\n")
