"""The private directory of MMSERVE_WORKERS > 1 (0700: the engine's Unix socket, PROMETHEUS_MULTIPROC_DIR), and
its removal by whichever process of the server runs last.

The engine creates it before starting the front-ends and, normally exiting after all of them, removes it. An
engine killed outright (SIGKILL, the OOM killer) removes nothing: its front-ends notice the lost connection, drain
and exit, and the last of them removes it. Which one is last is settled by a lock file in the directory, not by
counting: every process of the server holds a shared `flock` on it while it runs (the kernel drops the lock of a
process that dies, however it dies); a front-end leaving trades its shared lock for an exclusive one without
waiting, which succeeds only once no other process of the server holds the lock. Of front-ends leaving together,
the last to let go of its shared lock gets the exclusive one, so one of them always removes the directory.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

LOCK = "lock"


class PrivateDir:
    """The directory at `path`, with this process's shared lock on it held from now until `remove` / `leave`."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the front-ends
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    @classmethod
    def create(cls) -> PrivateDir:
        return cls(Path(tempfile.mkdtemp(prefix="mmserve-workers-")))  # 0700

    def remove(self) -> None:
        """The engine, once its front-ends have exited."""
        os.close(self._fd)
        shutil.rmtree(self.path, ignore_errors=True)

    def leave(self) -> None:
        """A front-end exiting: removes the directory if no other process of the server still runs."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # drops the shared lock first, then tries
        except BlockingIOError:
            return  # the engine or another front-end still runs: the last one out removes it
        finally:
            os.close(self._fd)
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["PrivateDir"]
