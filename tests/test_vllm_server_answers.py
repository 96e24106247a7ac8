"""vllm_mode: server against a real HTTP server on loopback that looks like `grpo vllm-serve` and answers
wrongly, one way per case: every wrong answer is refused with one line naming the server and what was wrong,
never a KeyError, an IndexError or samples paired with the wrong prompt. Needs no vLLM (the main test venv runs
it; the real server's answers are in tests/vllm/test_server.py)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from grpo.config import ConfigError, template_from_dict
from grpo.errors import EngineError
from grpo.parallel.launch import DistEnv
from grpo.rollout.engines.vllm_serve import SECRET_ENV, SECRET_HEADER
from grpo.rollout.engines.vllm_server import VLLMServer
from grpo.rollout.generate import SamplingSettings
from grpo.rollout.registry import connect_sampler, start_sampler
from tests.conftest import REPO, tiny_template, write_template

SECRET = "a-secret-of-the-fake-server"
N, MAX_TOKENS = 4, 8  # the samples per prompt and tokens per sample the tests ask for


class Fake:
    """What `grpo vllm-serve` answers, each route's answer open to a test's `wrong(path, body, answer)`."""

    def __init__(self) -> None:
        self.guarded = True  # False: a plain `vllm serve` in dev mode, which answers anyone
        self.version: str | None = None
        self.wrong: Callable[[str, dict[str, Any], Any], Any] = lambda path, body, answer: answer
        self.completion_requests = 0

    def answer(self, path: str, body: dict[str, Any]) -> Any:
        if path == "/weight_info":
            return {"weight_version": self.version}
        if path == "/update_weight_version":
            self.version = body["new_version"]
            return None
        if path == "/v1/models":
            return {
                "object": "list",
                "data": [{"id": "/models/tiny", "object": "model", "max_model_len": 1024}],
            }
        if path == "/collective_rpc":
            return {"results": ["fingerprint of the weights"]}
        if path == "/reset_prefix_cache":
            return None
        if path == "/v1/completions":
            self.completion_requests += 1
            # the choices out of index order, as a server may send them; prompt-dependent tokens
            first = body["prompt"][-1]
            choices = [
                {
                    "index": i,
                    "token_ids": [first + i, 2],
                    "logprobs": {"token_logprobs": [-0.5 - i, -0.25]},
                    "finish_reason": "stop",
                }
                for i in reversed(range(body["n"]))
            ]
            return {"id": "cmpl-1", "object": "text_completion", "choices": choices}
        raise KeyError(path)


@pytest.fixture
def fake(monkeypatch) -> Iterator[tuple[Fake, str]]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    state = Fake()

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, body: dict[str, Any]) -> None:
            if state.guarded and self.path != "/health" and self.headers.get(SECRET_HEADER) != SECRET:
                self.send_response(401)
                self.end_headers()
                return
            if self.path == "/health":
                answer = None
            else:
                try:
                    answer = state.wrong(self.path, body, state.answer(self.path, body))
                except KeyError:
                    self.send_response(404)
                    self.end_headers()
                    return
            raw = (
                b""
                if answer is None
                else answer
                if isinstance(answer, bytes)
                else json.dumps(answer).encode()
            )
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self.reply({})

        def do_POST(self) -> None:
            self.reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def log_message(self, *args: Any) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        try:
            yield state, f"http://127.0.0.1:{web.server_address[1]}"
        finally:
            web.shutdown()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from grpo.model.loading import load_model

    return load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)


def server_template(model_dir, output_dir, url: str, **config) -> dict:
    return tiny_template(
        model_dir, output_dir, rollout_engine="vllm", vllm_mode="server", vllm_server_url=url, **config
    )


def connect(url: str, model_dir, output_dir) -> VLLMServer:
    template = template_from_dict(server_template(model_dir, output_dir, url, vllm_server_timeout=5))
    return VLLMServer.connect(template, output_dir=output_dir, env=DistEnv())


PROMPTS = [[1, 17, 300], [1, 22], [1, 5000, 6, 7]]


def sample(server: VLLMServer, **options):
    settings = SamplingSettings(max_new_tokens=MAX_TOKENS, end_ids=(2,), **options)
    generator = torch.Generator().manual_seed(0)
    return server.sample(PROMPTS, settings, num_generations=N, generator=generator, version=0)


def pushed(fake, policy, tiny_model_dir, tmp_path) -> VLLMServer:
    """The server as the trainer gets it: connected, then started with the policy's weights of step 0."""
    state, url = fake
    output_dir = tmp_path / "run"
    template = template_from_dict(server_template(tiny_model_dir, output_dir, url, vllm_server_timeout=5))
    server = connect_sampler(template, output_dir, DistEnv())
    started = start_sampler(
        template,
        model=policy,
        policy=policy,
        device=torch.device("cpu"),
        dtype=torch.float32,
        version=0,
        connected=server,
        pad_id=2,
        sampling_weights=None,
    )
    assert started is server and isinstance(server, VLLMServer)
    return server


