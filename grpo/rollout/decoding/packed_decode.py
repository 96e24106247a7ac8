"""A CPU decode step for fp32 Llama-style decoders: fused projections in the GEMM form this CPU runs fastest.

A decode step multiplies 4-16 rows by every weight matrix, so it is bound by streaming the weights from memory,
and BLAS libraries handle that skinny shape unevenly. On a 2-core Xeon, MKL's plain `x @ W.T` took ~40 ms per
token against ~26 ms to stream SmolLM2-135M once, and weights pre-packed for the row count (cblas_sgemm_pack)
reached the streaming rate. On a 2-core AMD EPYC (Zen 4) the packed path fell to ~7 GB/s (78 ms per token),
while `W @ x.T` streamed at ~25 GB/s (36 ms per token). PackedProjection offers both forms, and the faster one
per weight shape is measured once per process (`fastest_strategy`).

q/k/v and gate/up are fused into one matrix each, which halves the per-layer op count (at ~5-10 us per op on a
CPU, that matters as much as the arithmetic). The fused copies are rebuilt once per rollout, because the
optimizer changes the weights between rollouts. LoRA deltas are merged into that copy, so adapters cost
nothing while sampling.

The layer forward is written out here (RMSNorm, RoPE, grouped-query attention, gated MLP) for the model types
in STATIC_DECODE_MODEL_TYPES; tests hold its logits to transformers' at 1e-5. Anything else falls back to
grpo.rollout.decoding.static_decode.StaticDecoder, which runs transformers' own layers.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from grpo.model.lora import LoRALinear
from grpo.rollout.decoding.static_decode import STATIC_DECODE_MODEL_TYPES, StaticDecoder, StaticKVCache
from grpo.run.cpu_memory import mapped_allocations


def effective_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [out, in] weight and bias that the layer applies in eval mode (LoRA merged in when active)."""
    weight = layer.weight.detach()
    if isinstance(layer, LoRALinear) and not (layer.merged or layer.disabled):
        weight = weight + layer.delta_weight().detach()
    return weight, None if layer.bias is None else layer.bias.detach()


def packable(layer: nn.Module) -> bool:
    return type(layer) in (nn.Linear, LoRALinear)


MATMUL_STRATEGIES = ("mkl_packed", "streamed")


