"""The operator commands: outbox status, parked pushes, dead letters, retry, backup,
compact.

All of these but `compact` work while the daemon runs; `retry` writes in one short
transaction, and the dispatcher picks the pushes up on its next pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from courierd.config import Settings
from courierd.errors import InputError, StoreError
from courierd.store import open_store

EXIT_OK = 0


def operate(args: argparse.Namespace, settings: Settings) -> int:
    """outbox status/failed/retry, dead-letters, backup, compact."""
    if args.command == "backup":
        return _backup(args, settings)
    if args.command == "compact":
        return _compact(settings)
    with open_store(settings.store) as store:
        q = store.queries
        if args.command == "dead-letters":
            rows = q.dead_letters(args.limit, args.reason)
            columns = ["id", "received_at", "reason", "topic", "size", "detail"]
            return _emit(args, rows, lambda: table(rows, columns))
        if args.outbox_command == "status":
            status = q.outbox_status(store.clock())
            return _emit(args, status, lambda: "\n".join(f"{k}: {v}" for k, v in status.items()))
        if args.outbox_command == "failed":
            rows = q.failed_pushes(args.limit)
            columns = ["order_id", "status", "attempts", "last_error"]
            return _emit(args, rows, lambda: table(rows, columns))
        if args.all == (args.order_id is not None):
            raise InputError("give either ORDER_ID or --all")
        count = q.retry_failed(args.order_id, time.time())  # InputError (exit 2) when none
        return _emit(args, {"retried": count}, lambda: f"{count} push(es) will be sent again")


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    from courierd.store.sqlite import SqliteDatabase

    if settings.store.url is not None:
        raise InputError(
            "backup copies courierd's SQLite file; with PostgreSQL use its own tools, e.g. "
            'pg_dump --format=custom --file=courierd.dump "$COURIERD_STORE__URL" '
            "(and pg_restore to bring it back)"
        )
    destination = args.destination
    if destination.exists():
        raise InputError(f"{destination} exists; choose a new file")
    # Read-only: a copy needs no migration, and a newer courierd's backup, taken before
    # the old daemon is restarted (README "Upgrade"), must not migrate under it.
    db = SqliteDatabase(
        settings.store.path, busy_timeout_s=settings.store.busy_timeout_s, readonly=True
    )
    try:
        db.backup(destination)
    finally:
        db.close()
    size = destination.stat().st_size
    print(f"backed up {settings.store.path} to {destination} ({size} bytes)")
    return EXIT_OK


def _compact(settings: Settings) -> int:
    """Switch the SQLite file to incremental auto-vacuum and rewrite it (VACUUM), with the
    daemon stopped: a database made by 0.1.0 reuses freed pages but never gives them
    back, and only a VACUUM changes that. It takes as long as the file is big, hence a
    command, not something the daemon does as it starts."""
    from courierd.daemonlock import DaemonLock
    from courierd.store.sqlite import SqliteDatabase

    if settings.store.url is not None:
        raise InputError(
            "compact rewrites courierd's SQLite file; PostgreSQL's autovacuum reuses freed "
            "space by itself (its VACUUM FULL gives it back, locking the table meanwhile)"
        )
    path = settings.store.path
    if not path.is_file():
        raise InputError(f"no database at {path}")
    lock = DaemonLock(path).acquire()  # StoreError (exit 1) while the daemon runs
    try:
        before = _size(path)
        # VACUUM builds the new file in SQLite's temporary folder (else TMPDIR or /var/tmp,
        # often a small file system), then writes it back through the WAL: both beside the
        # database, where the room is checked, unless the operator chose a folder.
        chosen = os.environ.get("SQLITE_TMPDIR")
        temporary = Path(chosen) if chosen else path.parent
        db = SqliteDatabase(path, busy_timeout_s=settings.store.busy_timeout_s)
        try:
            in_use = db.value("PRAGMA page_count") - db.value("PRAGMA freelist_count")
            _room_for(in_use * db.value("PRAGMA page_size"), path.parent, temporary)
            was = db.compact(temporary)
        finally:
            db.close()
    finally:
        lock.release()
    after = _size(path)
    print(
        f"compacted {path}: {before} -> {after} bytes; auto-vacuum {was} -> incremental "
        "(retention now gives freed pages back)"
    )
    return EXIT_OK


def _room_for(size: int, folder: Path, temporary: Path) -> None:
    """Refuse unless the rewrite has room: a copy of the `size` bytes in use in SQLite's
    temporary folder and another through the WAL beside the database (twice that on
    one file system)."""
    try:
        same = folder.stat().st_dev == temporary.stat().st_dev
        free = shutil.disk_usage(folder).free
        free_temporary = free if same else shutil.disk_usage(temporary).free
    except OSError as e:
        raise StoreError(f"compact cannot check the free space: {e}") from e
    if same and free < 2 * size:
        raise StoreError(f"compact needs up to {2 * size} bytes free in {folder}; {free} are")
    if free < size:
        raise StoreError(f"compact needs up to {size} bytes free in {folder}; {free} are")
    if free_temporary < size:
        raise StoreError(
            f"compact needs up to {size} bytes free in SQLite's temporary folder {temporary} "
            f"(SQLITE_TMPDIR); {free_temporary} are"
        )


def _size(path: Path) -> int:
    """The database file and its WAL, in bytes."""
    wal = path.with_name(path.name + "-wal")
    return int(path.stat().st_size + (wal.stat().st_size if wal.exists() else 0))


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else text())
    return EXIT_OK


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain aligned columns for humans (--json is for scripts)."""
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)
