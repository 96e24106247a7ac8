"""The embedded GGUF is converted to a plain full-precision HF folder that other trainers can fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_converted_gguf_is_a_plain_trainable_folder(tokenizer):
    from transformers import AutoModelForCausalLM

    from grpo.config import EMBEDDED_MODEL
    from grpo.models import resolve_model_source

    folder = Path(resolve_model_source(EMBEDDED_MODEL)[0])  # converted by the tokenizer fixture
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied head
