"""The embedded GGUF is converted to a plain full-precision HF folder that other trainers can fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_converted_gguf_is_a_plain_trainable_folder(tokenizer):
    from transformers import AutoModelForCausalLM

    from grpo.config import EMBEDDED_MODEL
    from grpo.model.loading import resolve_model_source

    folder = Path(resolve_model_source(EMBEDDED_MODEL)[0])  # converted by the tokenizer fixture
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied head


def test_embedded_tokenizer_names_the_files_special_tokens(tokenizer):
    from transformers import AutoConfig

    from grpo.config import EMBEDDED_MODEL
    from grpo.model.loading import name_special_tokens, resolve_model_source

    config = AutoConfig.from_pretrained(resolve_model_source(EMBEDDED_MODEL)[0])
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    want = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    assert {k: getattr(tokenizer, k) for k in want} == want
    # what transformers 5.17's GGUF reader produced: the start token as the end token, no padding
    tokenizer = tokenizer.__class__.from_pretrained(resolve_model_source(EMBEDDED_MODEL)[0])
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    name_special_tokens(tokenizer, config)
    assert {k: getattr(tokenizer, k) for k in want} == want
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2)
