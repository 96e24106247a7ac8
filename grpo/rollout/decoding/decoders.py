"""Which decoder runs a rollout's decode steps (`decode_impl`), and the reference decoder, transformers' own
forward with its cache. Each decoder is called with the last tokens [N] and their positions [N] and returns the
next logits [N, V]: static_decode.py, graph_decode.py and packed_decode.py hold the fast ones."""

from __future__ import annotations

from typing import Any

import torch

from grpo.errors import ConfigError
from grpo.model.logprobs import cache_argument
from grpo.rollout.decoding.graph_decode import CUDAGraphDecoder, FixedShapeDecoder, graph_decode_supported
from grpo.rollout.decoding.packed_decode import PackedDecoder, packed_decode_supported
from grpo.rollout.decoding.static_decode import (
    STATIC_DECODE_MODEL_TYPES,
    StaticDecoder,
    StaticKVCache,
    static_decode_supported,
)

DECODE_IMPLS = ("auto", "graph", "packed", "static", "hf")
PACK_MIN_NEW_TOKENS = 32
GRAPH_MIN_NEW_TOKENS = 8  # recording costs about two steps (a warm-up and the capture)


def decode_impl_problem(
    impl: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, capacity: int
) -> str | None:
    """Why an explicitly chosen decode path cannot run this model here (None: it can). `auto` never fails: it
    picks among the paths that can."""
    if impl in ("auto", "hf"):
        return None
    if not static_decode_supported(model, capacity):
        return (
            f"needs a {'/'.join(sorted(STATIC_DECODE_MODEL_TYPES))} model with sdpa or eager attention and no "
            f"sliding window shorter than maximum_sequence_length ({capacity})"
        )
    if impl == "graph" and not graph_decode_supported(model):
        return "cannot record FSDP-wrapped layers or a RoPE that rescales with the sequence length"
    if impl == "packed" and not packed_decode_supported(model, device, dtype):
        return "runs on CPU, in float32, with MKL only"
    return None


def require_decode_impl(
    impl: str, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, capacity: int
) -> None:
    """An explicit decode_impl that cannot run fails when the model is built, not in the first rollout."""
    if problem := decode_impl_problem(impl, model, device, dtype, capacity):
        raise ConfigError(f"config.decode_impl = {impl!r} {problem}: use auto, static or hf.")


def make_decoder(
    impl: str,
    model: torch.nn.Module,
    cache: Any,
    repeats: int,
    mask: torch.Tensor,
    capacity: int,
    dtype: torch.dtype,
) -> Any:
    static = impl != "hf" and (impl != "auto" or static_decode_supported(model, capacity))
    if not static:
        return HFDecoder(model, cache, repeats, mask)
    static_cache = StaticKVCache(cache, repeats, capacity)
    new_tokens = capacity - mask.shape[1]
    if impl == "graph" or (
        impl == "auto"
        and mask.is_cuda
        and new_tokens >= GRAPH_MIN_NEW_TOKENS
        and graph_decode_supported(model)
    ):
        fixed = FixedShapeDecoder(model, static_cache, mask, capacity)
        return CUDAGraphDecoder(fixed) if mask.is_cuda else fixed
    # Packing costs ~0.2 s per rollout for 135M parameters and saves ~10 ms per token: worth it from ~20 tokens.
    long_enough = new_tokens >= PACK_MIN_NEW_TOKENS
    if impl == "packed" or (
        impl == "auto" and long_enough and packed_decode_supported(model, mask.device, dtype)
    ):
        return PackedDecoder(model, static_cache, mask, capacity)
    return StaticDecoder(model, static_cache, mask, capacity)


class HFDecoder:
    """The reference decode step: the model's forward with transformers' cache and a growing mask."""

    def __init__(self, model: torch.nn.Module, cache: Any, repeats: int, attention_mask: torch.Tensor):
        cache.batch_repeat_interleave(repeats)
        self.model, self.cache, self.mask = model, cache, attention_mask
        self.cache_arg = cache_argument(model)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{self.cache_arg: self.cache},
        )
        return out.logits[:, -1]  # [N, V]