def test_a_right_answer_is_taken_in_index_order(fake, policy, tiny_model_dir, tmp_path):
    server = pushed(fake, policy, tiny_model_dir, tmp_path)
    ro = sample(server)
    # each prompt's samples in their index order, paired with their own prompt
    expected = [[p[-1] + i, 2] for p in PROMPTS for i in range(N)]
    assert ro.completion_ids.tolist() == expected
    assert ro.sampling_logps.tolist() == [[-0.5 - i, -0.25] for _ in PROMPTS for i in range(N)]
    assert ro.truncated.tolist() == [False] * (N * len(PROMPTS))
    assert fake[0].completion_requests == len(PROMPTS)


def choices_of(fn: Callable[[list[dict[str, Any]]], Any]) -> Callable[[str, dict[str, Any], Any], Any]:
    """A `wrong` that rewrites the choices of every completion answer (in index order)."""

    def wrong(path: str, body: dict[str, Any], answer: Any) -> Any:
        if path != "/v1/completions":
            return answer
        choices = sorted(answer["choices"], key=lambda ch: ch["index"])
        return {**answer, "choices": fn(choices)}

    return wrong


def set_first(**fields: Any) -> Callable[[list[dict[str, Any]]], Any]:
    return lambda choices: [{**choices[0], **fields}, *choices[1:]]


NAN = float("nan")
COMPLETIONS = {
    "no choices": (
        lambda path, body, answer: {"id": "x"} if path == "/v1/completions" else answer,
        'no "choices" field ({"id": "x"})',
    ),
    "fewer choices than n": (choices_of(lambda ch: ch[:3]), "3 choices for n = 4 samples of the prompt"),
    "more choices than n": (choices_of(lambda ch: [*ch, ch[0]]), "5 choices for n = 4 samples of the prompt"),
    "an index twice": (
        choices_of(lambda ch: [ch[0], {**ch[1], "index": 0}, *ch[2:]]),
        "choice index 0: expected each of 0 to 3 once",
    ),
    "an index out of range": (choices_of(set_first(index=4)), "choice index 4: expected each of 0 to 3 once"),
    "no index": (
        choices_of(lambda ch: [{k: v for k, v in ch[0].items() if k != "index"}, *ch[1:]]),
        "choice index null: expected each of 0 to 3 once",
    ),
    "no token ids": (
        choices_of(set_first(token_ids=None)),
        "choice 0 without a list of token ids (null)",
    ),
    "no tokens at all": (choices_of(set_first(token_ids=[])), "choice 0 without a list of token ids ([])"),
    "a float token id": (
        choices_of(set_first(token_ids=[3.0, 2], logprobs={"token_logprobs": [-1.0, -1.0]})),
        "choice 0 without a list of token ids ([3.0, 2])",
    ),
    "an id past the vocabulary": (
        choices_of(set_first(token_ids=[49152, 2])),
        "token id 49152 in choice 0, outside the vocabulary of 49152 tokens",
    ),
    "a negative id": (
        choices_of(set_first(token_ids=[-1, 2])),
        "token id -1 in choice 0, outside the vocabulary of 49152 tokens",
    ),
    "far over max_tokens": (
        choices_of(set_first(token_ids=[5] * 500, logprobs={"token_logprobs": [-1.0] * 500})),
        "choice 0 of 500 tokens, above max_tokens = 8",
    ),
    "null log-probs": (
        choices_of(set_first(logprobs=None)),
        "choice 0 without one log-prob per token (null for 2)",
    ),
    "a null log-prob": (
        choices_of(set_first(logprobs={"token_logprobs": [None, -1.0]})),
        "log-prob null in choice 0, not a finite number <= 0",
    ),
    "one log-prob short": (
        choices_of(set_first(logprobs={"token_logprobs": [-1.0]})),
        "choice 0 without one log-prob per token ([-1.0] for 2)",
    ),
    "a NaN log-prob": (
        choices_of(set_first(logprobs={"token_logprobs": [NAN, -1.0]})),
        "log-prob NaN in choice 0, not a finite number <= 0",
    ),
    "a positive log-prob": (
        choices_of(set_first(logprobs={"token_logprobs": [0.5, -1.0]})),
        "log-prob 0.5 in choice 0, not a finite number <= 0",
    ),
    "not JSON": (
        lambda path, body, answer: b"<html>" if path == "/v1/completions" else answer,
        "something that is not JSON",
    ),
}


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_a_wrong_completion_is_refused_in_one_line(fake, policy, tiny_model_dir, tmp_path, case):
    server = pushed(fake, policy, tiny_model_dir, tmp_path)
    fake[0].wrong, problem = COMPLETIONS[case]
    with pytest.raises(EngineError) as e:
        sample(server)
    assert str(e.value) == f"the vLLM server at {fake[1]} answered /v1/completions with {problem}"


