"""TRL's side of the benchmark: trl.GRPOTrainer with the settings that match ours (needs `pip install .[bench]`).

TRL counts per_device_train_batch_size in completions, so one step of P prompts x G is a batch of P*G with
num_generations=G and no gradient accumulation. Prompts are given as already chat-templated text, so TRL
tokenizes exactly the ids our trainer samples from; rewards are ours behind TRL's calling convention.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from grpo import rewards as rw
from grpo.model.loading import resolve_model_source
from grpo.run.logger import peak_memory_bytes
from scripts.bench_systems import BenchConfig, prompts_in_step_order, step_record, sync

SEED_REWARDS = ("correctness", "int_answer", "strict_format", "soft_format", "tag_count")


def _trl_reward(name: str, tags: rw.Tags) -> Any:
    fn = getattr(rw, name)

    def reward(prompts: list[str], completions: list[str], reference: list[str], **_: Any) -> list[float]:
        return fn(completions, reference, tags=tags)

    reward.__name__ = name
    return reward


def run_trl(cfg: BenchConfig) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    prompts = prompts_in_step_order(cfg)
    dataset = Dataset.from_list([{"prompt": p.text, "reference": p.reference} for p in prompts])
    tags = rw.Tags("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    model_path, _ = resolve_model_source(cfg.model)
    n = cfg.prompts_per_step * cfg.num_generations
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=n,
            gradient_accumulation_steps=1,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.completion_tokens,
            beta=cfg.beta,
            loss_type="grpo",
            learning_rate=cfg.learning_rate,
            lr_scheduler_type="constant",
            temperature=cfg.temperature,
            max_steps=cfg.steps,
            shuffle_dataset=False,
            seed=cfg.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=cfg.device == "cpu",
            bf16=cfg.dtype != "float32",
            model_init_kwargs={"dtype": torch.float32 if cfg.dtype == "float32" else torch.bfloat16},
            generation_kwargs={"min_new_tokens": cfg.completion_tokens} if cfg.ignore_eos else None,
        )
        trainer = trl.GRPOTrainer(
            model=model_path,
            args=args,
            train_dataset=dataset,
            reward_funcs=[_trl_reward(name, tags) for name in SEED_REWARDS],
        )
        timer = _StepTimer(cfg, n)
        trainer.add_callback(type("StepTimerCallback", (TrainerCallback,), timer.hooks())())
        _time_generate(trainer.model, timer)
        trainer.train()
        return {
            "steps": timer.steps,
            "trl_version": trl.__version__,
            "peak_memory_bytes": peak_memory_bytes(cfg.device),
        }


class _StepTimer:
    """Wall time between step ends, generate() time inside each step, completion tokens from TRL's logs."""

    def __init__(self, cfg: BenchConfig, n: int):
        self.cfg, self.n = cfg, n
        self.steps: list[dict[str, float]] = []
        self.generate_s = 0.0
        self.last = 0.0
        self.pending: dict[str, float] | None = None

    def hooks(self) -> dict[str, Any]:
        def on_train_begin(_, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_end(_, args, state, control, **kw):
            sync(self.cfg.device)
            now = time.perf_counter()
            self.pending = step_record(now - self.last, self.generate_s, 0)
            self.last, self.generate_s = now, 0.0

        def on_log(_, args, state, control, logs=None, **kw):
            if self.pending is not None and logs and "completions/mean_length" in logs:
                self.pending["tokens"] = round(logs["completions/mean_length"] * self.n)
                self.steps.append(self.pending)
                self.pending = None
                self.last = time.perf_counter()  # logging is not part of the next step

        return {"on_train_begin": on_train_begin, "on_step_end": on_step_end, "on_log": on_log}


def _time_generate(model: torch.nn.Module, timer: _StepTimer) -> None:
    """Without DeepSpeed, TRL's unwrap_model_for_generation yields this very object, so its generate is ours."""
    original = model.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        sync(timer.cfg.device)
        timer.generate_s += time.perf_counter() - t0
        return out

    model.generate = timed_generate
