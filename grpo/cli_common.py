"""Turn user mistakes into one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1


def run_cli(job: Callable[[], int]) -> int:
    from grpo.config import ConfigError
    from grpo.rewards import RewardError
    from grpo.trainer import NonFiniteError

    try:
        return job()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (RewardError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RUN_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
