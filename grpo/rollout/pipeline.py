"""Asynchronous rollouts (`async_level` k, docs/async.md): the engine draws the batches of the next k steps
while the trainer learns from the current one.

The schedule is fixed by the order of the calls, never by timing. Before step t trains, the batches of steps
t .. t + k have been asked for; after step t's updates the new weights (version t + 1) are pushed behind every
request made so far. The engine serves requests and pushes in order, so the batch of step t is drawn by the
weights of step max(0, t - k), exactly: a run is reproducible, its staleness is k at most (checked on every
batch, never trained on past it), and the trainer waits for a slow engine instead of dropping its batches.

Two engines run the schedule: our decoder in a rollout process (grpo/rollout/engines/rollout_process.py), and any
in-process sampler on a thread of its own (`SamplerThread`: the vLLM server, whose requests then go out while
the trainer updates). A checkpoint holds the batches drawn but not yet trained on, and the engine's random
state after them, so a resumed run trains on exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from grpo.data import Prompt, PromptSampler
from grpo.rollout.generate import Rollout, SamplingSettings
from grpo.rollout.sampler import Sampler


class Worker(Protocol):
    """Who runs the schedule: requests and pushes are served in the order they are made."""

    def submit(
        self, prompts: list[list[int]], settings: SamplingSettings, *, num_generations: int
    ) -> None: ...

    def result(self, device: torch.device) -> tuple[Rollout, int, dict[str, float]]: ...

    def push(self, model: torch.nn.Module, *, version: int) -> None: ...

    def generator_state(self) -> torch.Tensor | None: ...

    def set_generator_state(self, state: torch.Tensor) -> None: ...

    def close(self) -> None: ...


@dataclass
class Drawn:
    """One step's batch: its prompt indices, and once drawn its rollout and the version that drew it."""

    batch: list[int]
    rollout: Rollout | None = None
    version: int = -1


class RolloutPipeline:
    def __init__(
        self,
        worker: Worker,
        *,
        level: int,
        order: PromptSampler,
        prompts: list[Prompt],
        settings: SamplingSettings,
        num_generations: int,
        device: torch.device,
        total_steps: int,
        restored: dict[str, Any] | None = None,
    ):
        self.worker, self.level, self.order, self.prompts = worker, level, order, prompts
        self.total_steps = total_steps  # nothing is asked for past the run's last step
        self.settings, self.g, self.device = settings, num_generations, device
        self.queue: deque[Drawn] = deque()
        self.push_s = 0.0
        if restored is not None:  # a resumed run: the batches the checkpoint drew ahead, then its stream
            self.queue.extend(
                Drawn(d["batch"], d["rollout"].to(device), d["version"]) for d in restored["drawn"]
            )
            if restored["generator"] is not None:
                worker.set_generator_state(restored["generator"])

    def take(self, step: int) -> tuple[list[int], Rollout, dict[str, float]]:
        """The batch of step `step` (waiting for it if need be) and the pipeline's metrics for the step."""
        # ask for the batches of steps step .. step + level
        while len(self.queue) <= self.level and step + len(self.queue) < self.total_steps:
            batch = self.order.next_batch()
            self.worker.submit([self.prompts[i].ids for i in batch], self.settings, num_generations=self.g)
            self.queue.append(Drawn(batch))
        t0, drawn = time.perf_counter(), self.queue.popleft()
        times = {"busy_s": 0.0, "idle_s": 0.0}
        if drawn.rollout is None:
            drawn.rollout, drawn.version, times = self.worker.result(self.device)
        lag = step - drawn.version
        if not 0 <= lag <= self.level:  # the schedule makes this impossible; never train on such a batch
            raise RuntimeError(
                f"The batch for step {step} was drawn by the weights of step {drawn.version}, more than "
                f"async_level = {self.level} steps behind; it is not trained on."
            )
        metrics = {
            "async/staleness": float(lag),
            "time/rollout_wait_s": time.perf_counter() - t0,
            "time/engine_busy_s": times["busy_s"],
            "time/engine_idle_s": times["idle_s"],
            "time/push_s": self.push_s,
        }
        return drawn.batch, drawn.rollout, metrics

    def push(self, model: torch.nn.Module, evaluation: Sampler, *, version: int) -> None:
        """After step `version` - 1's updates: the new weights to the engine, and to the sampler evaluations
        use when that is another one."""
        t0 = time.perf_counter()
        if version < self.total_steps:  # after the last step no batch is left to draw
            self.worker.push(model, version=version)
        self.push_s = time.perf_counter() - t0
        if getattr(self.worker, "sampler", None) is not evaluation:
            evaluation.update_weights(model, version=version)

    def checkpoint_state(self) -> dict[str, Any]:
        """The batches drawn ahead (each waited for) and the engine's random state after them."""
        for drawn in self.queue:
            if drawn.rollout is None:
                drawn.rollout, drawn.version, _ = self.worker.result(self.device)
        cpu = torch.device("cpu")
        return {
            "drawn": [
                {"batch": d.batch, "rollout": d.rollout.to(cpu), "version": d.version} for d in self.queue
            ],
            "generator": self.worker.generator_state(),
        }

    def close(self) -> None:
        self.worker.close()


