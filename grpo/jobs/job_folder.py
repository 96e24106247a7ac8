"""What a job left in its folder: its resolved config, the log of its latest run, how that run ended, its progress
and where its model is.

train.log collects every run of a job (a resumed job appends to it), so the worker starts each run with a header
line and what belongs to the latest run is what follows the last header.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from grpo.jobs.store import Job, Store

_HEADER = "--- job {id}: started by grpo worker {pid} at {at} ---"
_HEADER_START = "--- job "
# The trainer's own last line once the model is written (grpo/trainer.py): Finished when every step ran,
# Stopped after a stop request (SIGTERM, Ctrl-C).
_RUN_END = re.compile(r"(Finished|Stopped) at step (\d+); model saved to ")
_CHECKPOINT = re.compile(
    r"step-\d+"
)  # a complete checkpoint's folder (grpo/run/checkpoint.py, which needs torch)


def run_header(job: Job, worker_pid: int, at: str) -> str:
    return _HEADER.format(id=job.id, pid=worker_pid, at=at) + "\n"


def job_config(job: Job) -> dict[str, Any]:
    """The config section of the job's resolved template."""
    return (yaml.safe_load(job.resolved) or {}).get("config", {})


def log_path(store: Store, job: Job) -> Path:
    return store.job_dir(job.id) / "train.log"


def latest_run_log(log: Path, tail_bytes: int = 65536) -> str:
    """The end of train.log from the latest run's header on (everything read, when the header is further back)."""
    if not log.is_file():
        return ""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - tail_bytes))
        text = f.read().decode("utf-8", errors="replace")
    lines = text.replace("\r", "\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(_HEADER_START)]
    return "\n".join(lines[starts[-1] + 1 :] if starts else lines)


def last_error_line(log: Path) -> str | None:
    """The latest run's last line starting with 'error:' (our one-line user/run errors), else its last non-empty
    line."""
    lines = [ln.strip() for ln in latest_run_log(log).split("\n") if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return lines[-1] if lines else None


def run_end(log: Path) -> tuple[bool, int] | None:
    """(finished, step) when the latest run wrote its model after its last step, else None."""
    ends = _RUN_END.findall(latest_run_log(log))
    return (ends[-1][0] == "Finished", int(ends[-1][1])) if ends else None


def progress(store: Store, job: Job) -> dict[str, Any]:
    """Last logged step and mean reward from the job's metrics.jsonl."""
    metrics = store.job_dir(job.id) / "output" / "metrics.jsonl"
    last: dict[str, Any] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
    return {
        "step": int(last.get("step", 0)),
        "max_steps": job.max_steps,
        "reward": last.get("reward/total_mean"),
    }


def model_dir(store: Store, job: Job) -> Path:
    config = job_config(job)
    return Path(config.get("output_dir", store.job_dir(job.id) / "output")) / config.get(
        "adaptor_name", "adaptor"
    )


def has_checkpoint(store: Store, job: Job) -> bool:
    """Whether grpo resume has a checkpoint to continue the job from."""
    root = model_dir(store, job).parent / "checkpoints"
    return root.is_dir() and any(p.is_dir() and _CHECKPOINT.fullmatch(p.name) for p in root.iterdir())
