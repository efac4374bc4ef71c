"""The operator commands: outbox status, parked pushes, dead letters, retry, backup.

All of these work while the daemon runs; `retry` writes in one short transaction,
and the dispatcher picks the pushes up on its next pass.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from courierd.config import Settings
from courierd.errors import InputError
from courierd.store import open_store

EXIT_OK = 0


def operate(args: argparse.Namespace, settings: Settings) -> int:
    """outbox status/failed/retry, dead-letters, backup."""
    if args.command == "backup":
        return _backup(args, settings)
    with open_store(settings.store) as store:
        q = store.queries
        if args.command == "dead-letters":
            rows = q.dead_letters(args.limit, args.reason)
            columns = ["id", "received_at", "reason", "topic", "size", "detail"]
            return _emit(args, rows, lambda: table(rows, columns))
        if args.outbox_command == "status":
            status = q.outbox_status(time.time())
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
    db = SqliteDatabase(settings.store.path, busy_timeout_s=settings.store.busy_timeout_s)
    try:
        db.backup(destination)
    finally:
        db.close()
    size = destination.stat().st_size
    print(f"backed up {settings.store.path} to {destination} ({size} bytes)")
    return EXIT_OK


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
