"""Our side of the benchmark: the real GRPOTrainer, one train_step per measured step."""

from __future__ import annotations

import tempfile
import time
from typing import Any

from grpo.bench import BenchConfig, gsm8k_template, peak_memory_bytes, step_record
from grpo.config import template_from_dict
from grpo.trainer import GRPOTrainer

PHASES = ("time/rollout_s", "time/reward_s", "time/logprob_s", "time/fwd_bwd_s", "time/optimizer_s")


def run_ours(cfg: BenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(template_from_dict(gsm8k_template(cfg, out)))
        if cfg.ignore_eos:
            trainer.eos_ids = []  # no end token: every completion runs to the length limit
        steps, phases = [], []
        for _ in range(cfg.steps):
            t0 = time.perf_counter()
            metrics, _ = trainer.train_step()
            trainer.step += 1
            _sync(cfg.device)
            steps.append(
                step_record(time.perf_counter() - t0, metrics["time/rollout_s"], _tokens(metrics, cfg))
            )
            phases.append({k: metrics[k] for k in PHASES if k in metrics})
        return {"steps": steps, "phases": phases, "peak_memory_bytes": peak_memory_bytes(cfg.device)}


def _tokens(metrics: dict[str, float], cfg: BenchConfig) -> int:
    return round(metrics["completion/length_mean"] * cfg.prompts_per_step * cfg.num_generations)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
