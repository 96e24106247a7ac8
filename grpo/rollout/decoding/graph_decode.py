"""A decode step with fixed shapes and addresses, recorded once per rollout as a CUDA graph and then replayed.

On a GPU a decode step of a small model is bound by launch overhead, not by the GPU: each layer runs ~33 small
ops (over 1,000 per step for SmolLM2-135M), each launched from Python through transformers' modules for
microseconds of work. A CUDA graph records the kernels of one step and replays them with a single launch. A
graph fixes every shape and address, so unlike grpo/rollout/decoding/static_decode.py this step attends over the cache's
whole capacity (columns not written yet are masked out) and writes its key/value column at an index that lives
in a device tensor and advances inside the graph. The extra attention work is cheap next to the launches saved.

On CPU the same step runs eagerly (the tests hold it to transformers' logits); only CUDA records a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from grpo.rollout.decoding.static_decode import StaticDecoder, StaticKVCache, additive_mask, decode_step


def graph_decode_supported(model: nn.Module) -> bool:
    """Graphs need a step without host-side decisions: no RoPE that rescales with the sequence length, and no
    FSDP hooks (a model gathered for the rollout still runs FSDP's per-module logic on every call)."""
    from torch.distributed.fsdp import FSDPModule

    rope_type = str(getattr(model.get_decoder().rotary_emb, "rope_type", "default"))
    if "dynamic" in rope_type or "longrope" in rope_type:
        return False
    return not any(isinstance(m, FSDPModule) for m in model.modules())


class ColumnKVCache:
    """StaticKVCache's buffers, written at column `column` (a 1-element device tensor); layers see every column."""

    def __init__(self, cache: StaticKVCache, column: torch.Tensor):
        self.keys, self.values, self.column = cache.keys, cache.values, column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__):
        self.keys[layer_idx].index_copy_(2, self.column, key_states)  # [N, kv_heads, 1, D] into column
        self.values[layer_idx].index_copy_(2, self.column, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class FixedShapeDecoder(StaticDecoder):
    """One token per row per call, every tensor the same shape and address on every call: logits [N, V]."""

    def __init__(self, model: nn.Module, cache: StaticKVCache, attention_mask: torch.Tensor, capacity: int):
        super().__init__(model, cache, attention_mask, capacity)
        n, device = attention_mask.shape[0], attention_mask.device
        self.start = cache.length  # the first column a decode step writes
        for buffer in (*cache.keys, *cache.values):
            # Masked columns still enter the attention products (0 x NaN is NaN): no stale memory there.
            buffer[:, :, self.start :].zero_()
        self.column = torch.full((1,), self.start, dtype=torch.long, device=device)
        self.cache = ColumnKVCache(cache, self.column)
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)  # inputs, copied in before each step
        self.positions = torch.zeros(n, dtype=torch.long, device=device)

    def step(self) -> torch.Tensor:
        """Decodes self.tokens at self.positions into cache column self.column, then advances the column."""
        self.allowed.index_fill_(1, self.column, True)
        mask = additive_mask(self.allowed, self.dtype)  # [N, 1, 1, capacity]
        cache_kwargs = {self.cache_arg: self.cache}
        logits = decode_step(self.decoder, self.head, self.tokens, self.positions, mask, cache_kwargs)
        self.column.add_(1)
        return logits  # [N, V]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        return self.step()


class CUDAGraphDecoder:
    """FixedShapeDecoder's step recorded as a CUDA graph. The logits it returns are the graph's own output
    buffer: read them before the next call, which overwrites them."""

    def __init__(self, fixed: FixedShapeDecoder):
        self.fixed = fixed
        side = capture_stream()
        # Warm up on the side stream first: lazy initialisation (cuBLAS workspaces, autotuning) cannot be recorded.
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fixed.step()
        torch.cuda.current_stream().wait_stream(side)
        # The warm-up wrote column `start` from dummy tokens; the first real step rewrites it before reading it.
        fixed.column.fill_(fixed.start)
        # Records without running: the column stays at `start`.
        self.graph, self.logits = record(fixed.step, side)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.fixed.tokens.copy_(tokens)
        self.fixed.positions.copy_(positions)
        self.graph.replay()
        return self.logits


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
_LAST_GRAPHS: dict[int, torch.cuda.CUDAGraph] = {}


def capture_stream() -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture, as torch.cuda.graph keeps one: the caching
    allocator hands a freed block only to allocations on the stream it was allocated on, so a fresh stream per
    rollout could not reuse the blocks of the rollouts before it."""
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream()
    return _CAPTURE_STREAMS[device]


def record(
    step: Callable[[], torch.Tensor], side: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`with torch.cuda.graph(g, stream=side): out = step()` (torch 2.11-2.13), less the clean-up its __enter__
    does on every capture: torch.cuda.empty_cache() and the host allocator's, and gc.collect() when
    TORCH_CUDAGRAPH_GC is set. A rollout records a graph every training step, so that handed the caching
    allocator's free blocks back to the driver each step, and the reference and policy passes after the rollout
    had to cudaMalloc them again.

    Without empty_cache, a dead graph's private memory pool stays reserved until some cudaMalloc fails: one more
    pool per rollout. So each capture shares the pool of the graph recorded before it on this device, kept alive
    here until the next capture: the pool never drops to zero users (capturing into a pool id that did, while
    its blocks are still cached, fails an internal assert), and a new capture reuses the blocks earlier captures
    freed. Sharing is safe here: a captured step's temporaries live only within one replay, replays run one at a
    time on the rollout's stream, and a graph's output (the logits) stays allocated while its decoder lives, so
    no later capture takes it."""
    device = torch.cuda.current_device()
    previous = _LAST_GRAPHS.get(device)
    graph = torch.cuda.CUDAGraph()
    # As torch.cuda.graph: the warm-up and all work queued before it are done. This also lets the capture reuse
    # the shared pool's free blocks, which earlier graphs' replays used on another stream than the side one.
    torch.cuda.synchronize()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(pool=None if previous is None else previous.pool(), capture_error_mode="global")
        try:
            out = step()
        finally:
            graph.capture_end()  # as torch.cuda.graph's __exit__, also when the step raised
    torch.cuda.current_stream().wait_stream(side)
    _LAST_GRAPHS[device] = graph
    return graph, out
