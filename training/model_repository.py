"""Writing into a model repository (`NAME/VERSION/`) so that a crash never leaves a loadable half-written version.

A new version is built in a hidden temporary directory `NAME/.tmp-<uuid>` (servers and
`mmserve validate` ignore names starting with "."), fsynced, and renamed into place; any failure
deletes it. A whole model directory is replaced by renaming the old one aside first.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from training.export_error import ExportError

TMP_PREFIX = ".tmp-"


def existing_versions(model_dir: Path) -> list[int]:
    """The integer versions present in `model_dir`, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: Path) -> int:
    return max(existing_versions(model_dir), default=0) + 1


def refuse_existing(target: Path) -> None:
    if target.exists():
        raise ExportError(f"{target} already exists: pick another --version or leave it out")


@contextmanager
def staging_directory(model_dir: Path) -> Iterator[Path]:
    """A fresh hidden directory inside `model_dir`, deleted if the block fails (publish it before leaving)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(staged: Path, target: Path) -> Path:
    """fsync every file of `staged`, then rename it to `target` (which must not exist yet)."""
    _fsync_tree(staged)
    refuse_existing(target)
    os.rename(staged, target)
    _fsync_dir(target.parent)
    return target


def swap_in(staged: Path, target: Path) -> None:
    """Replace `target` by `staged` (same file system): rename the old one aside, rename, delete the old one."""
    old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
