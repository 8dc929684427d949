"""The one folder lock: a run folder and a merge output folder are each written by one process.

A scheduled pipeline run overlapping a manual one would otherwise take the other's finished files
for stale and delete or overwrite them. ``flock`` dies with its process, so a killed run never
leaves a lock behind for the rerun to trip on; the file holds the holder's pid while it is held
(for the other process's message) and is emptied on release, so two finished folders of the same
work stay byte-identical.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

LOCK_NAME = ".slm-dist.lock"


class FolderLock:
    """``with FolderLock(folder, busy):`` or ``acquire()`` / ``release()``. ``busy(lock_path, holder_pid)``
    builds the error raised when another process holds the folder."""

    def __init__(self, folder: Path, busy: Callable[[Path, str], Exception]):
        self.path = Path(folder) / LOCK_NAME
        self._busy = busy
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self._busy(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
