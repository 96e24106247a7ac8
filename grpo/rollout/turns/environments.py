"""Environments a model acts in over several turns: `config.environment: package.module:Class`.

One instance per sample. `reset(row) -> str | None` starts an episode from the dataset row; a returned text is
added to the prompt's user message, so it must depend on the row only (the G samples of a row share one
prompt). `step(reply) -> (observation | None, done)` reads the model's reply: an observation goes back as the
next user message; done, or no observation, ends the sample.

An environment is trusted code (docs/tools.md), but it reads what the model writes: the environments of a rollout
live in a worker process (user_code.py), and each reset and step has `tool_timeout` seconds. A step that raises,
returns the wrong type or runs out of time answers the model with an "Error: ..." observation, and the run goes on;
a reset that fails (it reads only the row) stops the run with one line naming the environment."""

from __future__ import annotations

import importlib
import re
import zlib
from typing import Any

from grpo.errors import ConfigError
from grpo.rollout.turns.user_code import UserProcess, describe, require_sendable


class NumberGuess:
    """Guess a secret whole number from 1 to 100; the environment answers "higher" or "lower".

    The secret is the row's `secret` column when it has one, else a fixed function of the row, so a sample's
    episode depends only on its row (a resumed run replays it exactly)."""

    def reset(self, row: dict[str, Any]) -> str | None:
        secret = row.get("secret")
        if secret is None:
            secret = zlib.crc32(repr(sorted(row.items())).encode()) % 100 + 1
        self.secret, self.guesses, self.solved = int(secret), 0, False
        return None

    def step(self, reply: str) -> tuple[str | None, bool]:
        numbers = re.findall(r"-?\d+", reply)
        if not numbers:
            return "Reply with one whole number from 1 to 100.", False
        guess = int(numbers[-1])
        self.guesses += 1
        if guess == self.secret:
            self.solved = True
            return None, True
        return ("higher" if guess < self.secret else "lower"), False


BUILTIN_ENVIRONMENTS: dict[str, type] = {"number_guess": NumberGuess}


def resolve_environment(spec: str) -> type:
    """config.environment -> the class, checked before any model loads: it must be a class with reset and step."""
    where = f"config.environment = {spec!r}"
    if spec in BUILTIN_ENVIRONMENTS:
        return BUILTIN_ENVIRONMENTS[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"{where}: name a built-in environment ({', '.join(BUILTIN_ENVIRONMENTS)}) or package.module:Class."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({e}).") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{where}: module {module_name!r} has no class {attr!r}.")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"{where} lacks {' and '.join(missing)}: an environment needs reset(row) -> str | None and "
            "step(reply) -> (observation | None, done)."
        )
    require_sendable(cls, where, "environments", "an environment must be a class")
    return cls


class Episodes:
    """The environments of a rollout, one per sample key, in a worker process.

    The parent keeps each episode's row and the answers of its steps. A step that times out (or kills its
    worker) takes every episode with it, so each is replayed in the fresh worker and must give the same answers:
    an environment must be a function of its row and the replies, as a bitwise resume already needs."""

    def __init__(self, cls: type, spec: str, timeout: float):
        self.where, self.timeout = f"config.environment = {spec!r}", timeout
        self.worker = UserProcess(_serve_episode, cls, what=self.where)
        self.episodes: dict[int, tuple[Any, str | None, list[tuple[str, tuple]]]] = {}

    def begin(self) -> None:
        """A new rollout: the last one's environments are dropped."""
        self.episodes.clear()
        self._ask(("clear", 0, None), "clear")

    def reset(self, key: int, row: dict[str, Any]) -> str | None:
        text = self._ask(("reset", key, row), "reset")
        self.episodes[key] = (row, text, [])
        return text

    def step(self, key: int, reply: str) -> tuple[str | None, bool]:
        """(observation | None, done); a failure is an "Error: ..." observation, never an exception."""
        status, answer = self.worker.request(("step", key, reply), self.timeout)
        if status == "ok":
            self.episodes[key][2].append((reply, answer))  # an error the step raised is replayed too
            return answer[1] if answer[0] == "ok" else (f"Error: the environment's step {answer[1]}", False)
        self._replay()
        if status == "timeout":
            return f"Error: the environment's step did not return within {self.timeout:g} s", False
        return f"Error: the environment's step ended its process (exit code {answer})", False

    def _ask(self, request: tuple, what: str) -> Any:
        status, answer = self.worker.request(request, self.timeout)
        if status == "ok" and answer[0] == "ok":
            return answer[1]
        reason = {
            "timeout": f"did not return within {self.timeout:g} s (tool_timeout)",
            "ended": f"ended its worker process (exit code {answer})",
            "unsendable": f"cannot be handed its row ({answer})",
        }.get(status) or answer[1]
        raise ConfigError(f"{self.where}: {what} {reason}.")

    def _replay(self) -> None:
        for key, (row, text, steps) in self.episodes.items():
            same = self._ask(("reset", key, row), "reset") == text
            for reply, answer in steps:
                status, again = self.worker.request(("step", key, reply), self.timeout)
                same = same and (status, again) == ("ok", answer)
            if not same:
                raise ConfigError(
                    f"{self.where}: replayed after a step that timed out or ended its worker, an episode gave "
                    "other answers; an environment must be a function of its row and the replies."
                )


def _serve_episode(cls: type, request: tuple[str, int, Any]) -> tuple[str, Any]:
    """In the worker process: ("ok", answer) or ("error", what went wrong), in plain values only."""
    op, key, arg = request
    envs = _ENVIRONMENTS  # the worker's own: one process serves one environment class
    if op == "clear":
        envs.clear()
        return "ok", None
    try:
        if op == "reset":
            envs[key] = cls()
        out = getattr(envs[key], op)(arg)
    except BaseException as e:  # SystemExit too
        return "error", f"raised {describe(e)}"
    if op == "reset":
        if out is not None and not isinstance(out, str):
            return "error", f"returned {type(out).__name__}, not str | None"
        return "ok", None if out is None else str.__str__(out)
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not (out[0] is None or isinstance(out[0], str)):
        return "error", f"returned {_shape(out)}, not (observation | None, done)"
    try:
        done = bool(out[1])
    except BaseException as e:  # an array's truth value, a __bool__ that raises
        return "error", f"returned a done that is not true or false ({describe(e)})"
    return "ok", (None if out[0] is None else str.__str__(out[0]), done)


_ENVIRONMENTS: dict[int, Any] = {}


def _shape(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value[:3]) or 'nothing'}"
    return type(value).__name__
