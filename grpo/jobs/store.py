"""The workspace: GRPO_HOME (default ~/.grpo) with `grpo.db` (SQLite) and one folder per job, `jobs/<id>/`.

Every write runs in a `BEGIN IMMEDIATE` transaction (the write lock is taken up front, so two shells queueing at
once serialise instead of failing half-way), the database is in WAL mode (readers never block the worker) and
waits up to 30 s for a busy lock. A job folder holds:

    job.yaml    the resolved template (template + overrides, output_dir = <job folder>/output)
    job.json    the job's row (everything but the resolved template), rewritten at each change of state
    train.log   stdout + stderr of the training process
    output/     what the trainer writes: metrics.jsonl, samples.jsonl, tensorboard/, the model folder

and `templates/<name>.yaml` keeps each saved template. These copies make the folders the record of last resort:
a database that was emptied, replaced or lost its latest writes lists fewer jobs or templates than the folders
hold, and it is then refused (never silently started over, never given a new job in an old folder) until
`grpo recover` (recovery.py) puts the rows back from the copies.
"""

from __future__ import annotations

import difflib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grpo.config import ConfigError
from grpo.run.atomic_files import atomic_write_text

STATES = ("queued", "running", "stopping", "completed", "failed", "stopped", "interrupted")
# stopping: its worker died and its training process, told to stop, finishes its step and saves a checkpoint;
# interrupted: the training process ended early without being asked to (its worker died); grpo resume continues it
FINAL_STATES = ("completed", "failed", "stopped", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY,
    yaml TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    template TEXT NOT NULL,
    overrides TEXT NOT NULL,
    resolved TEXT NOT NULL,
    cwd TEXT NOT NULL,
    max_steps INTEGER,
    nproc INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    reason TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    worker_pid INTEGER,
    job_pid INTEGER,
    exit_code INTEGER
);
"""


def grpo_home() -> Path:
    return Path(os.environ.get("GRPO_HOME") or "~/.grpo").expanduser()


@dataclass
class Job:
    id: int
    template: str
    overrides: list[str]
    resolved: str
    cwd: str
    max_steps: int | None
    nproc: int
    state: str
    reason: str | None
    stop_requested: bool
    queued_at: float
    started_at: float | None
    ended_at: float | None
    worker_pid: int | None
    job_pid: int | None
    exit_code: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["overrides"] = json.loads(data["overrides"])
        data["stop_requested"] = bool(data["stop_requested"])
        return cls(**data)


class UnreadableDatabase(ConfigError):
    """grpo.db is not a SQLite database (overwritten, or damaged on disk)."""


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Store:
    """The database and the folders. `check=False` opens a damaged workspace (for grpo recover only)."""

    def __init__(self, home: Path | None = None, *, check: bool = True):
        self.home = home or grpo_home()
        self.path = self.home / "grpo.db"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "jobs").mkdir(exist_ok=True)
        (self.home / "templates").mkdir(exist_ok=True)
        # Folders first, rows second: a folder is made only after its row is committed (add_job) and a
        # template file is removed before its row (delete_template), so a folder or file seen here whose row
        # is then missing was really lost, not caught half-way through another command.
        folders, files = self.job_folders(), self.template_files()
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.execute("PRAGMA journal_mode = WAL")
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if check and folders.keys() | files.keys():
                self._refuse_lost(tables, folders, files)
            with self.tx() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
        except sqlite3.DatabaseError as e:
            if type(e) is not sqlite3.DatabaseError:  # locked, I/O error, ...: not a damaged file
                raise
            raise UnreadableDatabase(
                f"The job database {self.path} cannot be read ({e}); run grpo recover to set it aside and "
                f"rebuild it from {self.home / 'jobs'} and {self.home / 'templates'}."
            ) from None

    def _refuse_lost(self, tables: set[str], folders: dict[int, Path], files: dict[str, Path]) -> None:
        ids = {r[0] for r in self.db.execute("SELECT id FROM jobs")} if "jobs" in tables else set()
        names = (
            {r[0] for r in self.db.execute("SELECT name FROM templates")} if "templates" in tables else set()
        )
        jobs, templates = sorted(folders.keys() - ids), sorted(files.keys() - names)
        if not jobs and not templates:
            return
        lost = []
        if jobs:
            lost.append(f"{len(jobs)} job folder(s) ({_listing([f'jobs/{i}' for i in jobs])})")
        if templates:
            lost.append(f"{len(templates)} saved template(s) ({_listing(templates)})")
        raise ConfigError(
            f"The job database {self.path} does not list {' and '.join(lost)} found in {self.home} "
            "(it was emptied, replaced or lost writes); run grpo recover to rebuild it from them."
        )

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from the start."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def job_dir(self, job_id: int) -> Path:
        return self.home / "jobs" / str(job_id)

    def job_folders(self) -> dict[int, Path]:
        root = self.home / "jobs"
        return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}

    def template_file(self, name: str) -> Path:
        return self.home / "templates" / f"{name}.yaml"

    def template_files(self) -> dict[str, Path]:
        return {p.name[: -len(".yaml")]: p for p in (self.home / "templates").glob("*.yaml")}

    def _mirror(self, db: sqlite3.Connection, job_id: int) -> None:
        """Copy the job's row to its job.json, inside the write transaction that changed it (so copies are
        written in the order of the changes)."""
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        folder = self.job_dir(job_id)
        if row is not None and folder.is_dir():
            data = {k: row[k] for k in row.keys() if k != "resolved"}
            data["overrides"] = json.loads(data["overrides"])
            atomic_write_text(folder / "job.json", json.dumps(data, indent=1) + "\n")

    # ------------------------------------------------------------ templates
    def save_template(self, name: str, data: dict[str, Any], *, replace: bool) -> bool:
        """Insert, or replace when `replace`; True when a template of that name existed."""
        now = time.time()
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        with self.tx() as db:
            existed = db.execute("SELECT 1 FROM templates WHERE name = ?", (name,)).fetchone() is not None
            if existed and not replace:
                raise ConfigError(
                    f"Template '{name}' already exists; add --replace to overwrite it "
                    f"(grpo template export {name} prints the current one)."
                )
            db.execute(
                "INSERT INTO templates (name, yaml, created_at, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET yaml = excluded.yaml, updated_at = excluded.updated_at",
                (name, text, now, now),
            )
        atomic_write_text(self.template_file(name), text)
        return existed

    def restore_template(self, name: str, text: str, at: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO templates (name, yaml, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, text, at, at),
            )

    def template_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM templates ORDER BY name")]

    def templates(self) -> list[sqlite3.Row]:
        return list(self.db.execute("SELECT * FROM templates ORDER BY name"))

    def template_row(self, name: str) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM templates WHERE name = ?", (name,)).fetchone()
        if row is None:
            match = difflib.get_close_matches(name, self.template_names(), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"Unknown template '{name}'{hint}; see grpo template list.")
        return row

    def template(self, name: str) -> dict[str, Any]:
        return yaml.safe_load(self.template_row(name)["yaml"]) or {}

    def delete_template(self, name: str) -> None:
        self.template_row(name)
        self.template_file(name).unlink(missing_ok=True)  # before the row: see __init__
        with self.tx() as db:
            db.execute("DELETE FROM templates WHERE name = ?", (name,))

    # ------------------------------------------------------------ jobs
    def add_job(
        self,
        *,
        template: str,
        overrides: list[str],
        resolved: dict[str, Any],
        max_steps: int | None,
        nproc: int,
    ) -> Job:
        """Queue a job. Its id is past every id ever given and every folder in jobs/ (so a job never shares a
        folder with another), and its folder is made after the row is committed and must not exist yet."""
        with self.tx() as db:
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
            job_id = max([seq[0] if seq else 0, *self.job_folders()]) + 1
            resolved = {**resolved, "config": {**resolved["config"]}}
            resolved["config"]["output_dir"] = str(self.job_dir(job_id) / "output")
            text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
            db.execute(
                "INSERT INTO jobs (id, template, overrides, resolved, cwd, max_steps, nproc, state, queued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (job_id, template, json.dumps(overrides), text, os.getcwd(), max_steps, nproc, time.time()),
            )
        folder = self.job_dir(job_id)
        try:
            folder.mkdir()
        except FileExistsError:
            with self.tx() as db:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            raise ConfigError(
                f"Job folder {folder} appeared while job {job_id} was being queued; nothing was queued, "
                "queue it again."
            ) from None
        (folder / "job.yaml").write_text(text)
        with self.tx() as db:
            self._mirror(db, job_id)
        return self.job(job_id)

    def restore_job(self, data: dict[str, Any]) -> None:
        """Insert a job row rebuilt from its folder (grpo recover), keeping its id."""
        data = {**data, "overrides": json.dumps(data["overrides"])}
        columns = ", ".join(data)
        with self.tx() as db:
            db.execute(
                f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(data))})", list(data.values())
            )
            self._mirror(db, data["id"])

    def job(self, job_id: str | int) -> Job:
        try:
            key = int(str(job_id))
        except ValueError:
            raise ConfigError(
                f"Job id '{job_id}' is not allowed: use the number grpo queue printed."
            ) from None
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (key,)).fetchone()
        if row is None:
            raise ConfigError(f"Unknown job '{job_id}'; see grpo jobs.")
        return Job.from_row(row)

    def jobs(self, state: str | None = None) -> list[Job]:
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        return [Job.from_row(r) for r in self.db.execute(f"SELECT * FROM jobs {where} ORDER BY id", args)]

    def next_queued(self) -> Job | None:
        """The longest-queued job (a resumed job queues again at the back), or None."""
        row = self.db.execute(
            "SELECT id FROM jobs WHERE state = 'queued' ORDER BY queued_at, id LIMIT 1"
        ).fetchone()
        return None if row is None else self.job(row["id"])

    def claim(self, job_id: int, worker_pid: int) -> bool:
        """queued -> running, owned by this worker; False when it is no longer queued (cancelled, or another
        worker took it)."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, worker_pid = ? WHERE id = ? AND state = 'queued'",
                (time.time(), worker_pid, job_id),
            )
            self._mirror(db, job_id)
        return cur.rowcount == 1

    def requeue(
        self,
        job_id: int,
        *,
        overrides: list[str],
        resolved: dict[str, Any],
        max_steps: int | None,
        nproc: int,
    ) -> bool:
        """A finished job -> queued again with a new resolved template, its run state cleared. False when it
        is no longer finished (another command got there first)."""
        text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
        finished = ", ".join(f"'{s}'" for s in FINAL_STATES)
        with self.tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'queued', overrides = ?, resolved = ?, max_steps = ?, nproc = ?, "
                "queued_at = ?, reason = NULL, stop_requested = 0, started_at = NULL, ended_at = NULL, "
                f"worker_pid = NULL, job_pid = NULL, exit_code = NULL WHERE id = ? AND state IN ({finished})",
                (json.dumps(overrides), text, max_steps, nproc, time.time(), job_id),
            )
            if cur.rowcount == 1:
                atomic_write_text(self.job_dir(job_id) / "job.yaml", text)
                self._mirror(db, job_id)
        return cur.rowcount == 1

    def set_job_pid(self, job_id: int, pid: int) -> bool:
        """Record the training process; True when a stop was requested before it was known."""
        with self.tx() as db:
            db.execute("UPDATE jobs SET job_pid = ? WHERE id = ?", (pid, job_id))
            row = db.execute("SELECT stop_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            self._mirror(db, job_id)
        return bool(row["stop_requested"])

    def finish(self, job_id: int, state: str, reason: str | None, exit_code: int | None) -> None:
        assert state in FINAL_STATES
        with self.tx() as db:
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, exit_code = ?, ended_at = ? WHERE id = ?",
                (state, reason, exit_code, time.time(), job_id),
            )
            self._mirror(db, job_id)

    def request_stop(self, job_id: str) -> tuple[Job, str]:
        """Queued -> stopped at once; running -> flagged (the caller signals the process). Returns the action."""
        job = self.job(job_id)
        with self.tx() as db:
            state = db.execute("SELECT state FROM jobs WHERE id = ?", (job.id,)).fetchone()["state"]
            if state == "queued":
                db.execute(
                    "UPDATE jobs SET state = 'stopped', reason = 'cancelled before it started', ended_at = ? "
                    "WHERE id = ?",
                    (time.time(), job.id),
                )
                action = "cancelled"
            elif state == "running":
                db.execute("UPDATE jobs SET stop_requested = 1 WHERE id = ?", (job.id,))
                action = "stopping"
            else:
                action = state
            self._mirror(db, job.id)
        return self.job(job.id), action

    def orphan_update(self, job: Job, **fields: Any) -> bool:
        """Update a running or stopping job that `job.worker_pid` owned, only if nothing changed it meanwhile (two commands
        that notice the same dead worker agree on one outcome). False when it had changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ('running', 'stopping') AND worker_pid IS ?",
                (*fields.values(), job.id, job.worker_pid),
            )
            self._mirror(db, job.id)
        return cur.rowcount == 1
