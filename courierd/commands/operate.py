"""The operator commands: outbox status, parked pushes, dead letters, retry, backup.

All of these work while the daemon runs (SQLite WAL); `retry` writes in one short
transaction, and the dispatcher picks the pushes up on its next pass.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from courierd.config import Settings
from courierd.errors import InputError, StoreError
from courierd.store.sqlite import Store

EXIT_OK = 0


def outbox_status(store: Store, now: float) -> dict[str, Any]:
    pending, oldest, failed = store.outbox_stats()
    dead = store.conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    return {
        "pending": pending,
        "oldest_pending_age_s": None if oldest is None else round(now - oldest, 3),
        "failed": failed,
        "dead_letters": dead,
    }


def failed_pushes(store: Store, limit: int) -> list[dict[str, Any]]:
    rows = store.conn.execute(
        "SELECT order_id, status, attempts, last_error, created_at FROM outbox "
        "WHERE state = 'failed' ORDER BY id LIMIT ?",
        (limit,),
    )
    return [
        {"order_id": o, "status": s, "attempts": n, "last_error": e, "created_at": c}
        for o, s, n, e, c in rows
    ]


def dead_letters(store: Store, limit: int, reason: str | None) -> list[dict[str, Any]]:
    rows = store.conn.execute(
        "SELECT id, received_at, topic, reason, detail, payload FROM dead_letters "
        "WHERE ?1 IS NULL OR reason = ?1 ORDER BY id DESC LIMIT ?2",
        (reason, limit),
    )
    return [
        {
            "id": i,
            "received_at": at,
            "topic": t,
            "reason": r,
            "detail": d,
            "payload": bytes(p[:200]).decode("utf-8", errors="replace"),
        }
        for i, at, t, r, d, p in rows
    ]


def retry_failed(store: Store, order_id: str | None, now: float) -> int:
    """Make parked pushes (of one order, or all) pending again, due now; returns how many."""
    with store.transaction() as c:
        changed = c.execute(
            "UPDATE outbox SET state = 'pending', next_attempt_at = ? "
            "WHERE state = 'failed' AND (?2 IS NULL OR order_id = ?2)",
            (now, order_id),
        ).rowcount
    if order_id is not None and changed == 0:
        raise InputError(f"order {order_id!r} has no failed pushes")
    return int(changed)


def backup(store: Store, destination: Path) -> int:
    """Copy the live database with SQLite's online backup API; returns the size in bytes."""
    if destination.exists():
        raise InputError(f"{destination} exists; choose a new file")
    try:
        target = sqlite3.connect(destination)
        with target:
            store.conn.backup(target)
        target.close()
    except (sqlite3.Error, OSError) as e:
        raise StoreError(f"backup to {destination} failed: {e}") from e
    return destination.stat().st_size


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain aligned columns for humans (--json is for scripts)."""
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def operate(args: argparse.Namespace, settings: Settings) -> int:
    """The operator commands: outbox status/failed/retry, dead-letters, backup."""
    store = _store(settings)
    try:
        if args.command == "backup":
            size = backup(store, args.destination)
            print(f"backed up {settings.store.path} to {args.destination} ({size} bytes)")
            return EXIT_OK
        if args.command == "dead-letters":
            rows = dead_letters(store, args.limit, args.reason)
            columns = ["id", "received_at", "reason", "topic", "detail"]
            return _emit(args, rows, lambda: table(rows, columns))
        if args.outbox_command == "status":
            status = outbox_status(store, time.time())
            return _emit(args, status, lambda: "\n".join(f"{k}: {v}" for k, v in status.items()))
        if args.outbox_command == "failed":
            rows = failed_pushes(store, args.limit)
            columns = ["order_id", "status", "attempts", "last_error"]
            return _emit(args, rows, lambda: table(rows, columns))
        if args.all == (args.order_id is not None):
            raise InputError("give either ORDER_ID or --all")
        count = retry_failed(store, args.order_id, time.time())
        return _emit(args, {"retried": count}, lambda: f"{count} push(es) will be sent again")
    finally:
        store.close()


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else text())
    return EXIT_OK


def _store(settings: Settings) -> Store:
    return Store(settings.store.path, synchronous=settings.store.synchronous)
