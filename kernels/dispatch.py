"""Pick a log-prob implementation by name or by what this machine can run."""

from __future__ import annotations

from torch import Tensor

from kernels.reference import naive_token_logprobs

IMPLS = ("naive", "chunked", "triton", "auto")


def available_impls() -> list[str]:
    """Names of the implementations that run on this machine (always includes "naive")."""
    return ["naive"]


def token_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    targets: Tensor,  # [N] int64
    *,
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    impl: str = "auto",
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """fp32 log-probs [N] of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    With `return_entropy`, also the fp32 entropy [N] of that tempered distribution.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}.")
    return naive_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy
    )