class PackedProjection:
    """x [rows, in] -> x @ cat(weights).T + cat(biases) for a fixed row count, by one of two GEMM shapes:

    - "mkl_packed": the weight reordered by MKL for exactly `rows` rows (cblas_sgemm_pack); the fast form on
      the Xeon this was first tuned on, where plain `x @ W.T` at 4 rows ran at half the streaming rate.
    - "streamed": `W @ x.T`, the weight as the tall left operand, which BLAS streams row by row like a GEMV.
      On a 2-core AMD EPYC (Zen 4) MKL's packed path ran at ~7 GB/s and this one at ~25 GB/s. It needs no
      packed copy: an unfused, unmerged weight is used in place.

    Which one a machine prefers is measured once per process (`fastest_strategy`).
    """

    def __init__(self, layers: list[nn.Module], rows: int, strategy: str = "mkl_packed"):
        if strategy not in MATMUL_STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(MATMUL_STRATEGIES)}; got {strategy!r}")
        parts = [effective_weight(layer) for layer in layers]
        weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]  # [out, in]
        self.rows, self.strategy = rows, strategy
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts]
        self.bias = torch.cat(biases) if any(b is not None for _, b in parts) else None
        if strategy == "streamed":
            self.weight = weight.contiguous()
            # [out, 1]: addmm adds it per column
            self.bias = None if self.bias is None else self.bias[:, None]
            return
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        # _mkl_linear reads the unpacked weight only when the row count differs from the packed one, which
        # __call__ rules out; a broadcast view carries the shape without keeping a second copy alive.
        self.shape_only = weight.new_empty(1).expand(weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.rows:
            raise ValueError(f"packed projection built for {self.rows} rows got {x.shape[0]}")
        if self.strategy == "streamed":
            if self.bias is None:
                out = torch.mm(self.weight, x.t())  # [out, rows]
            else:
                out = torch.addmm(self.bias, self.weight, x.t())
            return out.t().contiguous()  # [rows, out]: a few KB to copy, and later views need it dense
        return torch.ops.mkl._mkl_linear(x, self.packed, self.shape_only, self.bias, self.rows)


# Enough weight bytes per timed pass that they cannot stay in a last-level cache, as in a real decode step.
CALIBRATION_BYTES = 64 * 1024 * 1024
MAX_CALIBRATION_MATRICES = 48
PACKED_MARGIN = 1.15


@functools.cache  # one measurement per process and shape: the machine does not change under a run
def fastest_strategy(rows: int, out_features: int, in_features: int) -> str:
    """The MATMUL_STRATEGIES entry that multiplies `rows` rows by an [out, in] fp32 weight fastest here,
    timed on enough distinct matrices of that shape to stream them from memory (about 0.1 s per shape).

    "mkl_packed" must win by PACKED_MARGIN: packing costs time every rollout, and a clear margin keeps the
    choice (and with it the last bits of the sampled logits) the same from one process to the next.
    """
    count = CALIBRATION_BYTES // (4 * out_features * in_features)
    count = max(1, min(MAX_CALIBRATION_MATRICES, count))
    weights = torch.full((count, out_features, in_features), 0.01).unbind(0)
    x = torch.full((rows, in_features), 0.5)
    seconds = {}
    for strategy in MATMUL_STRATEGIES:
        projections = [PackedProjection([_Weight(w)], rows, strategy) for w in weights]
        best = float("inf")
        for _ in range(3):  # the first pass also warms up; the minimum is the steady-state figure
            start = time.perf_counter()
            for projection in projections:
                projection(x)
            best = min(best, time.perf_counter() - start)
        seconds[strategy] = best
    return "mkl_packed" if seconds["mkl_packed"] * PACKED_MARGIN < seconds["streamed"] else "streamed"


class _Weight(nn.Module):
    """A bias-free linear layer over an existing tensor, for calibration without copying it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight, self.bias = weight, None


def packed_decode_supported(model: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    if model.config.model_type not in STATIC_DECODE_MODEL_TYPES:
        return False
    for layer in model.get_decoder().layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if not all(packable(p) for p in projections):
            return False
    return packable(model.get_output_embeddings())


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' half-split convention, x * cos + rotate_half(x) * sin, in three ops: rolling the
    last dim by half swaps the halves, and signed_sin carries rotate_half's minus sign on the first half."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def projection(layers: list[nn.Module], rows: int, strategy: str) -> PackedProjection:
    """The fused projection of `layers`; strategy "auto" takes the one measured fastest for its shape."""
    if strategy == "auto":
        out_features = sum(layer.weight.shape[0] for layer in layers)
        strategy = fastest_strategy(rows, out_features, layers[0].weight.shape[1])
    return PackedProjection(layers, rows, strategy)


class PackedLayer:
    def __init__(self, layer: nn.Module, rows: int, strategy: str):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = projection([attn.q_proj, attn.k_proj, attn.v_proj], rows, strategy)
        self.o = projection([attn.o_proj], rows, strategy)
        self.gate_up = projection([mlp.gate_proj, mlp.up_proj], rows, strategy)
        self.down = projection([mlp.down_proj], rows, strategy)
        self.norms = (rms_params(layer.input_layernorm), rms_params(layer.post_attention_layernorm))
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # qwen3: per head
        self.qk_norms = None if q_norm is None else (rms_params(q_norm), rms_params(k_norm))
        self.act = mlp.act_fn
        self.scaling = attn.scaling
        self.split = mlp.gate_proj.out_features


def rms_params(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight.detach(), eps


def rms_norm(x: torch.Tensor, params: tuple[torch.Tensor, float]) -> torch.Tensor:
    weight, eps = params
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class PackedDecoder(StaticDecoder):
    """StaticDecoder's contract (logits [N, V] for tokens [N] at positions [N]) with packed, fused weights."""

    def __init__(
        self,
        model: nn.Module,
        cache: StaticKVCache,
        attention_mask: torch.Tensor,
        capacity: int,
        *,
        strategy: str = "auto",
    ):
        super().__init__(model, cache, attention_mask, capacity)
        rows = attention_mask.shape[0]
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        with mapped_allocations():
            self.layers = [PackedLayer(layer, rows, strategy) for layer in self.decoder.layers]
            self.lm_head = projection([self.head], rows, strategy)
        self.final_norm = rms_params(self.decoder.norm)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        end = self.cache.length + 1
        n, h, kvh, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        # one additive mask per step, shaped for the [N * kvh] batch of attentions below and shared by all layers
        mask = self.step_mask(end).expand(n, kvh, h // kvh, end).reshape(n * kvh, h // kvh, end)
        x = self.decoder.embed_tokens(tokens)  # [N, H]
        cos, sin = self.decoder.rotary_emb(x, position_ids=positions[:, None])  # [N, 1, D]
        signed_sin = torch.cat((-sin[..., : d // 2], sin[..., d // 2 :]), dim=-1)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.norms[0])).view(n, h + 2 * kvh, d)
            v = qkv[:, h + kvh :]
            if layer.qk_norms is None:  # queries and keys rotate together: one set of ops for both
                q, k = rotate(qkv[:, : h + kvh], cos, signed_sin).split((h, kvh), dim=1)
            else:
                q, k = (
                    rms_norm(qkv[:, :h], layer.qk_norms[0]),
                    rms_norm(qkv[:, h : h + kvh], layer.qk_norms[1]),
                )
                q, k = rotate(q, cos, signed_sin), rotate(k, cos, signed_sin)
            keys, values = self.cache.update(k[:, :, None], v[:, :, None], i)  # [N, kvh, end, D]
            # query head j reads kv head j // (h / kvh): a [N * kvh] batch of (h / kvh)-row attentions
            scores = torch.baddbmm(
                mask,
                q.reshape(n * kvh, h // kvh, d),
                keys.reshape(n * kvh, end, d).transpose(1, 2),
                alpha=layer.scaling,
            )
            attended = torch.bmm(scores.softmax(dim=-1), values.reshape(n * kvh, end, d))  # [N kvh, h/kvh, D]
            x = x + layer.o(attended.view(n, h * d))
            gate_up = layer.gate_up(rms_norm(x, layer.norms[1]))
            x = x + layer.down(layer.act(gate_up[:, : layer.split]) * gate_up[:, layer.split :])
        self.cache.length = end
        return self.lm_head(rms_norm(x, self.final_norm))  # [N, V]
