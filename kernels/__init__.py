"""Memory-lean per-token log-probs of chosen tokens from last hidden states and the LM head weight."""

from kernels.dispatch import available_impls, token_logprobs

__all__ = ["available_impls", "token_logprobs"]
