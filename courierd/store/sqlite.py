"""The SQLite backend: one file, WAL, migrations in `user_version`, errors mapped.

WAL lets the order and operator commands read and write while the daemon runs;
`synchronous=FULL` by default, because group commit pays one fsync per batch, not per
message. New databases use incremental auto-vacuum so that retention can give freed
pages back to the file system; older ones reuse them (the file stops growing either way).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

from courierd.errors import StoreError, StoreUnavailable
from courierd.store.db import Database
from courierd.store.schema import SQLITE_MIGRATIONS

if TYPE_CHECKING:
    import sqlite_utils

Migration = Callable[["sqlite_utils.Database"], None]

log = logging.getLogger(__name__)

# Rows per INSERT statement in `insert_rows` (at most 32 x 11 = 352 parameters of the
# 999 an older SQLite allows).
ROWS_PER_INSERT = 32

# The sqlite3 module binds an int, float or str as it is, but asks its adapter registry
# about anything else, None included: with no adapter registered, it then looks up
# `__adapt__` on its protocol type, which raises (and formats) an AttributeError, and
# `__conform__` on the value, before binding NULL: about 2,000 instructions per None
# bound, and a status's rows bind several (a transition's place and fix count, an
# order's times). An adapter for None, a C call that returns None (an empty dict's
# `get`), binds the same NULL for a tenth of that. Process-wide, like every adapter.
_NOTHING: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NOTHING.get)


def _is_unavailable(error: sqlite3.Error) -> bool:
    """The database itself failed (full, locked, I/O, corrupt), not the data written."""
    return isinstance(error, sqlite3.OperationalError) or type(error) is sqlite3.DatabaseError


class SqliteDatabase(Database):
    dialect = "sqlite"
    # Only a VACUUM renumbers the rowids of a table without an INTEGER PRIMARY KEY, and
    # it cannot run inside a write transaction.
    row_address = "rowid"
    change_marker = True
    update_from = sqlite3.sqlite_version_info >= (3, 33, 0)
    push_key = "order_id, status"  # schema.py, _SQLITE_11
    # A statement that may write several rows and stop on a constraint keeps a statement
    # journal, a copy of each page before its first change in the statement, to undo
    # only the statement: with OR FAIL nothing is undone, so nothing is copied. 0.3 to
    # 0.9 µs of CPU per track rewritten, about 0.8 µs a status (docs/performance.md).
    or_fail = " OR FAIL"

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 10.0,
        readonly: bool = False,
        migrations: Sequence[Migration] = SQLITE_MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self.location = str(path)
        self.busy_timeout_ms = int(busy_timeout_s * 1000)
        self._migrations = tuple(migrations)
        self.readonly = readonly
        self._said_not_incremental = False
        try:
            if readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                if str(path) != ":memory:":
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.conn = conn
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            if not readonly:
                if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only before any table
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self.conn.close()
            raise StoreError(f"cannot open database {path}: {e}") from e
        except StoreError:
            self.conn.close()
            raise

    # -- Database ---------------------------------------------------------------------

    def _refused(self, error: sqlite3.Error) -> StoreError | None:
        """A write through a store opened read-only (replay, stores suggest, the API's
        reads): courierd's mistake, which no retry would mend, so not StoreUnavailable.
        Only SQLITE_READONLY itself (what a write through mode=ro gets): the extended
        codes (READONLY_RECOVERY, _CANTINIT, _CANTLOCK, _DBMOVED) also come from plain
        reads through mode=ro (a WAL needing recovery, say), and are the database
        failing this time (`_is_unavailable`)."""
        code = getattr(error, "sqlite_errorcode", None)
        if self.readonly and code == sqlite3.SQLITE_READONLY:
            return StoreError(
                f"cannot write to {self.location}: this store was opened read-only "
                f"(SQLite: {error})"
            )
        return None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as e:
            if refused := self._refused(e):
                raise refused from e
            if _is_unavailable(e):
                raise StoreUnavailable(f"database {self.location}: {e}") from e
            raise

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        # No rows, no statement: the batch writer has a dozen kinds of rows, most of
        # them empty in a batch of pings, and each empty executemany still costs ~2.5 µs
        # (a fixed cost per batch). Generators are left to the driver as they come.
        if isinstance(rows, list | tuple) and not rows:
            return
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.Error as e:
            if refused := self._refused(e):
                raise refused from e
            if _is_unavailable(e):
                raise StoreUnavailable(f"database {self.location}: {e}") from e
            raise

    def insert_rows(
        self, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = ""
    ) -> None:
        """Several rows per statement: `executemany` runs the statement once per row, and
        each run opens and closes a cursor on the table and on each of its indexes (an
        outbox row: six) and ends the statement (about a quarter of a status's
        transition, push and event rows). ROWS_PER_INSERT rows at a time, then the rest
        in halves (16, 8, ..., 1): a handful of statement texts per table, each prepared
        once and kept in the connection's statement cache. In the rows' order, so ids
        come out as one statement per row gives them."""
        step, start = ROWS_PER_INSERT, 0
        while start < len(rows):
            while start + step > len(rows):
                step //= 2
            end = start + step
            sql = f"{head} {','.join([row] * step)}{tail}"
            if step == ROWS_PER_INSERT:  # most rows: the same statement, run again
                runs = [
                    list(chain.from_iterable(rows[i : i + step]))
                    for i in range(start, len(rows) - step + 1, step)
                ]
                self.executemany(sql, runs)
                start += step * len(runs)
                continue
            self.execute(sql, list(chain.from_iterable(rows[start:end])))
            start = end

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT; ROLLBACK on any error, then re-raised.

        SQLite rolls some failures back by itself (SQLITE_FULL, some I/O errors); a
        second ROLLBACK would then fail and hide the real error, hence `in_transaction`.
        """
        try:
            self._begin_immediate()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"cannot write to {self.location}: {e}") from e
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException as e:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error) and _is_unavailable(e):
                raise StoreUnavailable(f"write to {self.location} failed: {e}") from e
            raise

    def _begin_immediate(self) -> None:
        """Take the write lock, waiting up to busy_timeout for another writer.

        SQLite's own busy handler sleeps 1, 2, 5, 10, … up to 100 ms between tries, so a
        writer that finds the lock taken for 3 ms comes back 8 ms later, and one that
        waits out a 100 ms batch loses up to 50 ms more. The ingest writer and the
        dispatcher's results alternate on the lock all day: here they try again every
        millisecond instead.
        """
        conn = self.conn
        conn.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + self.busy_timeout_ms / 1000
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    code = getattr(e, "sqlite_errorcode", sqlite3.SQLITE_BUSY)
                    busy = code & 0xFF == sqlite3.SQLITE_BUSY  # extended codes included
                    if not busy or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.001)
        finally:
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # -- SQLite only ------------------------------------------------------------------

    def _migrate(self) -> None:
        """Apply missing migrations, each atomic with its version bump."""
        latest = len(self._migrations)
        version = self.schema_version
        if version > latest:
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this "
                f"courierd understands ({latest}); upgrade courierd"
            )
        if version == latest:
            return
        self._refuse_under_an_older_daemon(version, latest)
        import sqlite_utils  # only when there is schema to build: it costs ~13 MB

        db = sqlite_utils.Database(self.conn)
        for number in range(version + 1, latest + 1):
            try:
                with self.transaction():
                    if self.schema_version >= number:  # another process just did it
                        continue
                    self._migrations[number - 1](db)
                    self.conn.execute(f"PRAGMA user_version={number}")
            except Exception as e:
                raise StoreError(
                    f"migration {number} of {self.path} failed, nothing changed: {e}"
                ) from e

    def _refuse_under_an_older_daemon(self, version: int, latest: int) -> None:
        """An operator command of a newer courierd, run before the daemon was restarted
        after an upgrade, must not migrate the database under the old daemon: that one
        would go on writing as its own schema says (after migration 11, every push it
        writes would fail). The daemon holds its flock on the file (daemonlock.py); its
        own processes migrate as they start. A new file (version 0) is anyone's."""
        if version == 0 or str(self.path) == ":memory:":
            return
        from courierd.daemonlock import held_elsewhere

        holder = held_elsewhere(self.path)
        if holder is None:
            return
        who = "a process in another PID namespace" if holder == "0" else f"pid {holder}"
        raise StoreError(
            f"database {self.path} is at schema version {version}, and this courierd would "
            f"migrate it to {latest} while a courierd daemon ({who}) runs on it: if "
            "that daemon is an older courierd, restart it first (it migrates the database "
            "as it starts); if it is starting, wait until it is ready; then run this again"
        )

    def backup(self, destination: Path) -> None:
        """A consistent copy with SQLite's online backup API, safe while the daemon runs."""
        try:
            target = sqlite3.connect(destination)
            with target:
                self.conn.backup(target)
            target.close()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"backup to {destination} failed: {e}") from e

    def compact(self, temporary: Path) -> str:
        """Switch to incremental auto-vacuum and rewrite the whole file (VACUUM: as long
        as the file is big, every other writer waiting), building the copy in the folder
        `temporary`; the mode it had before."""
        modes = {0: "none", 1: "full", 2: "incremental"}
        try:
            # The process's temporary folder, read by SQLite once at its start (SQLITE_TMPDIR
            # then): a deprecated pragma, and the only way to set it afterwards.
            quoted = str(temporary).replace("'", "''")
            self.conn.execute(f"PRAGMA temp_store_directory = '{quoted}'")
            was = modes.get(self.conn.execute("PRAGMA auto_vacuum").fetchone()[0], "?")
            self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in VACUUM
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"compacting {self.path} failed (nothing changed): {e}") from e
        return was

    def reclaim_free_pages(self, step: int) -> int:
        """Give free pages back to the file system, `step` at a time, keeping 10 % slack
        (reusing a free page is cheaper than growing the file again)."""
        if self.conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # not incremental
            if not self._said_not_incremental:
                log.warning(
                    "store.not_incremental path=%s: freed pages are reused, never given back; "
                    "`courierd compact`, with the daemon stopped, switches the file over",
                    self.path,
                )
                self._said_not_incremental = True
            return 0
        reclaimed = 0
        while True:
            free = int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])
            pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
            if free <= max(256, pages // 10):
                return reclaimed
            self.execute(f"PRAGMA incremental_vacuum({int(step)})").fetchall()
            reclaimed += min(step, free)
