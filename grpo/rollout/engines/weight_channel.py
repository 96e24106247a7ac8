"""The weights from the trainer to a rollout process (grpo/rollout/engines/rollout_process.py): a two-member
torch.distributed group of its own, gloo when the rollout runs on a CPU and NCCL on a GPU, in the same code.

The trainer is member 0 and broadcasts; the rollout process is member 1 and receives into its own parameters.
The group is built from a TCPStore on 127.0.0.1 and never touches the default group, so it works the same with
and without torchrun (each rank pairs with its own rollout process). Parameters travel in flat buckets of one
dtype: one collective per bucket instead of one per tensor. The trainer's send does not wait for the other end:
the buckets are a copy of the weights (the memory of one more copy of the trained parameters), and the
rollout process takes them when it reaches them in its queue.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 64 * 2**20  # large enough that the per-call cost vanishes


def open_store(*, port: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's end: port 0 picks a free one (read it back from store.port for the rollout process)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if port == 0:
        return dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
    return dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)


class WeightChannel:
    """One end of the pair group; `member` 0 sends, 1 receives."""

    def __init__(self, store: dist.TCPStore, *, member: int, device: torch.device, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.device, self.in_flight = device, deque()
        if device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(dist.PrefixStore("weights", store), member, 2)
        else:
            self.group = dist.ProcessGroupGloo(dist.PrefixStore("weights", store), member, 2, timeout)

    def send(self, tensors: Iterable[torch.Tensor], *, in_flight: int = 1) -> None:
        """Start sending the tensors (already in the receiver's dtype) and return: each bucket is a copy, so the
        trainer may update its weights at once; the other end takes them when it reaches them. At most
        `in_flight` sends are outstanding (async_level of them: the engine is that many batches behind); the
        oldest is waited for first."""
        while len(self.in_flight) >= in_flight:
            self._wait(self.in_flight.popleft())
        works = []
        for bucket in _buckets(list(tensors)):
            flat = _flatten_dense_tensors([t.detach().to(self.device) for t in bucket])
            works.append((self.group.broadcast([flat], _from_sender()), flat))
        self.in_flight.append(works)

    def sent(self) -> None:
        """Wait until the other end has taken everything sent (raises if it died or hung past the timeout)."""
        while self.in_flight:
            self._wait(self.in_flight.popleft())

    @staticmethod
    def _wait(works: list) -> None:
        for work, _ in works:
            work.wait()

    def receive(self, tensors: Iterable[torch.Tensor]) -> None:
        """The sender's tensors into `tensors`, in order: the same shapes and dtypes as it sent."""
        for bucket in _buckets(list(tensors)):
            flat = _flatten_dense_tensors(bucket)
            self.group.broadcast([flat], _from_sender()).wait()
            for t, received in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                t.data.copy_(received)


def _from_sender() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of one dtype, each at most BUCKET_BYTES (a larger tensor goes alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or out[-1][0].dtype != t.dtype or size + nbytes > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out
