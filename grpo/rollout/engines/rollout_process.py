"""Our decoder in a process of its own (`rollout_process`), holding its own copy of the weights.

The trainer starts it with torch.multiprocessing (spawn), one per rank under torchrun, and talks to it over two
channels: a pipe that carries the requests and the rollouts in order, and a two-member torch.distributed group
(grpo/rollout/engines/weight_channel.py) that carries the weights after every step. The process answers the
requests strictly in the order they were sent, so a weight update sent after a batch request never overtakes
it: which weights draw which batch is fixed by the order of the calls, never by timing
(grpo/rollout/pipeline.py builds the asynchronous schedule on that).

Faults end the run with one line (EngineError), never a hang: a process that dies, raises (out of memory, say)
or stays silent past `rollout_timeout` seconds is reported with its pid and what it was doing.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from grpo.errors import EngineError
from grpo.rollout.engines.weight_channel import WeightChannel, open_store
from grpo.rollout.generate import Rollout, SamplingSettings

FAULT = "GRPO_TEST_ROLLOUT_FAULT"  # tests: kill:N, hang:N or oom:N, at the process's N-th batch
DELAY = "GRPO_TEST_ROLLOUT_DELAY_S"  # tests: seconds the process sleeps before each batch
STARTUP_S = (
    600.0  # the start (imports, loading the model) may take this long even with a short rollout_timeout
)


@dataclass(frozen=True)
class ProcessSpec:
    """What the rollout process needs to build its copy of the policy and to join the weight channel."""

    template: Any  # grpo.config.Template
    device: str
    dtype: torch.dtype
    seed: int
    pad_id: int
    port: int
    cpus: tuple[int, ...]
    timeout_s: float


def rollout_device(c: Any, device: torch.device) -> torch.device:
    """config.rollout_device, or the trainer's own device."""
    return torch.device(c.rollout_device) if c.rollout_device else device


def share_cpus(rollout_cpus: list[int]) -> tuple[int, ...]:
    """The cores of a rollout process on the CPU: `rollout_cpus`, or else the second half of the cores this
    process may use. The trainer keeps the others, one thread each: two processes that each spread their
    threads over every core slow each other down several times over (measured: a 10 s update took 41 s)."""
    mine = sorted(os.sched_getaffinity(0))
    engine = [i for i in rollout_cpus] or mine[len(mine) // 2 :]
    trainer = [i for i in mine if i not in engine] or mine
    os.sched_setaffinity(0, trainer)
    torch.set_num_threads(len(trainer))
    return tuple(engine)


class RolloutProcess:
    """The trainer's end: `submit` batches, take their rollouts back with `result` in the same order, `push`
    the weights; requests and pushes are served in the order they were made."""

    def __init__(self, template: Any, *, device: torch.device, dtype: torch.dtype, pad_id: int, rank: int):
        c = template.config
        self.timeout, self.level = c.rollout_timeout, max(1, c.async_level)
        target = rollout_device(c, device)
        store = open_store(port=0, timeout_s=self.timeout)
        context = multiprocessing.get_context("spawn")  # plain pickles: tensors travel as bytes (_pack)
        self.conn, child_end = context.Pipe()
        spec = ProcessSpec(
            template, str(target), dtype, c.seed + 1000 * rank, pad_id, store.port,
            share_cpus(c.rollout_cpus) if target.type == "cpu" else (),
            self.timeout,
        )  # fmt: skip
        self.process = context.Process(target=serve, args=(spec, child_end), name=f"grpo-rollout-{rank}")
        self.process.daemon = True  # never outlives the trainer
        # what the process has been asked and not yet answered, oldest first: the first is what it is doing
        self.queue, self.batches = deque(["loading its copy of the model"]), 0
        self.waited = self.timeout  # how long the last unanswered request was waited for
        self.process.start()
        child_end.close()
        self.startup_s = self._answer("ready", wait=max(self.timeout, STARTUP_S))[1]
        local = device if target.type == "cuda" else torch.device("cpu")
        self.channel = WeightChannel(store, member=0, device=local, timeout_s=self.timeout)
        self.store, self.dtype = store, dtype  # the store's server lives as long as this object

    def submit(self, prompts: list[list[int]], settings: SamplingSettings, *, num_generations: int) -> None:
        self.batches += 1
        self._send(("sample", prompts, settings, num_generations), f"drawing its batch {self.batches}")

    def result(self, device: torch.device) -> tuple[Rollout, int, dict[str, float]]:
        """The oldest batch not yet taken: (its rollout on `device`, the version that drew it, the process's
        busy and idle seconds since the batch before)."""
        _, ro, version, times = self._answer("rollout")
        return _unpack(ro).to(device), version, times

    def push(self, model: torch.nn.Module, *, version: int, everything: bool = False) -> None:
        """Once the batches asked for so far are drawn: the weights of step `version` (only the trained
        parameters, unless `everything`; a frozen LoRA base never changes)."""
        named = [(n, p) for n, p in model.named_parameters() if everything or p.requires_grad]
        self._send(("weights", version, [n for n, _ in named]), f"taking the weights of step {version}")
        try:
            self.channel.send((p.detach().to(self.dtype) for _, p in named), in_flight=self.level)
        except RuntimeError:  # an earlier send never arrived; gloo's own error says little
            self._fail()

    def generator_state(self) -> torch.Tensor:
        """The random stream's state after the batches drawn so far (for a checkpoint)."""
        self._send(("generator", None), "reporting its random state")
        state = _unpack(self._answer("generator")[1])
        try:
            self.channel.sent()  # taken before it answered: only the bookkeeping is left
        except RuntimeError:
            self._fail()
        return state

    def set_generator_state(self, state: torch.Tensor) -> None:
        self._send(("generator", _pack(state)), "setting its random state")
        self.queue.pop()  # it does not answer

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)

    # -- faults
    def _send(self, message: tuple, doing: str) -> None:
        self.queue.append(doing)
        try:
            self.conn.send(message)
        except OSError:
            self._fail()

    def _answer(self, kind: str, *, wait: float | None = None) -> tuple:
        wait = self.timeout if wait is None else wait
        deadline = time.monotonic() + wait
        while not self.conn.poll(0.2):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.waited = wait
                self._fail()
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self._fail()
        self._refuse_error(message)
        while not self.queue.popleft().startswith(_ANSWERS[kind]):
            pass  # the weight updates before it were taken, or it could not have answered
        return message

    def _refuse_error(self, message: tuple) -> None:
        if message[0] == "error":
            raise EngineError(
                f"The rollout process failed while {message[1]}; the run stops, and the checkpoints saved so far "
                "are kept."
            )

    def _fail(self) -> None:
        """Why the process stopped answering, as one line: the error it sent, its end, or the timeout; and
        what it was doing, the oldest request it had not answered."""
        self.process.join(timeout=1)
        try:
            while self.conn.poll(0):  # it may have said why before it ended
                self._refuse_error(self.conn.recv())
        except (EOFError, OSError):
            pass
        code, pid = self.process.exitcode, self.process.pid
        doing = self.queue[0] if self.queue else "waiting for a request"
        if code is None:  # alive, and silent past the timeout: a hang
            self.process.kill()
            raise EngineError(
                f"The rollout process (pid {pid}) gave no answer in {self.waited:g} s (config.rollout_timeout) "
                f"while {doing}; it was killed, the run stops, and the checkpoints saved so far are kept."
            )
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise EngineError(
            f"The rollout process (pid {pid}) {how} while {doing}; the run stops, and the checkpoints saved so "
            "far are kept."
        )


