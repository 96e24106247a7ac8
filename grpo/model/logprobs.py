"""Per-token log-probs of the sampled completion tokens, without building [B, T, V] log-softmax in fp32.

`CompletionLogprobs` is an nn.Module so that DDP/FSDP can wrap it as the root of the training forward. The LM
head + log-softmax go through kernels/ in chunks. Two ways to run the decoder:

- shared prefix (`prompt_index` given): each distinct prompt runs once, its key/value cache is gathered to the
  G completions that share it, and only the completion tokens run G times. Gradients flow back through the
  gathered cache into the single prompt pass, so the result equals the concatenated pass (to rounding) at
  about (P + G*T) / (G*(P + T)) of the token work.
- concatenated (`prompt_index` None): one decoder pass over prompt + completion per row.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
from torch import nn

from grpo_kernels.dispatch import token_logprobs


class CompletionLogprobs(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        impl: str = "auto",
        autocast: torch.dtype | None = None,
        fp32_head: bool = False,
    ):
        super().__init__()
        self.model = model  # a transformers CausalLM (possibly with LoRA layers injected in place)
        self.temperature = temperature
        self.impl = impl
        self.autocast = autocast  # compute dtype over fp32 weights (bf16-mixed), None: the weights' own
        self.fp32_head = fp32_head  # the LM head from fp32 hidden states and weights (cast_lm_head_to_fp32)

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
        prompt_index: torch.Tensor | None = None,
        return_entropy: bool = False,
        entropy_grad: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Returns [B, T] fp32 log-probs of completion_ids under softmax(logits / temperature), 0 at padding,
        and with `return_entropy` also the [B, T] entropy of that distribution at each token (0 at padding; a
        constant without gradient unless `entropy_grad`, for an entropy bonus in the loss).

        prompt_ids/prompt_mask: [U, P] left-padded; completion_ids/completion_mask: [B, T];
        prompt_index: [B], the prompt row of each completion (None: U == B, row i goes with prompt i).
        """
        context = (
            nullcontext()
            if self.autocast is None
            else torch.autocast(prompt_ids.device.type, dtype=self.autocast)
        )
        with context:
            width = int(completion_mask.sum(-1).max())  # trailing all-padding columns need no compute
            if prompt_index is not None:
                # The shared-prefix pass always makes its second decoder call, which needs 2 columns: under FSDP
                # each call gathers the weights on every rank, so a rank that skipped it would hang the others.
                width = max(width, 2)
            ids, mask = completion_ids[:, :width], completion_mask[:, :width]
            if ids.shape[1] < width:  # a 1-column rollout: one padding column more
                ids, mask = (nn.functional.pad(x, (0, width - x.shape[1])) for x in (ids, mask))
            if prompt_index is None:
                h = self._concatenated_hidden(prompt_ids, prompt_mask, ids, mask)
            else:
                h = self._shared_prefix_hidden(prompt_ids, prompt_mask, ids, mask, prompt_index)
            head = self.model.get_output_embeddings()
            weight, bias = head.weight, getattr(head, "bias", None)
            head_context = nullcontext()
            if self.fp32_head:  # ScaleRL (arXiv:2510.13786): no bf16 rounding in the logits or their softmax
                h, weight = h.float(), weight.float()
                bias = None if bias is None else bias.float()
                head_context = torch.autocast(prompt_ids.device.type, enabled=False)
            with head_context:
                out = token_logprobs(
                    h.reshape(-1, h.shape[-1]),
                    weight,
                    ids.reshape(-1),
                    bias=bias,
                    temperature=self.temperature,
                    impl=self.impl,
                    return_entropy=return_entropy,
                    detach_entropy=not entropy_grad,
                )
            per_token = out if return_entropy else (out,)
            t = completion_ids.shape[1]
            # padding carries no value and no gradient; trailing columns come back as zeros: [B, T] each
            padded = [
                nn.functional.pad(
                    x.view(ids.shape).masked_fill(mask == 0, 0.0)[:, :t], (0, max(t - width, 0))
                )
                for x in per_token
            ]
            return tuple(padded) if return_entropy else padded[0]

    def _concatenated_hidden(self, prompt_ids, prompt_mask, ids, mask) -> torch.Tensor:
        full_mask = torch.cat([prompt_mask, mask], dim=1)  # [B, P+T]
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        hidden = self.model.get_decoder()(
            input_ids=torch.cat([prompt_ids, ids], dim=1),
            attention_mask=full_mask,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state  # [B, P+T, H]
        p, t = prompt_ids.shape[1], ids.shape[1]
        return hidden[:, p - 1 : p + t - 1]  # [B, T, H]: position i predicts token i + 1

    def _shared_prefix_hidden(self, prompt_ids, prompt_mask, ids, mask, prompt_index) -> torch.Tensor:
        decoder = self.model.get_decoder()
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
        out = decoder(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.reorder_cache(prompt_index)  # [U, ...] -> [B, ...], a differentiable gather
        first = out.last_hidden_state[:, -1][prompt_index]  # [B, H]: predicts completion token 0
        start = positions[:, -1][prompt_index, None] + 1  # [B, 1]
        steps = torch.arange(ids.shape[1] - 1, device=ids.device)
        rest = decoder(
            input_ids=ids[:, :-1],  # token t predicts token t + 1; the last token predicts nothing
            attention_mask=torch.cat([prompt_mask[prompt_index], mask[:, :-1]], dim=1),
            position_ids=start + steps,
            use_cache=True,
            **{cache_argument(decoder): cache},
        ).last_hidden_state  # [B, T-1, H]
        return torch.cat([first[:, None], rest], dim=1)  # [B, T, H]


def cache_argument(module: nn.Module) -> str:
    """transformers 5.x renamed past_key_values to cache; pass whichever this forward takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