def test_greedy_answers_need_no_log_probs(fake, policy, tiny_model_dir, tmp_path):
    server = pushed(fake, policy, tiny_model_dir, tmp_path)
    fake[0].wrong = choices_of(lambda ch: [{**c, "logprobs": None} for c in ch])
    ro = sample(server, greedy=True)  # one sample per prompt, repeated G times
    assert ro.sampling_logps is None and ro.completion_ids.tolist() == [
        [p[-1], 2] for p in PROMPTS for _ in range(N)
    ]


CONNECT = {
    "/weight_info without weight_version": (
        "/weight_info",
        {"version": "v"},
        'no "weight_version" field ({"version": "v"})',
    ),
    "/weight_info with a number": (
        "/weight_info",
        {"weight_version": 3},
        "a weight_version that is not a string (3)",
    ),
    "/weight_info as a list": ("/weight_info", ["grpo"], 'no "weight_version" field (["grpo"])'),
    "/v1/models without data": ("/v1/models", {"object": "list"}, 'no "data" field ({"object": "list"})'),
    "/v1/models with no model": ("/v1/models", {"data": []}, "no model in its data list ([])"),
    "/v1/models without an id": (
        "/v1/models",
        {"data": [{"object": "model"}]},
        'a model without an id ({"object": "model"})',
    ),
    "/v1/models with a wrong length": (
        "/v1/models",
        {"data": [{"id": "m", "max_model_len": "long"}]},
        'a max_model_len that is not a positive integer ("long")',
    ),
}


@pytest.mark.parametrize("case", list(CONNECT))
def test_a_wrong_answer_at_connect_is_refused_in_one_line(fake, tiny_model_dir, tmp_path, case):
    route, bad, problem = CONNECT[case]
    fake[0].wrong = lambda path, body, answer: bad if path == route else answer
    with pytest.raises(EngineError) as e:
        connect(fake[1], tiny_model_dir, tmp_path / "run")
    assert str(e.value) == f"the vLLM server at {fake[1]} answered {route} with {problem}"


def test_a_push_without_a_fingerprint_is_refused(fake, policy, tiny_model_dir, tmp_path):
    state, url = fake
    server = connect(url, tiny_model_dir, tmp_path / "run")
    state.wrong = lambda path, body, answer: {"results": []} if path == "/collective_rpc" else answer
    with pytest.raises(EngineError) as e:
        server.update_weights(policy, version=0)
    assert (
        str(e.value)
        == f"the vLLM server at {url} answered /collective_rpc grpo_reload with no worker's result ([])"
    )


def test_fewer_choices_than_n_stops_the_training_run(fake, tiny_model_dir, tmp_path):
    """Through scripts/train.py, as a user meets it: the run stops with one line before its first step ends,
    where it used to exit 0 with the samples paired to the wrong prompts."""
    state, url = fake
    state.wrong = choices_of(lambda ch: ch[:1])
    path = write_template(tmp_path / "t.yaml", server_template(tiny_model_dir, tmp_path / "run", url))
    result = subprocess.run(
        [sys.executable, "scripts/train.py", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"error: the vLLM server at {url} answered /v1/completions with 1 choices for n = 2 samples of the prompt"
    )
    assert "Traceback" not in result.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # no step was logged from the wrong samples


def test_a_server_that_answers_without_the_secret_is_refused(fake, tiny_model_dir, tmp_path):
    state, url = fake
    state.guarded = False
    with pytest.raises(ConfigError) as e:
        connect(url, tiny_model_dir, tmp_path / "run")
    assert str(e.value) == (
        f"config.vllm_server_url = '{url}' answers /weight_info without a secret, so anyone who reaches it can "
        "change its weights: start it with `grpo vllm-serve MODEL`, which requires one."
    )


def test_a_run_without_the_secret_is_refused(fake, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "not-the-fake-server-secret")
    with pytest.raises(ConfigError) as e:
        connect(fake[1], tiny_model_dir, tmp_path / "run")
    assert str(e.value) == (
        f"config.vllm_server_url = '{fake[1]}' refused this run's secret: set GRPO_VLLM_SECRET to the secret "
        "`grpo vllm-serve` was started with (docs/vllm.md)."
    )
