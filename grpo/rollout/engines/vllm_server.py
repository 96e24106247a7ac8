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
- **ownership**: every request carries the server's secret (GRPO_VLLM_SECRET, or the file a loopback server
  left for this machine; grpo/rollout/engines/vllm_serve.py), and a server that answers without one is
  refused. The server's weight version (vLLM's `/update_weight_version`) carries the run's folder and step,
  `grpo <output_dir> <step>`: a run refuses a server whose version names another run's folder. Each push
  returns a fingerprint of the weights the engine then holds; before each push and after each rollout the run
  checks that the version and the fingerprint are still its own (before a rollout, the version), so weights
  pushed by anyone else, or a push that never happened, stop the run within the step instead of training on
  another policy's samples.
- **answers**: every answer is checked before it is used (grpo/rollout/engines/vllm_answers.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from grpo.config import ConfigError, Template, TrainConfig
from grpo.errors import EngineError
from grpo.parallel.launch import DistEnv
from grpo.rollout.engines import vllm_answers as answers
from grpo.rollout.engines.engine import EngineSampler, policy_weights
from grpo.rollout.engines.vllm_serve import SECRET_ENV, SECRET_HEADER, is_loopback, secret_file

FREE = "free"  # the weight version a finished run leaves behind: the next run may take the server
WEIGHTS_DIR = "vllm-weights"
SLEEP_IN_SERVER_MODE = (
    "config.vllm_enable_sleep_mode = True applies to vllm_mode: colocate; a server keeps its own memory: set it "
    "to false."
)


class ServerDown(EngineError):
    """The server did not answer: refused, unreachable or timed out (the message says which)."""


class HTTPRefused(EngineError):
    """The server answered with an HTTP error; `code` is its status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_tag(output_dir: Path) -> str:
    return f"grpo {Path(output_dir).resolve()}"


def client_secret(url: str) -> str | None:
    """GRPO_VLLM_SECRET, else for a loopback URL the secret a server on that port wrote for this machine."""
    if os.environ.get(SECRET_ENV):
        return os.environ[SECRET_ENV]
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or not is_loopback(parts.hostname):
        return None
    try:
        return secret_file(parts.port or (443 if parts.scheme == "https" else 80)).read_text().strip() or None
    except OSError:
        return None


class VLLMServer(EngineSampler):
    """A `grpo vllm-serve` process at `url` and the training step whose weights it holds."""

    def __init__(self, url: str, *, timeout: float, output_dir: Path, env: DistEnv):
        super().__init__(version=-1)
        self.url, self.timeout, self.env = url.rstrip("/"), timeout, env
        self.tag = run_tag(output_dir)
        self.weights_dir = Path(output_dir).resolve() / WEIGHTS_DIR
        self.model_name = ""
        self.secret = client_secret(self.url)
        self.fingerprint: list[Any] = []  # what the engine's workers reported after this run's last push
        self.vocab_size: int | None = None  # the policy's: no sampled token id may reach past it

    # ---------------------------------------------------------------- HTTP
    def call(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        secret: bool = True,
    ) -> Any:
        """POST `body` (or GET without one) and return the decoded JSON answer (None for an empty one)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        if secret and self.secret:
            headers[SECRET_HEADER] = self.secret
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300].replace("\n", " ")
            raise HTTPRefused(
                f"the vLLM server at {self.url} answered {path} with HTTP {e.code}: {detail}", e.code
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
            raise answers.BadAnswer(
                f"the vLLM server at {self.url} answered {path} with something that is not JSON"
            ) from e

    def server_version(self) -> str | None:
        return answers.weight_version(self.url, self.call("/weight_info"))

    def rpc(self, method: str, **kwargs: str) -> list[Any]:
        """A worker method through /collective_rpc: one result per worker."""
        answer = self.call("/collective_rpc", {"method": method, "kwargs": kwargs})
        return answers.rpc_results(self.url, method, answer)

    def set_version(self, version: int) -> None:
        self.call("/update_weight_version", {"new_version": f"{self.tag} {version}"})
        self.version = version

    # ---------------------------------------------------------------- start, push, end
    @classmethod
    def problem(cls, c: TrainConfig, *, device: torch.device, world_size: int) -> str | None:
        """HTTP only: no vllm package needed here, and every rank may share the server."""
        return SLEEP_IN_SERVER_MODE if c.vllm_enable_sleep_mode else None

    @classmethod
    def connect(cls, template: Template, *, output_dir: Path, env: DistEnv) -> VLLMServer:
        """Wait for the server (up to vllm_server_timeout) and check that it can serve this run, before any
        model loads; the first push comes when the policy is built (`start`)."""
        c = template.config
        server = cls(c.vllm_server_url, timeout=c.vllm_server_timeout, output_dir=output_dir, env=env)
        start = time.perf_counter()
        server.wait_until_up()
        owner = server.claim_check()
        if owner is not None and owner.startswith("grpo ") and not owner.startswith(server.tag + " "):
            other = owner.removeprefix("grpo ").rsplit(" ", 1)[0]
            raise ConfigError(
                f"config.vllm_server_url = {c.vllm_server_url!r} is already driven by the run in {other}: one "
                "server serves one trainer; wait for that run to end (restart the server if it died), or start "
                "another `grpo vllm-serve`."
            )
        server.model_name, max_len = answers.served_model(server.url, server.call("/v1/models"))
        if max_len is not None and max_len < c.maximum_sequence_length:
            raise ConfigError(
                f"config.maximum_sequence_length = {c.maximum_sequence_length} is above the "
                f"{max_len} tokens the vLLM server at {c.vllm_server_url} holds: restart it "
                f"with --max-model-len {c.maximum_sequence_length} or lower maximum_sequence_length."
            )
        server.startup_s = time.perf_counter() - start
        return server

    @classmethod
    def start(
        cls,
        template: Template,
        *,
        model: torch.nn.Module,
        device: torch.device,
        version: int,
        connected: VLLMServer,
        pad_id: int,
        **_: Any,  # the server holds its own copy of the weights: no bf16 copy, no dtype of ours
    ) -> VLLMServer:
        """The server `connect` reached, once it holds `model`'s weights as those of step `version`."""
        connected.device, connected.pad_id = device, pad_id
        connected.update_weights(model, version=version)
        return connected

    def claim_check(self) -> str | None:
        """The server's weight version, once it is sure to be a `grpo vllm-serve` that takes this run's secret
        and refuses everyone without it."""
        where = f"config.vllm_server_url = {self.url!r}"
        try:
            owner = self.server_version()
        except HTTPRefused as e:
            if e.code != 401:
                raise ConfigError(
                    f"{where} is a server without vLLM's weight-update endpoints: start it with `grpo vllm-serve "
                    "MODEL`, which turns them on."
                ) from e
            which = "refused this run's secret" if self.secret else "needs a secret and this run has none"
            raise ConfigError(
                f"{where} {which}: set {SECRET_ENV} to the secret `grpo vllm-serve` was started with "
                "(docs/vllm.md)."
            ) from e
        try:
            self.call("/weight_info", secret=False)
        except HTTPRefused as e:
            if e.code in (401, 403):
                return owner
        raise ConfigError(
            f"{where} answers /weight_info without a secret, so anyone who reaches it can change its weights: "
            "start it with `grpo vllm-serve MODEL`, which requires one."
        )

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
    def update_weights(self, model: torch.nn.Module, *, version: int) -> None:
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
                self.fingerprint = self.rpc("grpo_reload", weights_path=str(self.weights_dir))
                self.call("/reset_prefix_cache", {})  # cached prompt keys/values belong to the old weights
                self.set_version(version)
            except EngineError as e:
                problem = str(e)
        if self.env.enabled:
            import torch.distributed as dist

            box = [problem, self.fingerprint]  # every rank checks the fingerprint around its own rollouts
            dist.broadcast_object_list(box, src=0)
            problem, self.fingerprint = box
        if problem is not None:
            raise EngineError(problem)
        self.version = version
        self.vocab_size = vocab_size(model)
        self.push_s = time.perf_counter() - start

    def expect(self, version: int, *, weights: bool = True) -> None:
        """Refuse to go on unless the server holds this run's weights of step `version`: its version string
        and (with `weights`) the fingerprint of what the engine holds, both as this run's last push left them."""
        found = self.server_version()
        if found != f"{self.tag} {version}":
            raise EngineError(
                f"the vLLM server at {self.url} holds weights {found!r}, not this run's step {version}: "
                "another trainer or client changed them; give each run its own `grpo vllm-serve`."
            )
        if weights and self.rpc("grpo_fingerprint") != self.fingerprint:
            raise EngineError(
                f"the vLLM server at {self.url} holds other weights than the ones this run pushed for step "
                f"{version} (their fingerprint changed): someone else reloaded them; give each run its own "
                f"`grpo vllm-serve` and keep its secret ({SECRET_ENV}) to that run."
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
        # The version only: the fingerprint was just taken (by the push, or after the last rollout), and the
        # check after sampling catches any reload since, without a second pass over the weights per rollout.
        self.expect(self.version, weights=False)
        body = {**settings, "model": self.model_name, "return_token_ids": True, "skip_special_tokens": False}
        shape = {"n": settings["n"], "max_tokens": settings["max_tokens"], "vocab_size": self.vocab_size}

        def one(i: int) -> list[tuple[list[int], list[float] | None]]:
            answer = self.call("/v1/completions", {**body, "prompt": list(prompts[i]), "seed": seeds[i]})
            return answers.completion_samples(self.url, answer, **shape, with_logprobs="logprobs" in settings)

        with ThreadPoolExecutor(max_workers=min(64, len(prompts))) as pool:
            groups = list(pool.map(one, range(len(prompts))))
        self.expect(self.version)  # a push by anyone else while the samples were drawn: they are not ours
        return groups


def vocab_size(model: torch.nn.Module) -> int | None:
    """The token ids the policy has (its input embedding's rows), through a DDP wrapper."""
    inner = getattr(model, "module", model)
    embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if rows is not None else getattr(getattr(inner, "config", None), "vocab_size", None)


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
