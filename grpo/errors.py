"""The errors a run reports as one line instead of a traceback (grpo/run/cli_common.py maps them to exit codes).

They live here, apart from the modules that raise them, so that the command-line wrapper can catch them without
importing the trainer.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a template or override: the message is one sentence naming the field."""


class RewardError(RuntimeError):
    """A reward function failed or broke its contract: the message names the function."""


class RewardTimeout(RewardError):
    """A reward function's call took longer than config.reward_timeout."""


class EngineError(RuntimeError):
    """The rollout engine failed: a vLLM server that stopped answering or holds another run's weights."""


class NonFiniteError(RuntimeError):
    pass


class StorageError(RuntimeError):
    """The run folder filled up or cannot be written: the message says what was being written."""
