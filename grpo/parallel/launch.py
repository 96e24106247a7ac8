"""torchrun's environment, this rank's device and process group, and a failure exit that never leaves the other
ranks hanging. A plain `python scripts/train.py` is world size 1 with no process group."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from grpo.config import TrainConfig
from grpo.errors import ConfigError
from grpo.run.cli_common import say_line


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
    if env.enabled and c.distributed_strategy == "fsdp" and torch_older_than(FSDP_MIN_TORCH):
        raise ConfigError(
            f"config.distributed_strategy = 'fsdp' needs torch {'.'.join(map(str, FSDP_MIN_TORCH))} or newer "
            f"(found {torch.__version__}): upgrade torch or use ddp."
        )


# FSDP2 as used here (fully_shard on CPU and GPU, explicit unshard for the rollout) first ran on torch 2.8; on
# 2.6 and 2.7 its CPU path fails (a CPU stream without record_event), see docs/requirements.md.
FSDP_MIN_TORCH = (2, 8)


def torch_older_than(version: tuple[int, int]) -> bool:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) < version


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
