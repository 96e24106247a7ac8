"""What each `grpo` subcommand does; cli.py only parses arguments. User mistakes raise ConfigError."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

from grpo.config import (
    ConfigError,
    Template,
    apply_overrides,
    parse_override,
    read_yaml,
    template_from_dict,
)
from grpo.jobs import recovery
from grpo.jobs.job_folder import model_dir, progress
from grpo.jobs.processes import signal_group
from grpo.jobs.store import FINAL_STATES, Job, Store
from grpo.jobs.tlab import read_tlab
from grpo.jobs.worker import Worker

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _stamp(t: float | None) -> str | None:
    return datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds") if t else None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


# ---------------------------------------------------------------- templates
def _absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Local model/dataset paths become absolute so the template works from any folder."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not value.startswith(("embedded:", "builtin:")):
            p = Path(value).expanduser()
            if p.exists():
                return str(p.resolve())
        return value

    out = dict(data)
    if "model" in out:
        out["model"] = fix(out["model"])
    if isinstance(out.get("dataset"), dict) and "path" in out["dataset"]:
        out["dataset"] = {**out["dataset"], "path": fix(out["dataset"]["path"])}
    return out


def save_template(store: Store, name: str, data: dict[str, Any], source: str, *, replace: bool) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"Template name {name!r} is not allowed: use letters, digits, '.', '_' and '-'.")
    data = _absolute_paths({**data, "name": name})
    template_from_dict(data, source=source)  # the trainer's own validation: nothing stored when it fails
    replaced = store.save_template(name, data, replace=replace)
    return f"{'replaced' if replaced else 'saved'} template {name}"


def template_save(store: Store, name: str, file: str, replace: bool) -> None:
    print(save_template(store, name, read_yaml(file), f"Template file {file!r}", replace=replace))


def template_import_tlab(store: Store, file: str, name: str | None, replace: bool) -> None:
    data = read_tlab(file)
    name = name or data.get("name") or Path(file).stem
    print(save_template(store, str(name), data, f"Transformer Lab config {file!r}", replace=replace))


def template_list(store: Store, as_json: bool) -> None:
    rows = []
    for row in store.templates():
        data = yaml.safe_load(row["yaml"]) or {}
        dataset = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
        rows.append(
            {
                "name": row["name"],
                "model": data.get("model", "(default)"),
                "dataset": dataset.get("path", "(default)"),
                "updated": _stamp(row["updated_at"]),
            }
        )
    if as_json:
        _print_json(rows)
    elif not rows:
        print("no templates; save one with: grpo template save NAME FILE.yaml")
    else:
        _table([list(r.values()) for r in rows], ["NAME", "MODEL", "DATASET", "UPDATED"])


def template_show(store: Store, name: str, as_json: bool) -> None:
    row = store.template_row(name)
    if as_json:
        _print_json(
            {"name": name, "template": yaml.safe_load(row["yaml"]), "updated": _stamp(row["updated_at"])}
        )
    else:
        print(row["yaml"], end="")


def template_delete(store: Store, name: str) -> None:
    store.delete_template(name)
    print(f"deleted template {name}")


# ---------------------------------------------------------------- jobs
def _refuse_output_dir(overrides: list[str]) -> None:
    for text in overrides:
        if parse_override(text)[0] == ("config", "output_dir"):
            raise ConfigError(
                f"Override {text!r} is not allowed: the queue puts output_dir in the job's folder."
            )


def _nproc(t: Template) -> int:
    return len(t.config.gpu_ids) if isinstance(t.config.gpu_ids, list) else 1


def queue(store: Store, name: str, overrides: list[str]) -> None:
    _refuse_output_dir(overrides)
    data = apply_overrides(store.template(name), overrides)
    t = template_from_dict(data, source=f"Template '{name}' with {' '.join(overrides) or 'no overrides'}")
    job = store.add_job(
        template=name,
        overrides=overrides,
        resolved=dataclasses.asdict(t),
        max_steps=t.config.max_steps if t.config.max_steps > 0 else None,
        nproc=_nproc(t),
    )
    print(job.id)


def resume(store: Store, job_id: str, overrides: list[str]) -> None:
    """Queue a finished job again: it continues from the newest checkpoint in its folder. Everything that
    would stop the resumed run (no checkpoint, max_steps already reached, a field that changes the math) is
    refused here, before the job is queued."""
    from grpo.run import checkpoint as ckpt  # imports torch: only this command needs it

    recovery.reconcile(store)
    job = store.job(job_id)
    if job.state not in FINAL_STATES:
        raise ConfigError(
            f"Job {job.id} is {job.state}; only interrupted, failed, stopped or completed jobs can be resumed."
        )
    _refuse_output_dir(overrides)
    data = apply_overrides(yaml.safe_load(job.resolved), [*overrides, "resume_from_checkpoint=latest"])
    t = template_from_dict(data, source=f"Job {job.id} with {' '.join(overrides) or 'no overrides'}")
    found = ckpt.list_checkpoints(Path(t.config.output_dir))
    if not found:
        raise ConfigError(
            f"Job {job.id} has no checkpoint to resume from (it ran with save_steps: "
            f"{t.config.save_steps}); queue it again with grpo queue {job.template}."
        )
    step = int(ckpt.read_trainer_state(found[-1])["step"])
    if 0 < t.config.max_steps <= step:
        raise ConfigError(
            f"Job {job.id} is at step {step} (its newest checkpoint) and max_steps is {t.config.max_steps}; "
            f"raise it, e.g. grpo resume {job.id} max_steps={2 * step}."
        )
    ckpt.check_compatible(found[-1], t, force=t.config.force_resume, world_size=_nproc(t))
    resolved = dataclasses.asdict(t)
    max_steps = t.config.max_steps if t.config.max_steps > 0 else None
    if not store.requeue(
        job.id,
        overrides=[*job.overrides, *overrides],
        resolved=resolved,
        max_steps=max_steps,
        nproc=_nproc(t),
    ):
        raise ConfigError(f"Job {job.id} changed state meanwhile; see grpo jobs {job.id}.")
    print(f"job {job.id}: queued to resume from {found[-1].name}")


def job_info(store: Store, job: Job) -> dict[str, Any]:
    p = progress(store, job)
    return {
        "id": job.id,
        "template": job.template,
        "state": job.state,
        "step": p["step"],
        "max_steps": p["max_steps"],
        "reward": p["reward"],
        "queued": _stamp(job.queued_at),
        "started": _stamp(job.started_at),
        "ended": _stamp(job.ended_at),
        "reason": job.reason,
        "overrides": job.overrides,
        "folder": str(store.job_dir(job.id)),
        "model": str(model_dir(store, job)),
        "log": str(store.job_dir(job.id) / "train.log"),
    }


def jobs(store: Store, job_id: str | None, as_json: bool) -> None:
    recovery.reconcile(store)
    infos = [job_info(store, store.job(job_id))] if job_id else [job_info(store, j) for j in store.jobs()]
    if as_json:
        _print_json(infos[0] if job_id else infos)
        return
    if job_id:
        for key, value in infos[0].items():
            print(f"{key + ':':<10} {value if value is not None else '-'}")
        return
    if not infos:
        print("no jobs; queue one with: grpo queue TEMPLATE [key=value ...]")
        return
    rows = []
    for i in infos:
        reward = f"{i['reward']:.3f}" if isinstance(i["reward"], (int, float)) else "-"
        reason = (i["reason"] or "")[:60]
        rows.append(
            [i["id"], i["template"], i["state"], f"{i['step']}/{i['max_steps'] or '?'}", reward]
            + [i["started"] or "-", i["ended"] or "-", reason]
        )
    _table(rows, ["ID", "TEMPLATE", "STATE", "PROGRESS", "REWARD", "STARTED", "ENDED", "REASON"])


def logs(store: Store, job_id: str, follow: bool) -> None:
    recovery.reconcile(store)
    job = store.job(job_id)
    path = store.job_dir(job.id) / "train.log"
    offset = 0
    while True:
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        if not follow:
            return
        recovery.reconcile(store)  # a worker that dies while we follow must not make us wait forever
        if store.job(job.id).state in FINAL_STATES and (not path.is_file() or path.stat().st_size == offset):
            return
        time.sleep(0.5)


def stop(store: Store, job_id: str) -> None:
    recovery.reconcile(store)
    job, action = store.request_stop(job_id)
    if action == "cancelled":
        print(f"job {job.id}: cancelled (stopped before it started)")
    elif action == "stopping":
        signal_group(job.job_pid)  # unknown pid yet: the worker sees the flag when it records the pid
        print(f"job {job.id}: stopping at the next step boundary")
    else:
        raise ConfigError(f"Job {job.id} is already {action}; only queued or running jobs can be stopped.")


def recover() -> None:
    for line in recovery.recover():
        print(line)


def worker(store: Store, once: bool, poll: float, parallel: int = 1) -> int:
    if poll <= 0:
        raise ConfigError(f"--poll {poll} is not allowed: use a positive number of seconds.")
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel} is not allowed: use 1 or more jobs at once.")
    echo = lambda m: print(m, flush=True)  # noqa: E731
    return Worker(store, once=once, poll=poll, echo=echo, parallel=parallel).run()


def tensorboard(store: Store, job_id: str, start: bool) -> int:
    job = store.job(job_id)
    logdir = store.job_dir(job.id) / "output" / "tensorboard"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    if not start:
        print(f"tensorboard --logdir {logdir}")
        return 0
    if find_spec("tensorboard") is None:
        raise ConfigError("tensorboard is not installed: pip install tensorboard.")
    return subprocess.call(command)
