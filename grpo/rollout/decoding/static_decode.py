"""A lean decode step for Llama-style decoders: a preallocated KV cache and the model's own layers.

transformers' model forward rebuilds the 4-D attention mask and grows a DynamicCache by concatenation at every
token, which costs about as much as the matmuls themselves when a step is 4 rows x 1 token on a CPU. Here the
keys/values live in buffers sized for the whole rollout (each step writes one column), the additive mask is
one small `where`, and the decoder layers are transformers' own modules (so LoRA layers, biases and q/k norms
behave exactly as in training). Architectures whose model forward does anything else fall back to HF decoding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grpo.model.logprobs import cache_argument

# Model types whose decoder forward is exactly embed -> rotary -> layers -> norm with full causal attention.
STATIC_DECODE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def static_decode_supported(model: nn.Module, capacity: int) -> bool:
    config = model.config
    if config.model_type not in STATIC_DECODE_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
    return not (uses_window and window is not None and window < capacity)


class StaticKVCache:
    """Keys/values [N, kv_heads, capacity, head_dim] per layer; quacks like transformers' Cache for layers."""

    def __init__(self, prefill_cache: Any, repeats: int, capacity: int):
        layers = prefill_cache.layers
        k0 = layers[0].keys  # [B, kv_heads, P, D]
        b, heads, p, d = k0.shape
        shape = (b * repeats, heads, capacity, d)
        self.keys = [k0.new_empty(shape) for _ in layers]
        self.values = [k0.new_empty(shape) for _ in layers]
        for i, layer in enumerate(layers):  # each prompt's prefix copied to its G rows
            self.keys[i][:, :, :p] = layer.keys.repeat_interleave(repeats, dim=0)
            self.values[i][:, :, :p] = layer.values.repeat_interleave(repeats, dim=0)
        self.length = p  # columns filled; grows by one per decode step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__):
        end = self.length + key_states.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = key_states
        self.values[layer_idx][:, :, self.length : end] = value_states
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class StaticDecoder:
    """One token per row per call: logits [N, V] for tokens [N] at positions [N]."""

    def __init__(self, model: nn.Module, cache: StaticKVCache, attention_mask: torch.Tensor, capacity: int):
        self.cache = cache
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        n, p = attention_mask.shape
        self.allowed = torch.zeros((n, capacity), dtype=torch.bool, device=attention_mask.device)
        self.allowed[:, :p] = attention_mask.bool()  # left padding of the prompts stays masked
        self.dtype = cache.keys[0].dtype
        self.cache_arg = cache_argument(self.decoder.layers[0])

    def step_mask(self, end: int) -> torch.Tensor:
        """Opens column end - 1 (the token being decoded) and returns the additive mask [N, 1, 1, end], as
        transformers' sdpa and eager attention expect it."""
        self.allowed[:, end - 1] = True
        return additive_mask(self.allowed[:, :end], self.dtype)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        end = self.cache.length + 1
        mask = self.step_mask(end)  # [N, 1, 1, end]
        logits = decode_step(self.decoder, self.head, tokens, positions, mask, {self.cache_arg: self.cache})
        self.cache.length = end
        return logits


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """allowed [N, C] bool -> [N, 1, 1, C]: 0 where a column may be attended to, the dtype's minimum elsewhere."""
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(
        ~allowed[:, None, None, :], torch.finfo(dtype).min
    )


def decode_step(
    decoder: nn.Module,
    head: nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache_kwargs: dict[str, Any],
) -> torch.Tensor:
    """The model's own modules for one token per row: tokens [N] at positions [N] -> logits [N, V]."""
    hidden = decoder.embed_tokens(tokens[:, None])  # [N, 1, H]
    pos = positions[:, None]
    rope = decoder.rotary_emb(hidden, position_ids=pos)
    for layer in decoder.layers:
        out = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rope, **cache_kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return head(decoder.norm(hidden[:, -1]))  # [N, V]
