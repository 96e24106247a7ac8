"""A reference model that follows the policy: TR-DPO's soft update (Gorbatovski et al., arXiv:2404.09656).

With `ref_model_sync_steps: N`, every N steps the KL reference moves towards the policy:

    reference <- alpha * policy + (1 - alpha) * reference        (alpha = ref_model_mixup_alpha)

so the KL term anchors the policy to a recent version of itself rather than to the starting model, which lets a
long run drift further while each step stays close to the last. alpha = 1 copies the policy (a hard update).

The update is parameter by parameter on whatever each rank holds: under FSDP both models are sharded the same
way, so each rank mixes its own shards and nothing is communicated. Buffers (rotary tables) are not trained and
stay as they are. A checkpoint stores the reference (reference.safetensors), since it no longer equals the
starting model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REFERENCE_FILE = "reference.safetensors"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP DTensor's shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def mix_into_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, in place, for every parameter of the policy."""
    ref_params = dict(reference.named_parameters())
    for name, p in policy.named_parameters():
        r = _local(ref_params[name])
        # lerp: r + alpha * (p - r); torch computes it from the nearer end, so alpha = 1 copies p exactly.
        r.lerp_(_local(p).to(r.dtype), alpha)


def sync_due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def save_reference(model: nn.Module, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
    """Write the reference's parameters (tied weights once) to folder/reference.safetensors. `state` is the
    full state dict FSDP gathered to rank 0 (None without FSDP)."""
    names = [n for n, _ in model.named_parameters()]  # named_parameters lists a tied weight once
    source = model.state_dict() if state is None else state
    tensors = {n: source[n].detach().to("cpu").contiguous() for n in names}
    save_file(tensors, str(Path(folder) / REFERENCE_FILE), metadata={"format": "pt"})


def load_reference(folder: Path) -> dict[str, torch.Tensor] | None:
    """The saved reference of a checkpoint, or None when it holds none (reference sync was off)."""
    path = Path(folder) / REFERENCE_FILE
    return load_file(str(path)) if path.is_file() else None
