"""The static-cache decode step against transformers' own decoding, and the inverse-CDF sampler."""

from __future__ import annotations

import pytest
import torch

from grpo.decode import StaticDecoder, StaticKVCache, static_decode_supported
from grpo.rollout import HFDecoder, generate, left_pad, sample_next

CPU = torch.device("cpu")


def tiny(model_type: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"use_sliding_window": False} if model_type in ("qwen2", "qwen3") else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def prefill(model, prompts, pad_id):
    ids, mask = left_pad(prompts, pad_id, CPU)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return (out.cache if hasattr(out, "cache") else out.past_key_values), mask, positions[:, -1] + 1


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
@torch.no_grad()
def test_static_decoder_logits_match_transformers(model_type):
    model = tiny(model_type, vocab=300)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]  # different lengths: left padding in the cache
    g, steps = 2, 6
    assert static_decode_supported(model, capacity=7 + steps)
    cache_a, mask, start = prefill(model, prompts, pad_id=0)
    cache_b, _, _ = prefill(model, prompts, pad_id=0)
    mask = mask.repeat_interleave(g, dim=0)
    hf = HFDecoder(model, cache_a, g, mask)
    static = StaticDecoder(model, StaticKVCache(cache_b, g, 7 + steps), mask, 7 + steps)
    positions = start.repeat_interleave(g)
    tokens = torch.tensor([20, 21, 22, 23])
    for step in range(steps):
        expected, got = hf(tokens, positions), static(tokens, positions)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        tokens, positions = (tokens * 7 + step) % 300, positions + 1


def test_generate_is_the_same_with_either_decoder(tiny_model_dir, tokenizer):
    from grpo.models import load_model

    model = load_model(str(tiny_model_dir), device=CPU, dtype=torch.float32)
    prompts = [tokenizer("Hi there", add_special_tokens=False)["input_ids"], [7, 8, 9, 10, 11, 12]]
    kw = dict(num_generations=3, max_new_tokens=10, eos_ids=[], pad_id=tokenizer.pad_token_id)
    a = generate(model, prompts, generator=torch.Generator().manual_seed(4), decode_impl="hf", **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(4), decode_impl="static", **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.completion_ids.shape == (6, 10)


def test_unsupported_architectures_fall_back_to_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert not static_decode_supported(model, capacity=32)
    ro = generate(model, [[1, 2, 3]], num_generations=2, max_new_tokens=4, eos_ids=[], pad_id=0, greedy=True)
    assert ro.completion_ids.shape == (2, 4)
    assert torch.equal(ro.completion_ids[0], ro.completion_ids[1])  # greedy: both samples agree
    window = tiny("mistral", vocab=100)
    window.config.sliding_window = 16
    assert static_decode_supported(window, capacity=16) and not static_decode_supported(window, capacity=17)


def test_sampler_follows_the_distribution_and_the_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    logits = probs.clamp(min=1e-30).log().expand(20_000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=1.0, generator=gen)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)
    assert freq[4] == 0  # a zero-probability token is never drawn
    nucleus = sample_next(logits, temperature=1.0, top_p=0.6, generator=gen)  # keeps the first two tokens
    freq = torch.bincount(nucleus, minlength=5).float() / nucleus.numel()
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.012, rtol=0)
    hot = sample_next(logits[:4], temperature=1e-4, top_p=1.0, generator=gen)
    assert hot.tolist() == [0, 0, 0, 0]  # temperature -> 0 is greedy