class SamplerThread:
    """An in-process sampler run on a thread of its own (the vLLM server: its requests go out while the trainer
    updates). A push waits until every batch asked for is drawn, then updates the sampler's weights; the random
    stream is the run's own generator, which the checkpoint's RNG file already holds."""

    def __init__(self, sampler: Sampler, generator: torch.Generator):
        self.sampler, self.generator = sampler, generator
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-rollout")
        self.pending: deque[Any] = deque()
        self.free_since = time.perf_counter()

    def submit(self, prompts: list[list[int]], settings: SamplingSettings, *, num_generations: int) -> None:
        self.pending.append(self.pool.submit(self._draw, prompts, settings, num_generations))

    def _draw(
        self, prompts: list[list[int]], settings: SamplingSettings, g: int
    ) -> tuple[Rollout, int, dict]:
        t0 = time.perf_counter()
        version = self.sampler.version
        ro = self.sampler.sample(
            prompts, settings, num_generations=g, generator=self.generator, version=version
        )
        self.free_since, idle = time.perf_counter(), max(0.0, t0 - self.free_since)
        return ro, version, {"busy_s": self.free_since - t0, "idle_s": idle}

    def result(self, device: torch.device) -> tuple[Rollout, int, dict[str, float]]:
        ro, version, times = self.pending.popleft().result()
        return ro.to(device), version, times

    def push(self, model: torch.nn.Module, *, version: int) -> None:
        for future in self.pending:
            future.result()  # every batch asked for is drawn; a failed draw raises here, before the weights move
        self.sampler.update_weights(model, version=version)
        self.free_since = time.perf_counter()

    def generator_state(self) -> None:
        return None

    def set_generator_state(self, state: torch.Tensor) -> None:
        raise AssertionError("the run's generator is restored with the other RNG states")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def start_pipeline(
    template: Any,
    *,
    model: torch.nn.Module,
    sampler: Sampler,
    generator: torch.Generator,
    version: int,
    rank: int,
    pad_id: int,
    dtype: torch.dtype,
    restored: dict[str, Any] | None,
    **parts: Any,  # order, prompts, settings, num_generations, device, total_steps: RolloutPipeline's
) -> RolloutPipeline | None:
    """The pipeline the config asks for, its engine holding `model`'s weights as those of step `version`; None
    for the synchronous loop in one process."""
    c = template.config
    if not c.runs_rollout_process():
        if c.async_level == 0:
            return None
        return RolloutPipeline(
            SamplerThread(sampler, generator), level=c.async_level, restored=restored, **parts
        )
    from grpo.rollout.engines.rollout_process import RolloutProcess

    worker = RolloutProcess(template, device=parts["device"], dtype=dtype, pad_id=pad_id, rank=rank)
    try:
        worker.push(model, version=version, everything=True)  # the weights this run starts (or resumes) from
        return RolloutPipeline(worker, level=c.async_level, restored=restored, **parts)
    except BaseException:
        worker.close()
        raise
