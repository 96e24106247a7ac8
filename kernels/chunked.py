"""Chunked per-token log-probs: never builds the [N, V] logits; backward recomputes each chunk's logits.

Rows are processed `chunk_size` at a time. Forward keeps only the inputs and, per row, the log-sum-exp (and
the entropy when asked); backward recomputes a chunk's logits with one matmul, turns them into d loss / d
logits in place and feeds two more matmuls. Peak extra memory is one or two [chunk, V] fp32 buffers plus,
for bf16 weights, an fp32 [V, H] gradient accumulator, instead of several [N, V] tensors. With a frozen LM
head (LoRA) and no entropy, forward computes d log p / d hidden directly and backward skips the recompute.

The per-chunk math lives in `TorchChunkOps`; `kernels/triton_logprobs.py` supplies the same operations as
Triton kernels and reuses the autograd Function below.

Math, with z = logits / T, p = softmax(z), lse = logsumexp(z), t the target and H = -sum_j p_j log p_j:
    log p_t = z_t - lse
    d log p_t / d z_j = onehot_t(j) - p_j
    d H / d z_j = -p_j (log p_j + H)
and d / d logits = (d / d z) / T; grad hidden = dlogits @ W, grad W = dlogits^T @ hidden,
grad bias = sum over rows of dlogits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows per chunk are chosen so that one [chunk, V] fp32 buffer is about this many bytes. Measured on CPU at
# V = 151,936 (kernels/BENCHMARKS.md): 128-row chunks (78 MB) cost 1.35x naive's CPU time, 512-1024 rows
# (0.3-0.6 GB) 1.13-1.17x, 2048 rows (1.2 GB) 1.11x; bigger chunks eat into the memory saving.
CHUNK_BYTES = 512 * 2**20
MIN_CHUNK_ROWS = 16
# The entropy's exp runs through a scratch block of this many rows instead of a second [chunk, V] buffer.
ENTROPY_BLOCK_ROWS = 64


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk such that a chunk of fp32 logits is about CHUNK_BYTES."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(vocab, 1)))


def chunk_logits(
    hidden: Tensor,  # [c, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    out: Tensor | None = None,  # [c, V] in hidden's dtype, reused across chunks
) -> Tensor:
    """Raw logits of one chunk in the input dtype (fp32 accumulation inside the matmul)."""
    # out= reuses one buffer for all chunks: on CPU each fresh multi-hundred-MB tensor costs page faults.
    if bias is None:
        return torch.mm(hidden, weight.T, out=out)
    return torch.addmm(bias, hidden, weight.T, out=out)


class TorchChunkOps:
    """Per-chunk statistics and logit gradients in plain PyTorch, in place in one fp32 buffer."""

    def __init__(self, rows: int, vocab: int, hidden: Tensor, entropy_grad: bool) -> None:
        self.buf = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)  # [c, V]
        self.buf2 = torch.empty_like(self.buf) if entropy_grad else None  # [c, V], for grad_logits
        self.scratch: Tensor | None = None  # [ENTROPY_BLOCK_ROWS, V], made when an entropy is asked for
        self.sum_exp: Tensor | None = None  # [c] left by `stats` for `dlogp_dlogits`
        # fp32: the matmul writes straight into the fp32 buffer; bf16: it needs its own buffer of its dtype.
        self.logits_out = self.buf  # [c, V] in hidden's dtype
        if hidden.dtype != torch.float32:
            self.logits_out = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)

    def _scaled(self, logits: Tensor, temperature: float) -> Tensor:
        z = self.buf[: logits.shape[0]]
        if logits.data_ptr() != z.data_ptr():
            z.copy_(logits)  # bf16 -> fp32
        if temperature != 1.0:
            z.div_(temperature)  # a division like the naive path, not a multiplication by 1 / T
        return z  # [c, V]

    def stats(
        self, logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log p of targets, lse, entropy or None), each fp32 [c]; clobbers the buffers."""
        z = self._scaled(logits, temperature)  # [c, V]
        m = z.amax(-1, keepdim=True)  # [c, 1]
        z.sub_(m)  # shifted logits, max 0
        z_t = z.gather(1, targets.unsqueeze(1)).squeeze(1)  # [c]
        ent = None
        if with_entropy:
            s, dot = self._exp_with_dot(z)  # [c] each
            # H = log s - sum_j e_j z_j / s on the shifted logits: both terms are small, so no cancellation.
            ent = s.log() - dot / s
        else:
            s = z.exp_().sum(-1)  # [c]
        self.sum_exp = s  # with the buffer now exp(z - m): what dlogp_dlogits and grad_from_stats reuse
        log_s = s.log()
        return z_t - log_s, m.squeeze(1) + log_s, ent

    def _exp_with_dot(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Turns z into exp(z) in place, as the path without entropy does, and returns the row sums of exp(z)
        and of exp(z) * z. Each block of rows is exponentiated into a small scratch buffer, dotted with z there
        (bmm: no [c, V] temporary) and copied back: no second [c, V] buffer."""
        c, vocab = z.shape
        if self.scratch is None:
            self.scratch = torch.empty(min(ENTROPY_BLOCK_ROWS, c), vocab, dtype=z.dtype, device=z.device)
        sums, dots = torch.empty(2, c, dtype=z.dtype, device=z.device)
        for r in range(0, c, self.scratch.shape[0]):
            block = z[r : r + self.scratch.shape[0]]  # [b, V]
            e = torch.exp(block, out=self.scratch[: block.shape[0]])
            sums[r : r + block.shape[0]] = e.sum(-1)
            dots[r : r + block.shape[0]] = torch.bmm(e.unsqueeze(1), block.unsqueeze(2)).view(-1)
            block.copy_(e)
        return sums, dots

    def dlogp_dlogits(self, logits: Tensor, targets: Tensor, temperature: float, lse: Tensor) -> Tensor:
        """(onehot - p) / T, fp32 [c, V], for the chunk that `stats` (without entropy) has just processed."""
        return self.grad_from_stats(targets, torch.full_like(self.sum_exp, 1.0 / temperature))

    def grad_from_stats(self, targets: Tensor, g_logp: Tensor) -> Tensor:
        """g (onehot - p), fp32 [c, V], from the exp(z - m) that `stats` left in the buffer; g already / T."""
        z = self.buf[: targets.shape[0]]  # exp(z - m), so p = z / sum_exp
        z.mul_((-g_logp / self.sum_exp).unsqueeze(1))
        return z.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1))

    def grad_logits(
        self,
        logits: Tensor,  # [c, V] raw logits, input dtype
        targets: Tensor,  # [c]
        temperature: float,
        lse: Tensor,  # [c]
        ent: Tensor | None,  # [c]
        g_logp: Tensor | None,  # [c] fp32, already divided by T
        g_ent: Tensor | None,  # [c] fp32, already divided by T
    ) -> Tensor:
        """d loss / d logits, fp32 [c, V], computed in place in the buffer."""
        z = self._scaled(logits, temperature)
        z.sub_(lse.unsqueeze(1))  # log p
        if g_ent is not None:
            p = torch.exp(z, out=self.buf2[: z.shape[0]])
            z.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1))  # g_H (log p + H)
            if g_logp is not None:
                z.add_(g_logp.unsqueeze(1))
            z.mul_(p).neg_()  # -p (g_lp + g_H (log p + H))
        else:
            z.exp_().mul_(-g_logp.unsqueeze(1))  # -g_lp p
        if g_logp is not None:
            z.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1))  # + g_lp onehot
        return z


_mm_out_dtype_works = True


def _add_matmul_fp32(acc: Tensor, a: Tensor, b: Tensor, first: bool = False) -> None:
    """acc += a @ b with fp32 accumulation; acc is fp32, a and b share a dtype. first: acc is uninitialised,
    so the fp32 case writes a @ b straight into it (no zero-fill of a [V, H] buffer: ~20 ms at 49k x 576)."""
    global _mm_out_dtype_works
    if a.dtype == torch.float32:
        torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
        return
    if first:
        acc.zero_()
    if a.is_cuda and _mm_out_dtype_works:
        try:  # bf16 operands, fp32 result: no rounding of each chunk's partial sum to bf16
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _mm_out_dtype_works = False
    if a.is_cuda:
        acc.add_(a @ b)
    else:
        acc.addmm_(a.float(), b.float())  # CPU has no bf16 -> fp32 matmul; the operands are chunk-sized


class ChunkedLogprobs(torch.autograd.Function):
    """Autograd Function of the chunked and Triton paths; `make_ops` builds their per-chunk operations."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,  # [N, H]
        weight: Tensor,  # [V, H]
        bias: Tensor | None,  # [V]
        targets: Tensor,  # [N] int64
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
        entropy_grad: bool,
        eager: bool,
        make_ops,
    ):
        """`entropy_grad` False returns the entropy as a constant (a metric or a mask): no gradient flows
        through it and the fast paths below stay open.
        `eager`: only hidden needs a gradient (frozen LM head, e.g. LoRA) and no entropy gradient is wanted.
        Then d log p / d hidden = (onehot - p) @ W / T is computed here, from the logits already at hand, and
        backward only scales it by the upstream gradient: 2 matmuls in all instead of 3."""
        n, vocab = hidden.shape[0], weight.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty_like(logp)  # [N]
        ent = torch.empty_like(logp) if with_entropy else None  # [N]
        rows = min(chunk_size, n)
        ops = make_ops(rows, vocab, hidden, False)  # the entropy gradient's buffer is backward's own
        dlogp_dh = (
            torch.empty(n, hidden.shape[1], dtype=hidden.dtype, device=hidden.device) if eager else None
        )
        # One chunk, no entropy gradient, gradients wanted: backward takes p from the exp(z - m) that `stats`
        # leaves in the buffer instead of recomputing the logits (one [N, V] matmul less). The buffer is chunk-sized and
        # the LM head is the last op of forward, so its backward runs next: holding it adds no peak memory.
        keep = (
            n <= chunk_size
            and not (entropy_grad or eager)
            and any(ctx.needs_input_grad[:3])
            and hasattr(ops, "grad_from_stats")
        )
        ctx.kept_ops = ops if keep else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits = chunk_logits(hidden[s:e], weight, bias, out=ops.logits_out[: e - s])  # [c, V]
            lp, ls, en = ops.stats(logits, targets[s:e], temperature, with_entropy)
            logp[s:e], lse[s:e] = lp, ls
            if with_entropy:
                ent[s:e] = en
            if eager:
                assert not entropy_grad
                dz = ops.dlogp_dlogits(logits, targets[s:e], temperature, ls)  # [c, V]
                dz_in = dz if dz.dtype == hidden.dtype else logits.copy_(dz)  # [c, V]
                torch.mm(dz_in, weight, out=dlogp_dh[s:e])
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent if entropy_grad else None, dlogp_dh)
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.temperature, ctx.chunk_size, ctx.make_ops = temperature, chunk_size, make_ops
        ctx.set_materialize_grads(False)
        return (logp, ent) if with_entropy else logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None = None):
        hidden, weight, bias, targets, lse, ent, dlogp_dh = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        nones = (None,) * 7
        if (g_logp is None and g_ent is None) or not (need_h or need_w or need_b):
            return None, None, None, *nones
        if dlogp_dh is not None:
            assert g_ent is None and not (need_w or need_b)
            return (dlogp_dh.float() * g_logp.float().unsqueeze(1)).to(hidden.dtype), None, None, *nones
        n, vocab = hidden.shape[0], weight.shape[0]
        t, chunk = ctx.temperature, ctx.chunk_size
        # Fold 1/T into the per-row upstream gradients: d/d logits = (d/d z) / T and it is linear in them.
        g_logp = None if g_logp is None else g_logp.float() / t  # [N]
        g_ent = None if g_ent is None else g_ent.float() / t  # [N]
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        f32 = {"dtype": torch.float32, "device": weight.device}
        # [V, H] fp32, written by the first chunk's matmul (zeros when there are no rows at all)
        grad_w = (torch.empty if n else torch.zeros)(weight.shape, **f32) if need_w else None
        grad_b = torch.zeros(vocab, **f32) if need_b else None  # [V]
        kept, ctx.kept_ops = ctx.kept_ops, None
        rows = min(chunk, n)
        ops = kept or ctx.make_ops(rows, vocab, hidden, g_ent is not None)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = ops.logits_out[: e - s]  # [c, V]
            if kept is not None:  # no entropy gradient, so g_logp is set (both None returned above)
                dz = ops.grad_from_stats(targets[s:e], g_logp[s:e])  # [c, V] fp32
            else:
                logits = chunk_logits(hidden[s:e], weight, bias, out=logits)
                dz = ops.grad_logits(
                    logits,
                    targets[s:e],
                    t,
                    lse[s:e],
                    None if ent is None else ent[s:e],
                    None if g_logp is None else g_logp[s:e],
                    None if g_ent is None else g_ent[s:e],
                )  # [c, V], fp32 or the input dtype
            # grad hidden runs in the input dtype, like autograd does for the naive path; the logits buffer
            # is free again once the ops have read it.
            dz_in = dz if dz.dtype == hidden.dtype else logits.copy_(dz)  # [c, V]
            if need_h:
                torch.mm(dz_in, weight, out=grad_h[s:e])
            if need_w:
                # fp32 dz for the fp32 accumulation when we have it (CPU path), else the input dtype.
                _add_matmul_fp32(grad_w, dz.T, hidden[s:e].to(dz.dtype), first=s == 0)
            if need_b:
                grad_b.add_(dz.sum(0, dtype=torch.float32))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, *nones


def chunked_token_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    targets: Tensor,  # [N] int64
    *,
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    detach_entropy: bool = False,
    ops: type = TorchChunkOps,
) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as `naive_token_logprobs`, with memory that grows with `chunk_size`, not with N. `ops`
    supplies the per-chunk math (kernels/triton_logprobs.py passes its Triton version)."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    entropy_grad = return_entropy and not detach_entropy
    eager = eager_hidden_grad(hidden, weight, bias, entropy_grad)
    args = (float(temperature), chunk, return_entropy, entropy_grad, eager, ops)
    return ChunkedLogprobs.apply(hidden, weight, bias, targets.long().contiguous(), *args)


def eager_hidden_grad(hidden: Tensor, weight: Tensor, bias: Tensor | None, entropy_grad: bool) -> bool:
    """Whether ChunkedLogprobs should compute d log p / d hidden in forward (see its forward)."""
    frozen_head = not weight.requires_grad and (bias is None or not bias.requires_grad)
    return torch.is_grad_enabled() and hidden.requires_grad and frozen_head and not entropy_grad
