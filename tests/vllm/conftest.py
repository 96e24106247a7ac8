"""What the vLLM tests share: the tiny model vLLM's CPU attention takes, its policy, one colocated engine for
the whole session, and the training subprocess. The tests need vLLM, which lives in a venv of its own
(.ci/vllm.sh, docs/vllm.md); the main test venv runs only the refusals that need no engine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.config import template_from_dict
from tests.conftest import REPO, tiny_llama_config, tiny_template

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed here: these run in the vLLM venv (.ci/vllm.sh, docs/vllm.md)"
)
CPU = torch.device("cpu")


def repo_env(*, one_thread: bool = False, **extra: str) -> dict[str, str]:
    """A subprocess's environment that imports this checkout; one thread keeps two processes on 2 cores fair."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **({"OMP_NUM_THREADS": "1"} if one_thread else {}),
        **extra,
    }


def run_repo(args, *, one_thread: bool = False, timeout: float | None = 600, **extra: str):
    """Runs `args` in the checkout and returns the finished process, output captured as text."""
    env = repo_env(one_thread=one_thread, **extra)
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def train(path, *overrides, driver=None, env_extra=None):
    head = [sys.executable, "scripts/train.py"] if driver is None else [sys.executable, "-c", driver]
    return run_repo([*head, str(path), *overrides], one_thread=True, **(env_extra or {}))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def vllm_model_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny Llama with heads of 32 dimensions, the smallest vLLM's CPU attention takes."""
    from transformers import LlamaForCausalLM

    from grpo.model.loading import save_model

    cfg = tiny_llama_config(tokenizer, tie_word_embeddings=True)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 64, 2, 1, 32
    cfg.max_position_embeddings = 1024  # vLLM holds no sequence longer: the benchmark's GSM8K needs 576
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vllm") / "model"
    save_model(LlamaForCausalLM(cfg), tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def policy(vllm_model_dir):
    from grpo.model.loading import load_model

    return load_model(str(vllm_model_dir), device=CPU, dtype=torch.float32)


@pytest.fixture(scope="session")
def engine(vllm_model_dir, policy, tmp_path_factory):
    from grpo.rollout.engines.vllm_engine import VLLMEngine

    template = template_from_dict(
        tiny_template(vllm_model_dir, tmp_path_factory.mktemp("unused"), rollout_engine="vllm")
    )
    return VLLMEngine.start(template, model=policy, device=CPU, dtype=torch.float32, version=0, pad_id=2)


PROMPTS = [[1, 17, 300, 4000, 9], [1, 22], [1, 5000, 6, 7]]


def sample(engine, policy, seed=0, **options):
    """3 samples of each of PROMPTS on `engine` (colocated or a server) at the step it holds: 8 new tokens, end
    token 2, padding `pad_id` (2); `options` also take the SamplingSettings filters and greedy."""
    from grpo.rollout.generate import SamplingSettings

    o = {"num_generations": 3, "max_new_tokens": 8, "eos_ids": [2], "pad_id": 2, **options}
    g, engine.pad_id = o.pop("num_generations"), o.pop("pad_id")
    settings = SamplingSettings(max_new_tokens=o.pop("max_new_tokens"), end_ids=tuple(o.pop("eos_ids")), **o)
    generator = torch.Generator().manual_seed(seed)
    return engine.sample(PROMPTS, settings, num_generations=g, generator=generator, version=engine.version)


def forward_logprobs(policy, ro, temperature):
    from grpo.model.logprobs import CompletionLogprobs

    with torch.no_grad():
        return CompletionLogprobs(policy.eval(), temperature=temperature)(
            ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask
        )
