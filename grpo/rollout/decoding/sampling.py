"""The sampling filters: one token per row from softmax(logits / temperature) after top_k, top_p and min_p."""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    top_k: int = 0,
    min_p: float = 0.0,
    return_logps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits / temperature), restricted by top_k, top_p and min_p
    (see `truncate`). With `return_logps` also each drawn token's log-prob under the unfiltered softmax [N].

    Inverse-CDF sampling: one uniform number per row and a binary search in the cumulative distribution.
    torch.multinomial draws an exponential variate per vocabulary entry instead, ~4 ms per call at V=49k.
    """
    full = torch.softmax(logits.float() / temperature, dim=-1)  # [N, V]
    probs, order = truncate(full, top_p=top_p, top_k=top_k, min_p=min_p)  # order: token ids, None = all
    cdf = probs.cumsum(dim=-1)  # [N, K]
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device) * cdf[:, -1:]
    # right=True: the first entry whose cumulative mass exceeds u, so zero-probability tokens never win
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)  # [N, 1]
    tokens = pick if order is None else order.gather(1, pick)  # [N, 1]
    if not return_logps:
        return tokens.squeeze(-1)
    return tokens.squeeze(-1), full.gather(1, tokens).log().squeeze(-1)


def truncate(
    probs: torch.Tensor, *, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling distribution after the usual filters, in transformers' order: top_k (the k most probable
    tokens), then top_p (the nucleus of what top_k kept, renormalised), then min_p (tokens below min_p times
    the most probable one go). Returns unnormalised probabilities [N, K] (0 = removed) and their token ids
    [N, K], or (probs, None) when nothing needs sorting. The loss still scores tokens under the full
    softmax(logits / temperature), as TRL does: the filters shape exploration, not the policy's log-probs.
    """
    order = None
    if 0 < top_k < probs.shape[-1]:
        probs, order = probs.topk(top_k, dim=-1)  # sorted, descending
    if top_p < 1.0:
        # after top_k the kept mass is below 1: the nucleus is top_p of that mass
        bound = top_p if order is None else top_p * probs.sum(-1, keepdim=True)
        probs, picked = nucleus(probs, bound)
        order = picked if order is None else order.gather(1, picked)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs, order


NUCLEUS_CANDIDATES = 1024


def nucleus(probs: torch.Tensor, top_p: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row: probabilities [N, K] in descending order (0 outside the nucleus) and
    their indices in `probs` [N, K]. A token is outside when the mass ranked above it already exceeds top_p
    (a number, or one bound per row [N, 1]).

    Sorting the whole vocabulary costs ~8 ms per token at V=49k on a CPU; the top 1024 suffice whenever their
    mass exceeds top_p in every row (everything ranked lower is then outside), else the full sort runs.
    """
    k = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # sorted, descending
    if k < probs.shape[-1] and not bool((top.sum(-1, keepdim=True) > top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    outside = top.cumsum(-1) - top > top_p  # keeps at least the top token
    return top.masked_fill(outside, 0.0), order