_ANSWERS = {"ready": "loading", "rollout": "drawing", "generator": "reporting"}


# ---------------------------------------------------------------- the process itself
def serve(spec: ProcessSpec, conn: Any) -> None:
    """The rollout process's main loop: build the policy, then answer requests in order until told to stop
    or until the trainer's end of the pipe closes."""
    doing = ["loading its copy of the model"]  # what it was at, for the one line a failure sends back
    try:
        _serve(spec, conn, doing)
    except (EOFError, KeyboardInterrupt):
        pass  # the trainer is gone or stopping: nothing to report to
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the trainer as one line
        text = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        try:
            conn.send(("error", f"{doing[0]}: {text}"))
        except OSError:
            pass


def _serve(spec: ProcessSpec, conn: Any, doing: list[str]) -> None:
    from grpo.model.build import load_policy
    from grpo.model.precision import Precision
    from grpo.rollout.decoding.torch_sampler import TorchSampler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle: it stops us
    _quiet_progress_bars()
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
        torch.set_num_threads(len(spec.cpus))
    t0, device = time.perf_counter(), torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = load_policy(spec.template, device, Precision(spec.dtype, spec.dtype)).requires_grad_(False)
    c = spec.template.config
    sampler = TorchSampler(model, pad_id=spec.pad_id, decode_impl=c.decode_impl)
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    conn.send(("ready", time.perf_counter() - t0))
    channel = WeightChannel(open_store(port=spec.port, timeout_s=spec.timeout_s), member=1, device=device,
                            timeout_s=spec.timeout_s)  # fmt: skip
    params, batches, idle, free_since = dict(model.named_parameters()), 0, 0.0, time.perf_counter()
    while True:
        message = conn.recv()
        idle += time.perf_counter() - free_since
        kind, t1 = message[0], time.perf_counter()
        if kind == "stop":
            return
        if kind == "sample":
            batches += 1
            doing[0] = f"drawing its batch {batches}"
            _test_fault(batches)
            _, prompts, settings, g = message
            ro = sampler.sample(
                prompts, settings, num_generations=g, generator=generator, version=sampler.version
            )
            busy = time.perf_counter() - t1
            conn.send(
                (
                    "rollout",
                    _pack(ro.to(torch.device("cpu"))),
                    sampler.version,
                    {"busy_s": busy, "idle_s": idle},
                )
            )
            idle = 0.0
        elif kind == "weights":
            _, version, names = message
            doing[0] = f"taking the weights of step {version}"
            channel.receive(params[n] for n in names)
            sampler.update_weights(model, version=version)
        elif message[1] is None:
            conn.send(("generator", _pack(generator.get_state())))
        else:
            generator.set_state(_unpack(message[1]))
        free_since = time.perf_counter()


def _quiet_progress_bars() -> None:
    """No loading bars from this process (the trainer draws its own), and a thread lock for tqdm: its default
    is a multiprocessing semaphore, which a killed process would leave behind."""
    import threading

    import transformers
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    transformers.utils.logging.disable_progress_bar()


def _pack(value: Any) -> bytes:
    """Tensors as bytes over the pipe, not as shared memory: nothing is left behind by a process that dies."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _test_fault(batch: int) -> None:
    """Tests make the process slow (DELAY) or fail at one batch (FAULT): a real SIGKILL, a real hang, a real
    allocation failure under a lowered address-space limit."""
    time.sleep(float(os.environ.get(DELAY, "0")))
    kind, _, at = os.environ.get(FAULT, "").partition(":")
    if not kind or int(at) != batch:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "oom":
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        torch.empty(2**34, dtype=torch.uint8)  # 16 GiB under a 1 GiB limit
