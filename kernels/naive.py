"""Naive per-token log-probs: the specification of every kernel in this package and its fallback.

Builds the full [N, V] logits, so its memory grows with N * V; the other paths must match it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_token_logprobs(
    hidden: Tensor,  # [N, H]
    weight: Tensor,  # [V, H]
    targets: Tensor,  # [N] int64
    *,
    bias: Tensor | None = None,  # [V]
    temperature: float = 1.0,
    return_entropy: bool = False,
    detach_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log_softmax((hidden @ weight.T + bias) / temperature)[n, targets[n]] in fp32, optionally the entropy.

    The matmul runs in the input dtype (like an LM head would); the softmax is in fp32.
    Returns fp32 log-probs [N] and, with `return_entropy`, the fp32 entropy [N] of the tempered distribution
    (a constant without gradient when `detach_entropy`).
    """
    logits = hidden @ weight.T  # [N, V]
    if bias is not None:
        logits = logits + bias
    logits = logits.float() / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # [N]
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N]
    return logp, entropy.detach() if detach_entropy else entropy
