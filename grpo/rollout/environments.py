"""Environments a model acts in over several turns: `config.environment: package.module:Class`.

One instance per sample. `reset(row) -> str | None` starts an episode from the dataset row; a returned text is
added to the prompt's user message, so it must depend on the row only (the G samples of a row share one
prompt). `step(reply) -> (observation | None, done)` reads the model's reply: an observation goes back as the
next user message; done, or no observation, ends the sample. Environments run in the training process, by
design (docs/tools.md)."""

from __future__ import annotations

import importlib
import re
import zlib
from typing import Any

from grpo.errors import ConfigError


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
    return cls
