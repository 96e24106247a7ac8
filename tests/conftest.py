"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded GGUF) and tiny random models built from it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
VOLATILE = ("time/", "tokens_per_s", "memory/")  # metrics that differ between identical runs

# Converting the GGUF once per machine, not once per test run: tests share the user's cache unless CI sets one.
os.environ.setdefault("GRPO_CACHE", str(Path(tempfile.gettempdir()) / "grpo-test-cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    from grpo.config import EMBEDDED_MODEL
    from grpo.model.loading import load_tokenizer

    # A folder holding the embedded model's tokenizer files, where its package is not installed (the first
    # call of the GPU checks, docs/gpu-checks.md); the same tokens either way.
    return load_tokenizer(os.environ.get("GRPO_TEST_TOKENIZER", EMBEDDED_MODEL))


def tiny_llama_config(tokenizer, **extra):
    """A 2-layer Llama with hidden 32 and the real tokenizer's vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_model(tokenizer, folder: Path, *, seed: int = 0, tie: bool = True) -> Path:
    """The tiny Llama as a causal LM, saved as an HF folder."""
    from transformers import LlamaForCausalLM

    from grpo.model.loading import save_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=tie))
    save_model(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def tiny_template(model_dir: Path, output_dir: Path, **config) -> dict:
    """A template dict for a fast run of the tiny model on the built-in task."""
    base = {
        "train_device": "cpu",
        "maximum_sequence_length": 160,
        "maximum_completion_length": 8,
        "batch_size": 2,
        "num_generations": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "output_dir": str(output_dir),
        "seed": 0,
    }
    base.update(config)
    return {
        "name": "tiny",
        "model": str(model_dir),
        "dataset": {"path": "builtin:arithmetic", "limit": 64},
        "config": base,
    }


def write_template(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def train_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python scripts/train.py ARGS` as a user runs it: the exit code and what it printed."""
    return subprocess.run(
        [sys.executable, "scripts/train.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
