"""Per-token log-probs of the sampled completion tokens, without building [B, T, V] log-softmax in fp32.

`CompletionLogprobs` is an nn.Module so that DDP/FSDP can wrap it as the root of the training forward: the
decoder runs once over prompt + completion, and the LM head + log-softmax go through kernels/ in chunks.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import token_logprobs


class CompletionLogprobs(nn.Module):
    def __init__(self, model: nn.Module, *, temperature: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.model = model  # a transformers CausalLM (possibly with LoRA layers injected in place)
        self.temperature = temperature
        self.impl = impl

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Returns [B, T] fp32 log-probs of completion_ids under softmax(logits / temperature)."""
        ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
        mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        decoder = self.model.get_decoder()
        hidden = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # [B, P+T, H]
        p, t = prompt_ids.shape[1], completion_ids.shape[1]
        h = hidden[:, p - 1 : p + t - 1]  # [B, T, H]: position i predicts token i + 1
        head = self.model.get_output_embeddings()
        logps = token_logprobs(
            h.reshape(-1, h.shape[-1]),
            head.weight,
            completion_ids.reshape(-1),
            bias=getattr(head, "bias", None),
            temperature=self.temperature,
            impl=self.impl,
        )
        return logps.view(completion_ids.shape)  # [B, T]
