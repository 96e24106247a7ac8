"""Evaluation during training: greedy answers on the held-out prompts every eval_steps (rank 0 generates, the
other ranks wait), the best model so far with save_best, and eval.json / eval.jsonl beside the saved model at
the end. The evaluation itself is grpo/eval/evaluate.py; these functions only decide when and where it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from grpo.eval.evaluate import EvalResult, evaluate
from grpo.parallel.collectives import any_over_ranks
from grpo.parallel.wrapping import full_params, full_state_dict
from grpo.run.atomic_files import atomic_write_text
from grpo.run.logger import RunLogger


def run_eval(trainer: Any) -> EvalResult | None:
    """Greedy evaluation on the held-out prompts (rank 0; None on the other ranks, which wait)."""
    c, result = trainer.c, None
    with full_params(trainer.policy):  # FSDP: every rank takes part in the gather, rank 0 generates
        if trainer.env.is_main:
            result = evaluate(
                trainer.sampling_model(),
                trainer.tokenizer,
                trainer.eval_prompts,
                trainer.rewards,
                trainer.tags,
                max_new_tokens=c.maximum_completion_length,
                batch_size=c.batch_size * c.num_generations,
                response_prefix=trainer.t.template.response_prefix,
                decode_impl=c.decode_impl,
            )
    trainer.last_eval = (trainer.step, result)  # on every rank, so all agree whether the final one is due
    if trainer.env.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def final_eval(trainer: Any, final: Path, logger: RunLogger | None) -> None:
    """eval.json (summary) + eval.jsonl (records) beside the saved model; reuses this step's evaluation."""
    if (trainer.last_eval is None or trainer.last_eval[0] != trainer.step) and not trainer.stop_requested:
        run_eval(trainer)
    if trainer.last_eval is None or trainer.last_eval[0] != trainer.step or trainer.last_eval[1] is None:
        return  # stopped early without a current evaluation, or not rank 0
    result = trainer.last_eval[1]
    split = trainer.t.dataset.eval_split
    summary = {"step": trainer.step, "model": str(final), "split": split, **result.summary()}
    atomic_write_text(trainer.output_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(
        trainer.output_dir / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in result.records)
    )
    if logger is not None:
        logger.write(
            f"eval on {split} ({result.num_prompts} problems): accuracy {result.accuracy:.3f}, "
            f"strict format {result.strict_format:.3f}, soft format {result.soft_format:.3f}"
        )


BEST_FILE = "best.json"


def best_dir(trainer: Any) -> Path:
    return trainer.output_dir / f"{trainer.c.adaptor_name}-best"


def best_accuracy_so_far(output_dir: Path) -> float:
    """The accuracy best.json records (a resumed run must beat it), or -inf when there is none."""
    path = Path(output_dir) / BEST_FILE
    return float(json.loads(path.read_text())["accuracy"]) if path.is_file() else float("-inf")


def keep_best(trainer: Any, result: EvalResult | None) -> None:
    """save_best: when this evaluation beats every earlier one of the run, write the model to
    <output_dir>/<adaptor_name>-best (a complete folder replaces the old one), then best.json. Every rank
    calls this: only rank 0 holds the result, and under FSDP all ranks take part in gathering the weights."""
    improved = result is not None and result.accuracy > trainer.best_accuracy
    if not any_over_ranks(improved, trainer.env):
        return
    state = full_state_dict(trainer.model, trainer.env)
    if trainer.env.is_main:
        from grpo.run.checkpoint import write_model

        folder = best_dir(trainer)
        write_model(trainer, folder, state)
        trainer.best_accuracy = result.accuracy
        best = {"step": trainer.step, "accuracy": result.accuracy, "model": str(folder)}
        atomic_write_text(trainer.output_dir / BEST_FILE, json.dumps(best, indent=2) + "\n")
