"""One daemon per SQLite database (CONTRACT.md 4.13, 12): an exclusive flock on the file.

Two daemons on one file would dispatch the same rows, and the broker would throw one
MQTT client off for the other in a loop. The lock is taken on the database file
itself, so it belongs to the file's identity (device and inode), not to the path it
was named by: a second daemon started through a symlink or a hard link to the same
file finds it taken. (A `.lock` file beside the path, as before, was one per spelling.)

flock and SQLite's own locks do not meet: SQLite takes fcntl (POSIX) byte-range locks,
which on Linux are a separate kind. The flock belongs to the open file description,
so SQLite closing its own descriptors of the file never drops it; the kernel drops it
when the process that took it dies, even by kill -9 (its descriptor is close-on-exec,
and the daemon's workers are spawned: they never hold it). Order and operator
commands never take it, and do not migrate the database while another process holds
it (`held_elsewhere`, store/sqlite.py). The process that holds it says so to the
workers it starts, which inherit its environment (HOLDER_ENV): they migrate as they
start, whatever pid namespace /proc/locks speaks of.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from courierd.errors import StoreError

PROC_LOCKS = Path("/proc/locks")
# Set while this process holds the daemon lock: the file's "device:inode".
HOLDER_ENV = "COURIERD_HOLDS_DAEMON_LOCK"


class DaemonLock:
    """`acquire()` or raise StoreError naming the holder; `release()` on the way out."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._fd: int | None = None

    def acquire(self) -> DaemonLock:
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            # An empty file is what SQLite makes of a new database too.
            fd = os.open(self.db_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise StoreError(f"cannot open database {self.db_path}: {e}") from None
        if not _exclusive(fd):
            holder = holder_pid(os.fstat(fd)) or "unknown"
            os.close(fd)
            raise StoreError(
                f"another courierd daemon (pid {holder}) holds {self.db_path}; "
                "one daemon per database"
            ) from None
        self._fd = fd
        os.environ[HOLDER_ENV] = _identity(os.fstat(fd))
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.environ.pop(HOLDER_ENV, None)
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _exclusive(fd: int, tries: int = 10, pause_s: float = 0.05) -> bool:
    """The exclusive flock, tried for about half a second: a command's probe
    (`held_elsewhere`) holds a shared one for two system calls."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < tries:
                time.sleep(pause_s)
    return False


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


# One descriptor per database file a process probed, never closed: on Linux, closing
# any descriptor of a file drops every POSIX lock the process holds on it, SQLite's
# included (the one a WAL connection keeps on the database file for its whole life);
# another process could then take the file for its own, checkpoint and delete the WAL
# under this one's writes. (SQLite's own layer defers such closes; this cannot.)
_probes: dict[str, int] = {}


def held_elsewhere(db_path: Path) -> str | None:
    """Who holds the daemon lock on this file, if another process than this one and the
    workers it started does: its pid as /proc/locks tells ("unknown" if it does not);
    None if nobody holds it (or the file does not exist). Asks the kernel (a shared
    flock tried and at once given back), not /proc/locks."""
    try:
        st = os.stat(db_path)
    except OSError:
        return None
    identity = _identity(st)
    if os.environ.get(HOLDER_ENV) == identity:
        return None  # the daemon itself, or a worker it started: no descriptor opened
    fd = _probes.get(identity)
    if fd is None:
        try:
            fd = os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        _probes[identity] = fd
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return holder_pid(st) or "unknown"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


def holder_pid(st: os.stat_result) -> str | None:
    """The pid holding a flock on the file `st` describes, from Linux's /proc/locks
    (lines like `1: FLOCK  ADVISORY  WRITE 4242 fe:00:5578829 0 EOF`); None if unknown."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    flocks = [p for p in (line.split() for line in lines) if len(p) >= 6 and p[1] == "FLOCK"]
    exact = [p[4] for p in flocks if p[5] == device]
    # Some filesystems (btrfs subvolumes, overlays) report another device in stat than
    # in /proc/locks: then the inode alone, if only one flock has it.
    same_inode = [p[4] for p in flocks if p[5].rsplit(":", 1)[-1] == str(st.st_ino)]
    if exact:
        return exact[0]
    return same_inode[0] if len(same_inode) == 1 else None
