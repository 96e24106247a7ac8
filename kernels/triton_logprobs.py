"""Triton path (CUDA): the chunked algorithm with the softmax work fused into one pass per chunk.

Each chunk's logits come from one cuBLAS matmul in the input dtype (tensor cores, fp32 accumulation). Then:
- forward: one program per row streams the row's logits in BLOCK_V blocks and keeps an online
  log-sum-exp (running max m, running sum s of exp(z - m)) and, for the entropy, the running sum a of
  exp(z - m) (z - m); no fp32 copy of the logits is made.
- backward: one program per row recomputes p = exp(z - lse) block by block and overwrites the logits with
  d loss / d logits in place, in the input dtype, ready for the two gradient matmuls.
The naive path instead writes an fp32 copy, the log-softmax and its gradient, each [N, V].

Block sizes are the only compile-time constants; temperature, V and strides are runtime arguments, and
absent outputs / upstream gradients are handled by passing zeros, so nothing else triggers a recompile.
This module imports triton at import time: import it only when CUDA is available (kernels/dispatch.py does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from grpo_kernels.chunked import chunked_token_logprobs

BLOCK_V = 2048  # vocabulary block per loop step; 2048 bf16 = 4 KB per row per step


@triton.jit
def _stats_kernel(
    logits_ptr,  # [c, V] raw logits, input dtype
    stride_row,
    targets_ptr,  # [c] int64
    logp_ptr,  # [c] fp32 out
    lse_ptr,  # [c] fp32 out
    ent_ptr,  # [c] fp32 out
    vocab,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    # Finite start for the running max: with -inf, (m - m_new) * s would be -inf * 0 = nan on the first block.
    m = tl.full([], -3.0e38, tl.float32)
    s = tl.zeros([], tl.float32)  # sum exp(z - m)
    a = tl.zeros([], tl.float32)  # sum exp(z - m) * (z - m)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        mask = idx < vocab
        z = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 on masked lanes
        ez = e * tl.where(e > 0.0, z - m_new, 0.0)  # where e = 0, z may be -inf: 0 * -inf would be nan
        a = scale * (a + (m - m_new) * s) + tl.sum(ez, axis=0)
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    t = tl.load(targets_ptr + row)
    z_t = tl.load(base + t).to(tl.float32) * inv_temp
    log_s = tl.log(s)
    tl.store(logp_ptr + row, z_t - m - log_s)
    tl.store(lse_ptr + row, m + log_s)
    tl.store(ent_ptr + row, log_s - a / s)  # H = -sum p (z - m - log s) = log s - a / s


@triton.jit
def _grad_kernel(
    logits_ptr,  # [c, V] raw logits in, d loss / d logits out (in place), input dtype
    stride_row,
    targets_ptr,  # [c] int64
    lse_ptr,  # [c] fp32
    ent_ptr,  # [c] fp32 (zeros when the entropy has no gradient)
    g_logp_ptr,  # [c] fp32, already divided by T (zeros when absent)
    g_ent_ptr,  # [c] fp32, already divided by T (zeros when absent)
    vocab,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    ent = tl.load(ent_ptr + row)
    g_lp = tl.load(g_logp_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    t = tl.load(targets_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        idx = start + offs
        mask = idx < vocab
        z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        logp = tl.where(p > 0.0, logp, 0.0)  # p log p -> 0 where p underflows, never 0 * -inf
        # d/dz of g_lp log p_t + g_ent H = g_lp (onehot - p) - g_ent p (log p + H)
        dz = -p * (g_lp + g_ent * (logp + ent))
        dz = tl.where(idx == t, dz + g_lp, dz)
        tl.store(base + idx, dz.to(logits_ptr.dtype.element_ty), mask=mask)


class TritonChunkOps:
    """The two per-chunk operations of ChunkedLogprobs as Triton kernels, on one logits buffer."""

    def __init__(self, rows: int, vocab: int, hidden: Tensor, entropy_grad: bool) -> None:
        self.logits_out = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)  # [c, V]

    def stats(
        self, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        c, vocab = logits.shape
        logp, lse, ent = torch.empty(3, c, dtype=torch.float32, device=logits.device)  # [c] each
        if c:
            _stats_kernel[(c,)](
                logits, logits.stride(0), targets, logp, lse, ent, vocab, 1.0 / temperature, BLOCK_V=BLOCK_V
            )
        return logp, lse, ent if with_entropy else None

    def dlogp_dlogits(self, logits: Tensor, targets: Tensor, temperature: float, lse: Tensor) -> Tensor:
        """(onehot - p) / T in place of the logits (which `stats` only read), in the input dtype."""
        inv_t = torch.full((logits.shape[0],), 1.0 / temperature, dtype=torch.float32, device=logits.device)
        return self.grad_logits(logits, targets, temperature, lse, None, inv_t, None)

    def grad_logits(
        self,
        logits: Tensor,  # [c, V]
        targets: Tensor,  # [c]
        temperature: float,
        lse: Tensor,  # [c]
        ent: Tensor | None,  # [c]
        g_logp: Tensor | None,  # [c]
        g_ent: Tensor | None,  # [c]
    ) -> Tensor:
        c, vocab = logits.shape
        zeros = torch.zeros(c, dtype=torch.float32, device=logits.device)
        g_logp = zeros if g_logp is None else g_logp.contiguous()
        ent, g_ent = (zeros, zeros) if g_ent is None else (ent, g_ent.contiguous())
        if c:
            _grad_kernel[(c,)](
                logits,
                logits.stride(0),
                targets,
                lse,
                ent,
                g_logp,
                g_ent,
                vocab,
                1.0 / temperature,
                BLOCK_V=BLOCK_V,
            )
        return logits


def triton_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, **kw
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract (and keywords) as `chunked_token_logprobs`, with Triton kernels; CUDA tensors only."""
    assert hidden.is_cuda and weight.is_cuda, "the Triton path needs CUDA tensors"
    return chunked_token_logprobs(hidden, weight, targets, ops=TritonChunkOps, **kw)
