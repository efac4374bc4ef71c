"""One daemon per SQLite database (CONTRACT.md 4.13): an exclusive flock beside the file.

Two daemons on one file would dispatch the same rows, and the broker would throw one
MQTT client off for the other in a loop. The lock lives as long as the process that
took it; the kernel drops it when that process dies, even by kill -9. Order and
operator commands never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from courierd.errors import StoreError


class DaemonLock:
    """`acquire()` or raise StoreError naming the holder; `release()` on the way out."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(f"{db_path}.lock")
        self.db_path = db_path
        self._file: IO[str] | None = None

    def acquire(self) -> DaemonLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as e:
            raise StoreError(f"cannot open database {self.db_path}: {e}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"another courierd daemon (pid {holder}) holds {self.db_path}; "
                "one daemon per database"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
