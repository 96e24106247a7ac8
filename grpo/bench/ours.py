"""Our side of the benchmark: the real GRPOTrainer, one train_step per measured step."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from grpo.bench import BenchConfig, gsm8k_template, step_record, sync
from grpo.config import template_from_dict
from grpo.logging import peak_memory_bytes
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
            sync(cfg.device)
            steps.append(
                step_record(time.perf_counter() - t0, metrics["time/rollout_s"], _tokens(metrics, cfg))
            )
            phases.append({k: metrics[k] for k in PHASES if k in metrics})
        peak = peak_memory_bytes(cfg.device)  # before the bandwidth probe allocates its buffers
        weight_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        rows = cfg.prompts_per_step * cfg.num_generations
        # A decode step reads every weight once, so rows * bandwidth / weight bytes bounds tokens/s.
        bound = rows * copy_bandwidth(trainer.device) / weight_bytes
        return {
            "steps": steps,
            "phases": phases,
            "peak_memory_bytes": peak,
            "rollout_bound_tokens_per_s": bound,
        }


def copy_bandwidth(device: torch.device, mib: int = 512) -> float:
    """Achievable memory bandwidth in bytes/s: a large device-to-device copy reads and writes every byte."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device.type)
    t0, repeats = time.perf_counter(), 5
    for _ in range(repeats):
        dst.copy_(src)
    sync(device.type)
    return 2 * src.nbytes * repeats / (time.perf_counter() - t0)


def _tokens(metrics: dict[str, float], cfg: BenchConfig) -> int:
    return round(metrics["completion/length_mean"] * cfg.prompts_per_step * cfg.num_generations)
