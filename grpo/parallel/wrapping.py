"""DDP / FSDP2 wrapping of the training forward and the KL reference, gradient sync per micro-batch, and the
full parameters or state dict of a sharded model (for the rollout and for saving). No-ops outside torchrun."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn

from grpo.parallel.launch import DistEnv


def wrap_models(
    policy: nn.Module,
    ref: nn.Module | None,
    env: DistEnv,
    *,
    device: torch.device,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, nn.Module | None]:
    """DDP around the policy (the reference stays a plain frozen copy per rank), or FSDP2 around both."""
    if not env.enabled:
        return policy, ref
    if env.fsdp:
        shard = partial(_shard, device=device, compute_dtype=compute_dtype)
        return shard(policy, frozen=False), None if ref is None else shard(ref, frozen=True)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(policy, device_ids=[device.index] if device.type == "cuda" else None), ref


def _shard(root: nn.Module, *, device: torch.device, compute_dtype: torch.dtype, frozen: bool) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Our [B, T] log-probs are a view; FSDP warns about in-place edits of views, which the pure loss never does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # Weights are gathered in the compute dtype (bf16-mixed: fp32 shards, bf16 compute); gradients are always
    # reduced in fp32, so a sum over many ranks keeps its precision.
    mp = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype != torch.float32
        else MixedPrecisionPolicy()
    )
    for layer in root.model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    # The policy root keeps embeddings + head gathered from forward to backward (what FSDP's default, None,
    # does for a root from torch 2.8; spelled out, it also runs on 2.6 and 2.7); the frozen reference has no
    # backward, so it frees them right after forward.
    fully_shard(root, mp_policy=mp, reshard_after_forward=frozen)
    # FSDP picks its root at the first forward: make it this module, not a layer called by the rollout.
    with torch.no_grad():
        one = torch.zeros((1, 1), dtype=torch.long, device=device)
        root(one, torch.ones_like(one), one, torch.ones_like(one))
    root.reshard()
    return root


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_params(root: nn.Module) -> Iterator[None]:
    """FSDP: all-gather every parameter once for a block that calls the bare HF model (the rollout).

    Sampling runs one small forward per token; gathering each layer per token would cost L all-gathers per token.
    Instead the whole model is gathered for the rollout (one unsharded copy per rank in the compute dtype, as
    with DDP) and resharded after it. Gradients and optimizer state stay sharded. No-op without FSDP.
    """
    modules = _fsdp_modules(root)
    if not modules:
        yield
        return
    layers = [m for m in modules if m is not root]
    for m in modules:
        m.unshard()
    for m in layers:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in layers:
            m.set_reshard_after_forward(True, recurse=False)
        for m in modules:
            m.reshard()


def grad_sync(policy: nn.Module, *, last: bool) -> Any:
    """DDP: all-reduce gradients only in the last micro-batch's backward. FSDP reduce-scatters every backward,
    which keeps the accumulated gradients sharded (skipping it would hold full unsharded gradients)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext()


def full_state_dict(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """FSDP: the full (unsharded) state dict on rank 0's CPU, {} elsewhere. Every rank must call it. None
    without FSDP (then model.state_dict() is already full)."""
    if not env.enabled or not _fsdp_modules(model.get_decoder()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
