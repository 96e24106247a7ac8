"""What a rollout is made of, and our sampling loop: `Rollout` (what every sampler returns), `SamplingSettings`
(what every sampler is asked for) and `generate`, G completions per prompt with the KV cache.

Each prompt is encoded once (one prefill for the B distinct prompts), then its cache is repeated G times and
the B*G sequences decode together; decoding stops as soon as every sequence has produced an end token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from grpo.rollout.decoding.decoders import DECODE_IMPLS, make_decoder
from grpo.rollout.decoding.sampling import sample_next

if TYPE_CHECKING:
    from grpo.config import TrainConfig


@dataclass(frozen=True)
class SamplingSettings:
    """How to draw each completion, the same for every sampler. The random stream is not in here: it is the
    run's `torch.Generator`, passed per call, so a run's draws continue across steps and resume exactly."""

    max_new_tokens: int
    end_ids: tuple[int, ...]  # a completion ends with the first of these; () runs every one to the limit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    greedy: bool = False  # the argmax token at every step (evaluation); the four filters are then unused

    @classmethod
    def from_config(cls, c: TrainConfig, end_ids: list[int] | tuple[int, ...]) -> SamplingSettings:
        """A training rollout's settings: the template's filters and completion length."""
        return cls(max_new_tokens=c.maximum_completion_length, end_ids=tuple(end_ids), **c.sampling())


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
    # [N, T] 1 where the model sampled the token, 0 at tool results, observations and the chat template's role
    # headers between turns (grpo/rollout/turns/multi_turn.py); None: a single reply, every completion token
    # is the model's. The sequence keeps the other tokens for the log-probs; the loss trains only `trained_mask`.
    model_written: torch.Tensor | None = None
    conversations: list[Any] | None = (
        None  # per row, a multi-turn rollout's Conversation (messages, tool calls)
    )

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
        out = replace(self, **{k: v[index] for k, v in tensors.items() if isinstance(v, torch.Tensor)})
        if self.conversations is not None:
            picked = range(len(self.conversations))[index] if isinstance(index, slice) else index.tolist()
            out.conversations = [self.conversations[i] for i in picked]
        return out

    def to(self, device: torch.device) -> Rollout:
        """The same rollout with every tensor on `device` (a rollout process sends its rollouts on the CPU)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)})

    @property
    def trained_mask(self) -> torch.Tensor:
        """[N, T] the completion tokens the model wrote: what the loss, its normalisers and the token metrics
        count."""
        if self.model_written is None:
            return self.completion_mask
        return self.completion_mask * self.model_written

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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    settings: SamplingSettings,
    *,
    num_generations: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    decode_impl: str = "auto",
    check_done_every: int | None = None,
) -> Rollout:
    """G samples of each prompt under `settings`, decoded by `model` (TorchSampler's implementation).

    decode_impl: "graph" decodes with grpo/rollout/decoding/graph_decode.py (fixed shapes; a CUDA graph on
    GPU, eager on CPU), "packed" with decoding/packed_decode.py (CPU fp32: MKL-packed fused weights), "static"
    with decoding/static_decode.py (preallocated cache, the model's own layers), "hf" with the model's forward
    and a DynamicCache (decoding/decoders.py); "auto" takes graph on CUDA, packed on CPU, when the architecture
    allows, else static, else hf.

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
        capacity = ids.shape[1] + settings.max_new_tokens
        decode = make_decoder(decode_impl, model, cache, num_generations, mask, capacity, first.dtype)
        logits = out.logits[:, -1].repeat_interleave(num_generations, dim=0)  # [N, V]
        ids = ids.repeat_interleave(num_generations, dim=0)
        next_pos = positions[:, -1].repeat_interleave(num_generations, dim=0) + 1  # [N]
        eos = torch.tensor(settings.end_ids, device=device)
        n = ids.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens, alive, logps = [], [], []
        for step in range(settings.max_new_tokens):
            if settings.greedy:
                tok = logits.argmax(dim=-1)  # [N]
            else:
                tok, logp = sample_next(  # [N], [N]
                    logits,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    top_k=settings.top_k,
                    min_p=settings.min_p,
                    generator=generator,
                    return_logps=True,
                )
                logps.append(logp)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            alive.append(~done)
            tokens.append(tok)
            done = done | torch.isin(tok, eos)
            if step == settings.max_new_tokens - 1 or (
                (step + 1) % check_done_every == 0 and bool(done.all())
            ):
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


CUDA_CHECK_DONE_EVERY = 8
