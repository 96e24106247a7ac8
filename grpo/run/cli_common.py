"""Turn user mistakes into one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from grpo.errors import ConfigError, EngineError, NonFiniteError, RewardError, StorageError

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1


def say_line(text: str) -> None:
    """Write one line to stderr in a single write(2) call.

    Several torchrun ranks share one stderr pipe; print() issues the text and the newline as two writes,
    so two ranks' lines could interleave. One write of under PIPE_BUF bytes is atomic on a pipe.
    """
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest capsys, a notebook)
        sys.stderr.write(text + "\n")
        return
    os.write(fd, (text + "\n").encode())


def run_cli(job: Callable[[], int]) -> int:
    try:
        return job()
    except ConfigError as e:
        say_line(f"error: {e}")
        return EXIT_USER_ERROR
    except (RewardError, NonFiniteError, StorageError, EngineError) as e:
        say_line(f"error: {e}")
        return EXIT_RUN_ERROR
    except KeyboardInterrupt:
        say_line("interrupted")
        return 130
