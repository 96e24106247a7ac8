"""Pick a log-prob implementation by name, or the fastest one this machine runs ("auto")."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from grpo_kernels.chunked import chunked_token_logprobs
from grpo_kernels.naive import naive_token_logprobs

IMPLS = ("auto", "naive", "chunked", "triton")


@functools.cache
def _triton_importable() -> bool:
    if not torch.cuda.is_available():
        return False  # never import triton on a machine without CUDA
    try:
        import grpo_kernels.triton_logprobs  # noqa: F401  (imports triton)
    except Exception:  # triton missing, or present but unusable here (driver, version): fall back
        return False
    return True


def available_impls() -> list[str]:
    """Names of the implementations that run on this machine: always naive and chunked, triton with CUDA."""
    return ["naive", "chunked"] + (["triton"] if _triton_importable() else [])


def _check(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, impl: str, chunk_size: int | None
) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}.")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden must be [N, H] and weight [V, H] with the same H; got {shapes}.")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}] token ids; got {tuple(targets.shape)}.")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = {weight.shape[0]}; got shape {tuple(bias.shape)}.")


def token_logprobs(
    hidden: Tensor,  # [N, H] last hidden states, after the final norm
    weight: Tensor,  # [V, H] LM head weight (may be tied to the embeddings)
    targets: Tensor,  # [N] int64 chosen token ids
    *,
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    detach_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """fp32 log-probs [N] of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    With `return_entropy`, also the fp32 entropy [N] of that tempered distribution; both are differentiable
    w.r.t. hidden, weight and bias, unless `detach_entropy` makes the entropy a constant (for a metric or a
    token mask; the log-probs then keep their cheaper backward). `impl`: "naive" builds the full [N, V]
    logits (the specification); "chunked" processes `chunk_size` rows at a time and recomputes them in
    backward; "triton" (CUDA only) does the same with Triton kernels for the softmax parts; "auto" takes triton
    on CUDA tensors when it imports, else chunked. `chunk_size` (rows) defaults to about 512 MB of fp32 logits per chunk.
    """
    _check(hidden, weight, targets, bias, impl, chunk_size)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_importable() else "chunked"
    if impl == "triton" and not (hidden.is_cuda and _triton_importable()):
        allowed = ", ".join(available_impls())
        raise ValueError(f"impl='triton' needs CUDA tensors and triton; use one of {allowed} here.")
    hidden, weight, bias = _common_dtype(hidden, weight, bias)
    kw = {
        "bias": bias,
        "temperature": temperature,
        "return_entropy": return_entropy,
        "detach_entropy": detach_entropy,
    }
    if impl == "naive":
        return naive_token_logprobs(hidden, weight, targets, **kw)
    # The fast paths pick their own precisions (fp32 buffers, explicit out dtypes): autocast stays out.
    with torch.autocast(hidden.device.type, enabled=False):
        if impl == "chunked":
            return chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk_size, **kw)
        from grpo_kernels.triton_logprobs import triton_token_logprobs

        return triton_token_logprobs(hidden, weight, targets, chunk_size=chunk_size, **kw)


def _common_dtype(
    hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One matmul dtype for all three: autocast's when it is on (what an LM head would use), else promotion."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
