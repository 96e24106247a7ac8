"""What crosses ranks besides gradients: a step's metrics, token counts and stop flags. Each is the plain value
outside torchrun."""

from __future__ import annotations

import torch
import torch.distributed as dist

from grpo.parallel.launch import DistEnv


def is_max_metric(key: str) -> bool:
    return key.endswith("_max") or key.startswith("memory/peak")


def reduce_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """A step's metrics over all ranks, in one collective: maxima (`*_max`, `memory/peak*`) take the largest
    rank's value, minima (`*_min`) the smallest, the rest the mean over ranks (each rank holds the same number of samples)."""
    if not env.enabled or not values:
        return values
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    rows = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(rows, local)
    table = torch.stack(rows)  # [world, keys]
    largest = torch.tensor([is_max_metric(k) for k in keys], device=table.device)
    smallest = torch.tensor([k.endswith("_min") for k in keys], device=table.device)
    reduced = torch.where(largest, table.amax(0), torch.where(smallest, table.amin(0), table.mean(0)))
    return dict(zip(keys, reduced.tolist()))


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


def first_text_over_ranks(text: str | None, env: DistEnv) -> str | None:
    """The lowest rank's text that is not None, on every rank: a decision that one rank's files can change
    (a damaged per-rank file on resume) is then taken by all ranks together."""
    if not env.enabled:
        return text
    texts: list[str | None] = [None] * env.world_size
    dist.all_gather_object(texts, text)
    return next((t for t in texts if t is not None), None)


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
