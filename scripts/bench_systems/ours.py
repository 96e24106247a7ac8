"""Our side of the benchmark: the real GRPOTrainer, one train_step per measured step."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from typing import Any

import torch

from grpo.config import template_from_dict
from grpo.run.logger import peak_memory_bytes
from grpo.trainer import GRPOTrainer
from scripts.bench_systems import (
    BenchConfig,
    decode_bound,
    gsm8k_template,
    kv_cache_bytes_per_token,
    mean_decode_context,
    step_record,
    sync,
)

PHASES = (
    "time/rollout_s",
    "time/reward_s",
    "time/logprob_s",
    "time/fwd_bwd_s",
    "time/optimizer_s",
    "time/push_s",
)


def run_ours(cfg: BenchConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(template_from_dict(gsm8k_template(cfg, out)))
        engine = trainer.config.rollout_engine
        if cfg.ignore_eos:  # no end token: every completion runs to the length limit
            trainer.sampling.settings = dataclasses.replace(trainer.sampling.settings, end_ids=())
        steps, phases = [], []
        for _ in range(cfg.steps):
            t0 = time.perf_counter()
            metrics, _ = trainer.train_step()
            trainer.step += 1
            sampler = trainer.rollout_sampler  # part of a step: the next rollout samples the new weights
            sampler.update_weights(trainer.model, version=trainer.step)
            if engine != "torch":  # the push to an engine, timed
                metrics["time/push_s"] = sampler.push_s
            sync(cfg.device)
            steps.append(
                step_record(time.perf_counter() - t0, metrics["time/rollout_s"], _tokens(metrics, cfg))
            )
            phases.append({k: metrics[k] for k in PHASES if k in metrics})
        peak = peak_memory_bytes(cfg.device)  # before the bandwidth probe allocates its buffers
        model = trainer.model
        # What decoding reads: every weight in the compute dtype (a bf16-mixed run samples from a bf16 copy).
        itemsize = trainer.precision.compute.itemsize
        weight_bytes = sum(p.numel() for p in model.parameters()) * itemsize
        # The run's prompts: the dataset is cut to the prompts its steps draw. The mean completion length is
        # over the measured steps (every one at full length with ignore_eos).
        prompt_tokens = statistics.mean(len(p.ids) for p in trainer.prompts)
        completion_tokens = statistics.mean(s["tokens"] for s in steps[cfg.warmup_steps :]) / rows(cfg)
        context = mean_decode_context(prompt_tokens, completion_tokens)
        kv_per_token = kv_cache_bytes_per_token(model.config, itemsize)
        bound = decode_bound(rows(cfg), copy_bandwidth(trainer.device), weight_bytes, kv_per_token, context)
        return {
            "engine_start_s": None if engine == "torch" else round(trainer.rollout_sampler.startup_s, 1),
            "steps": steps,
            "phases": phases,
            "peak_memory_bytes": peak,
            "rollout_bound_tokens_per_s": bound["tokens_per_s"],
            "rollout_bound_weights_only_tokens_per_s": bound["weights_only_tokens_per_s"],
            "rollout_bound_bytes": {
                "weights": bound["weight_bytes"],
                "kv_cache_per_step": round(bound["kv_bytes_per_step"]),
                "mean_context_tokens": round(context, 1),
            },
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


def rows(cfg: BenchConfig) -> int:
    return cfg.prompts_per_step * cfg.num_generations


def _tokens(metrics: dict[str, float], cfg: BenchConfig) -> int:
    return round(metrics["completion/length_mean"] * rows(cfg))
