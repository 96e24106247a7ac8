"""torchrun environment, process group, DDP / FSDP2 wrapping, reductions, rank-0 IO, failure exits.

A plain `python scripts/train.py` is world size 1 with no process group and no wrapping. Under torchrun (even
with one process) each process is a rank with one device: a process group starts (nccl on CUDA, gloo on CPU) and
the training forward (`CompletionLogprobs`) is wrapped by `distributed_strategy`:

- ddp:  every rank holds the full model; gradients are averaged over ranks in backward.
- fsdp: FSDP2 `fully_shard` per decoder layer, then the `CompletionLogprobs` root (embeddings, final norm, LM
        head); parameters, gradients and optimizer state are split over ranks. On GPU it computes in bf16 and
        reduces gradients in fp32 (`MixedPrecisionPolicy`). The KL reference model is sharded the same way.

Each rank owns whole groups (all G samples of its prompts), so only metrics and gradients cross ranks.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from grpo.cli_common import say_line
from grpo.config import ConfigError, TrainConfig


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    torchrun: bool = False  # launched by torchrun: a process group exists, even for one process
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    @property
    def enabled(self) -> bool:
        return self.torchrun


def read_env() -> DistEnv:
    """torchrun's variables, without starting anything."""
    e = os.environ
    world = int(e.get("WORLD_SIZE", 1))
    return DistEnv(
        rank=int(e.get("RANK", 0)),
        world_size=world,
        local_rank=int(e.get("LOCAL_RANK", 0)),
        local_world_size=int(e.get("LOCAL_WORLD_SIZE", world)),
        torchrun="RANK" in e and "WORLD_SIZE" in e and "MASTER_ADDR" in e,
    )


def check_settings(c: TrainConfig, env: DistEnv) -> None:
    """User mistakes about devices and processes: cheap, before the process group or any model."""
    if isinstance(c.gpu_ids, list) and len(c.gpu_ids) != env.local_world_size:
        n, p = len(c.gpu_ids), env.local_world_size
        raise ConfigError(
            f"config.gpu_ids = {c.gpu_ids} lists {n} GPU(s) but {p} process(es) run on this node: "
            f"start torchrun with --nproc_per_node={n} or list {p} GPU id(s)."
        )
    if env.enabled and c.distributed_strategy == "fsdp" and (c.use_lora or c.backend == "unsloth"):
        raise ConfigError(
            "config.distributed_strategy = 'fsdp' is not supported with LoRA adapters: use ddp "
            "(the base model is frozen, so only the small adapter gradients cross ranks)."
        )


def init_distributed(c: TrainConfig, device_type: str) -> DistEnv:
    """Check the settings, pin this rank's GPU (gpu_ids[local_rank], or local_rank), start the process group."""
    env = read_env()
    env.strategy = c.distributed_strategy
    check_settings(c, env)
    if device_type == "cuda":
        index = c.gpu_ids[env.local_rank] if isinstance(c.gpu_ids, list) else env.local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"config.gpu_ids: GPU {index} does not exist; this process sees "
                f"{torch.cuda.device_count()} GPU(s) (indices after CUDA_VISIBLE_DEVICES)."
            )
        torch.cuda.set_device(index)
    if env.enabled and not dist.is_initialized():
        # A rank stuck in a collective fails after this long instead of hanging forever.
        timeout = timedelta(seconds=float(os.environ.get("GRPO_DIST_TIMEOUT_S", 1800)))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
    return env


# ---------------------------------------------------------------- wrapping
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
    # The policy root keeps embeddings + head gathered from forward to backward (FSDP's default for a root);
    # the frozen reference has no backward, so it frees them right after forward.
    fully_shard(root, mp_policy=mp, reshard_after_forward=True if frozen else None)
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


# ---------------------------------------------------------------- reductions
def is_max_metric(key: str) -> bool:
    return key.endswith("_max") or key.startswith("memory/peak")


def reduce_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """A step's metrics over all ranks, in one collective: maxima (`*_max`, `memory/peak*`) take the largest
    rank's value, the rest the mean over ranks (each rank holds the same number of samples)."""
    if not env.enabled or not values:
        return values
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    rows = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(rows, local)
    table = torch.stack(rows)  # [world, keys]
    largest = torch.tensor([is_max_metric(k) for k in keys], device=table.device)
    return dict(zip(keys, torch.where(largest, table.amax(0), table.mean(0)).tolist()))


def sum_over_ranks(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.enabled:
        return x
    t = x.detach().to(_comm_device(), torch.float64)
    dist.all_reduce(t)
    return t.to(x.device, x.dtype)


def gather_over_ranks(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The 1-D tensors of all ranks, concatenated in rank order (their lengths may differ)."""
    if not env.enabled:
        return x
    device = _comm_device()
    size = torch.tensor([x.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(env.world_size)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=device)
    padded[: x.numel()] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(x.device)


def any_over_ranks(flag: bool, env: DistEnv) -> bool:
    """A stop requested on one rank (SIGTERM) stops all ranks after the same step."""
    if not env.enabled:
        return flag
    t = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- process exit
def run_rank(main: Callable[[], int]) -> int:
    """Run one rank's entry point so that a failure never leaves the other ranks hanging.

    A rank that fails (its own error, an uncaught exception, OOM) prints the error and leaves at once with
    os._exit: no interpreter shutdown that could block on a process group whose peers sit in a collective.
    torchrun sees the non-zero exit and stops the other ranks (SIGTERM, then SIGKILL). A rank that succeeds
    waits for the others, destroys the process group and leaves with os._exit(0) too. Outside torchrun this
    is just main().
    """
    env = read_env()
    if not env.enabled:
        return main()
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        say_line(f"error: rank {env.rank} failed:")
        traceback.print_exc()
        code = 1
    if code == 0:
        cleanup(env)
    # Leave without interpreter finalization, also on success: gloo's worker threads can still hold finished
    # work objects whose tensors they release after Python has begun tearing down, and a thread that needs the
    # GIL then aborts the process ("terminate called without an active exception"), rarely, but fatally for
    # torchrun, which reports the whole launch as failed. Everything this rank writes is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing the model
        dist.destroy_process_group()
