"""How grpo/rollout/decoding/graph_decode.py records its CUDA graph: torch.cuda.graph's steps without its per-capture
empty_cache.

On CPU only the order of the CUDA calls can be checked (with stand-ins that log them); the tests marked for CUDA
run the real capture on a GPU (scripts/gpu_checks.sh `tests`).
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from grpo.rollout.decoding import graph_decode
from grpo.rollout.decoding.decoders import HFDecoder
from grpo.rollout.decoding.graph_decode import CUDAGraphDecoder
from grpo.rollout.decoding.static_decode import StaticKVCache
from grpo.rollout.generate import SamplingSettings, generate
from tests.test_decode import fixed_shape_on_stale_memory, prefill, tiny

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


class Stream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: Stream) -> None:
        self.log.append(("wait", self.name, other.name))


class Graph:
    def __init__(self, number: int, log: list, current):
        self.number, self.log, self.current = number, log, current

    def capture_begin(self, pool=None, capture_error_mode="global"):
        self.log.append(("capture_begin", self.number, pool, capture_error_mode, self.current().name))

    def capture_end(self):
        self.log.append(("capture_end", self.number, self.current().name))

    def pool(self):
        return ("pool of graph", self.number)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls replaced by stand-ins that log each call; the clean-up that
    torch.cuda.graph does (empty_cache, gc.collect) raises."""
    log: list = []
    main = Stream("main", log)
    state = {"current": main, "streams": 0, "graphs": 0}

    def new_stream():
        state["streams"] += 1
        return Stream(f"side{state['streams']}", log)

    def new_graph():
        state["graphs"] += 1
        return Graph(state["graphs"], log, lambda: state["current"])

    @contextlib.contextmanager
    def stream(s):
        before, state["current"] = state["current"], s
        log.append(("enter", s.name))
        try:
            yield
        finally:
            log.append(("exit", s.name))
            state["current"] = before

    def forbidden(*_):
        raise AssertionError("the capture must not free the allocator's cache or collect garbage")

    monkeypatch.setattr(graph_decode, "_CAPTURE_STREAMS", {})
    monkeypatch.setattr(graph_decode, "_LAST_GRAPHS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *_: state["current"])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: log.append(("synchronize",)))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)
    monkeypatch.setattr(gc, "collect", forbidden)
    return log, state


class Step:
    """FixedShapeDecoder's interface: a step, the column it advances and the column it starts from."""

    def __init__(self, log: list, state: dict, fail_call: int = 0):
        self.log, self.state, self.fail_call, self.calls = log, state, fail_call, 0
        self.start, self.column = 5, torch.full((1,), 5)

    def step(self) -> torch.Tensor:
        self.calls += 1
        self.log.append(("step", self.state["current"].name, self.column.item()))
        if self.calls == self.fail_call:
            raise RuntimeError("the step failed")
        self.column.add_(1)
        return torch.ones(2)


def test_capture_runs_torch_cuda_graphs_steps_without_its_clean_up(fake_cuda):
    log, state = fake_cuda
    first = CUDAGraphDecoder(Step(log, state))
    assert log == [
        ("wait", "side1", "main"),  # warm-up on the side stream, after the work queued before it
        ("enter", "side1"),
        ("step", "side1", 5),
        ("exit", "side1"),
        ("wait", "main", "side1"),
        ("synchronize",),  # as torch.cuda.graph, but no empty_cache or gc.collect (the stand-ins would raise)
        ("wait", "side1", "main"),
        ("enter", "side1"),
        ("capture_begin", 1, None, "global", "side1"),  # torch.cuda.graph's defaults: a new pool, "global"
        ("step", "side1", 5),  # the column the warm-up advanced is back at the start
        ("capture_end", 1, "side1"),
        ("exit", "side1"),
        ("wait", "main", "side1"),
    ]
    assert torch.equal(first.logits, torch.ones(2))

    log.clear()
    second = CUDAGraphDecoder(Step(log, state))
    begins = [e for e in log if e[0] == "capture_begin"]
    # The same stream, and the first graph's pool:
    assert begins == [("capture_begin", 2, ("pool of graph", 1), "global", "side1")]
    assert {e[1] for e in log if e[0] in ("enter", "exit")} == {"side1"}
    assert graph_decode._LAST_GRAPHS == {0: second.graph}

    log.clear()
    with pytest.raises(RuntimeError, match="the step failed"):
        CUDAGraphDecoder(Step(log, state, fail_call=2))  # fails during the capture
    assert log[-3:] == [("step", "side1", 5), ("capture_end", 3, "side1"), ("exit", "side1")]
    assert graph_decode._LAST_GRAPHS == {0: second.graph}  # a failed capture is not shared with the next


def graph_and_reference(model, prompts, generations, capacity):
    cache_a, mask, start = prefill(model, prompts, pad_id=0, device=CUDA)
    cache_b, _, _ = prefill(model, prompts, pad_id=0, device=CUDA)
    mask = mask.repeat_interleave(generations, dim=0)
    hf = HFDecoder(model, cache_a, generations, mask)
    fixed = fixed_shape_on_stale_memory(model, StaticKVCache(cache_b, generations, capacity), mask, capacity)
    return CUDAGraphDecoder(fixed), hf, start.repeat_interleave(generations)


@needs_cuda
@torch.no_grad()
def test_cuda_graphs_sharing_a_pool_replay_interleaved_against_transformers():
    """The second graph is captured into the first one's pool while the first is alive: replayed in turn,
    neither may clobber the other's logits or state."""
    model_a, model_b = tiny("llama", vocab=300).cuda(), tiny("qwen3", vocab=200).cuda()
    graph_a, hf_a, pos_a = graph_and_reference(model_a, [[5, 6, 7], [8, 9, 10, 11, 12]], 2, 12)
    graph_b, hf_b, pos_b = graph_and_reference(model_b, [[3, 4], [5, 6, 7, 8]], 3, 11)
    assert graph_b.graph.pool() == graph_a.graph.pool()
    tok_a, tok_b = torch.arange(20, 24, device=CUDA), torch.arange(30, 36, device=CUDA)
    for step in range(6):
        got_a = graph_a(tok_a, pos_a)  # the graph's output buffer, read only after graph_b has replayed
        got_b = graph_b(tok_b, pos_b)
        torch.testing.assert_close(got_a, hf_a(tok_a, pos_a), atol=1e-5, rtol=1e-5, msg=f"a, step {step}")
        torch.testing.assert_close(got_b, hf_b(tok_b, pos_b), atol=1e-5, rtol=1e-5, msg=f"b, step {step}")
        tok_a, tok_b = (tok_a * 7 + step) % 300, (tok_b * 5 + step) % 200
        pos_a, pos_b = pos_a + 1, pos_b + 1


@needs_cuda
@torch.no_grad()
def test_cuda_graph_rollouts_keep_the_allocator_cache_and_reserve_no_more_each_time():
    model = tiny("llama", vocab=300).cuda()
    settings = SamplingSettings(max_new_tokens=12, end_ids=())
    kw = dict(num_generations=4, pad_id=0, decode_impl="graph")
    prompts = [[5, 6, 7, 8], [9, 10]]
    generate(model, prompts, settings, generator=torch.Generator(CUDA).manual_seed(0), **kw)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=CUDA)
    del block  # cached by the allocator: torch.cuda.graph's empty_cache would hand it back to the driver
    reserved = [torch.cuda.memory_reserved()]
    for seed in range(1, 7):
        generate(model, prompts, settings, generator=torch.Generator(CUDA).manual_seed(seed), **kw)
        reserved.append(torch.cuda.memory_reserved())
    assert min(reserved[1:]) >= reserved[0] >= 256 * 2**20, reserved
    # Without a shared pool each rollout would leave its graph's pool reserved: 2 MiB or more each time.
    assert reserved[-1] - reserved[1] < 4 * 2**20, reserved
