"""Atomic writes: a reader never sees a half-written file or folder, a crash leaves the old one intact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_tree(folder: Path) -> None:
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def replace_dir(tmp: Path, folder: Path) -> None:
    """fsync a fully written temporary folder, then move it to `folder` (replacing an older one)."""
    fsync_tree(tmp)
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path` (a leftover from a killed write is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
