"""Sampling G completions per prompt with the KV cache.

Each prompt is encoded once (one prefill for the B distinct prompts), then its cache is repeated G times and
the B*G sequences decode together; decoding stops as soon as every sequence has produced an end token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from grpo.decode import STATIC_DECODE_MODEL_TYPES, StaticDecoder, StaticKVCache, static_decode_supported
from grpo.graph_decode import CUDAGraphDecoder, FixedShapeDecoder, graph_decode_supported
from grpo.logprobs import cache_argument
from grpo.packed_decode import PackedDecoder, packed_decode_supported


@dataclass
class Rollout:
    """N = prompts * G sequences, the G samples of a prompt contiguous. P prompt tokens, T completion tokens."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, T] padded with pad_id after the end token
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the end token
    truncated: torch.Tensor  # [N] bool: hit the length limit without an end token
    group_size: int = 1  # rows i and j share a prompt when i // group_size == j // group_size
    # [N, T] fp32: each sampled token's log-prob under the decoder's full softmax(logits / temperature), 0 at
    # padding; None for greedy decoding. Compared with the training forward's log-probs it measures how far
    # the fast decode path is from the policy being trained (rollout/mismatch_* metrics, rollout_is_cap).
    sampling_logps: torch.Tensor | None = None

    def prompt_groups(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct prompts of rows[start:stop], without all-padding columns, and each row's index into
        them: ids [U, P'], mask [U, P'], index [B]. Lets the log-prob passes run each prompt once."""
        g, device = self.group_size, self.prompt_ids.device
        first, last = rows.start // g, (rows.stop - 1) // g
        take = torch.arange(first, last + 1, device=device) * g  # [U] one row per distinct prompt
        index = torch.arange(rows.start, rows.stop, device=device) // g - first  # [B]
        ids, mask = self.prompt_ids[take], self.prompt_mask[take]
        start = int(mask.any(dim=0).long().argmax())  # left padding shared by all U prompts is skipped
        return ids[:, start:], mask[:, start:], index

    def rows(self, index: slice | torch.Tensor) -> Rollout:
        """Rows `index` (a slice, or an index tensor of whole groups) as a rollout of their own; a slice gives
        views, no copies. Every tensor field is per row, so each is indexed the same way."""
        if isinstance(index, slice) and (index.start % self.group_size or index.stop % self.group_size):
            raise ValueError(f"rows {index.start}:{index.stop} split a group of {self.group_size} samples.")
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v[index] for k, v in tensors.items() if isinstance(v, torch.Tensor)})

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum().item())


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)  # [B, P], [B, P]


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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    decode_impl: str = "auto",
    check_done_every: int | None = None,
) -> Rollout:
    """greedy=True takes the argmax token at every step (evaluation); the sampling settings are then unused.

    decode_impl: "graph" decodes with grpo.graph_decode (fixed shapes; a CUDA graph on GPU, eager on CPU),
    "packed" with grpo.packed_decode (CPU fp32: MKL-packed fused weights), "static" with grpo.decode
    (preallocated cache, the model's own layers), "hf" with the model's forward and a DynamicCache; "auto"
    takes graph on CUDA, packed on CPU, when the architecture allows, else static, else hf.

    check_done_every: how many tokens between checks that every sequence has ended. Each check waits for the
    device, which on a GPU stalls the queue of launched work, so CUDA checks every 8 tokens (tokens drawn after
    every row ended are all padding and are trimmed); CPU checks every token.
    """
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {', '.join(DECODE_IMPLS)}; got {decode_impl!r}")
    first = next(model.parameters())
    device = first.device
    if check_done_every is None:
        check_done_every = CUDA_CHECK_DONE_EVERY if device.type == "cuda" else 1
    was_training = model.training
    model.eval()  # no dropout (LoRA or otherwise) while sampling
    try:
        ids, mask = left_pad(prompts, pad_id, device)  # [B, P]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P] left padding must not shift positions
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        mask = mask.repeat_interleave(num_generations, dim=0)  # [N, P]
        capacity = ids.shape[1] + max_new_tokens
        decode = make_decoder(decode_impl, model, cache, num_generations, mask, capacity, first.dtype)
        logits = out.logits[:, -1].repeat_interleave(num_generations, dim=0)  # [N, V]
        ids = ids.repeat_interleave(num_generations, dim=0)
        next_pos = positions[:, -1].repeat_interleave(num_generations, dim=0) + 1  # [N]
        eos = torch.tensor(eos_ids, device=device)
        n = ids.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens, alive, logps = [], [], []
        for step in range(max_new_tokens):
            if greedy:
                tok = logits.argmax(dim=-1)  # [N]
            else:
                tok, logp = sample_next(  # [N], [N]
                    logits,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    min_p=min_p,
                    generator=generator,
                    return_logps=True,
                )
                logps.append(logp)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            alive.append(~done)
            tokens.append(tok)
            done = done | torch.isin(tok, eos)
            if step == max_new_tokens - 1 or ((step + 1) % check_done_every == 0 and bool(done.all())):
                break
            logits = decode(tok, next_pos)
            next_pos = next_pos + 1
        completion_mask = torch.stack(alive, dim=1).long()  # [N, T]
        width = int(completion_mask.any(dim=0).nonzero().max()) + 1  # drops steps taken after all rows ended
        completion = torch.stack(tokens[:width], dim=1)  # [N, T]
        completion_mask = completion_mask[:, :width]
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            completion_ids=completion,
            completion_mask=completion_mask,
            truncated=~done,
            group_size=num_generations,
            sampling_logps=(
                torch.stack(logps[:width], dim=1).masked_fill(completion_mask == 0, 0.0) if logps else None
            ),
        )
    finally:
        model.train(was_training)


DECODE_IMPLS = ("auto", "graph", "packed", "static", "hf")
PACK_MIN_NEW_TOKENS = 32
GRAPH_MIN_NEW_TOKENS = 8  # recording costs about two steps (a warm-up and the capture)
CUDA_CHECK_DONE_EVERY = 8


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
