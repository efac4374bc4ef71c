"""The one seam between courierd's SQL and a database engine.

The store's jobs (batch writer, outbox, queries, retention) are written once against
`Database`, in SQL both engines understand, with `?` placeholders. A backend is one
subclass: it opens the connection, runs its migrations, maps the engine's errors onto
courierd's, and says how to lock rows (`for_update`, `skip_locked`), which only
PostgreSQL needs: SQLite's BEGIN IMMEDIATE already makes every write transaction
exclusive.

Errors: `StoreUnavailable` means the database itself is the problem (disk full,
locked past the busy timeout, connection lost): nothing was written, try the same
work again later. Any other exception escaping a transaction came from the data.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence, Sized
from contextlib import contextmanager
from typing import Any, ClassVar

Row = tuple[Any, ...]


class Database(abc.ABC):
    """A connection to courierd's database, migrated on open. One per thread."""

    dialect: ClassVar[str]
    # Appended to a SELECT that reads rows the transaction will rewrite.
    for_update: ClassVar[str] = ""
    # Appended to a claim: rows another instance holds are skipped, not waited for.
    skip_locked: ClassVar[str] = ""
    # Several instances may share this database: claims then carry a lease.
    concurrent: ClassVar[bool] = False
    # A column that addresses a row more cheaply than its primary key, and that stays
    # the row's until the transaction that read it ends ("" if the engine has none).
    row_address: ClassVar[str] = ""
    # `changes.seq` of 'orders' moves with every write to orders and stores (triggers,
    # schema.py): the ingest writer may then skip reading rows it already holds.
    change_marker: ClassVar[bool] = False
    # The engine understands UPDATE ... FROM (a join): SQLite from 3.33 on.
    update_from: ClassVar[bool] = True
    # Put after UPDATE or INSERT in the ingest writer's statements of every status and
    # fix (transitions, pushes, event ids, tracks, kept fixes; not its DO UPDATE upserts,
    # which SQLite runs with ABORT anyway): a failing row then ends the statement without
    # undoing its earlier rows, which the transaction's rollback undoes anyway (the
    # writer never goes on after an error). SQLite's " OR FAIL" spares its statement
    # journal.
    or_fail: ClassVar[str] = ""
    # The due time of a push due at once, for a `now` parameter: on a shared database
    # never later than the database's own now, since the instances claim on its clock.
    at_once: ClassVar[str] = "?"
    # The columns of the outbox's unique index that tells pushes apart (schema.py): the
    # same rows either way, since the idempotency key is a function of order and status.
    push_key: ClassVar[str] = "idempotency_key"

    #: Where the data lives, for messages (a path, or a URL without its password).
    location: str

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the driver's cursor."""

    @abc.abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for each row (no-op for none)."""

    @abc.abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction: committed on success, rolled back on any error."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def schema_version(self) -> int: ...

    def insert_rows(
        self, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = ""
    ) -> None:
        """`head` (an INSERT up to and with VALUES) `row` (one row's placeholders) `tail`
        (an ON CONFLICT clause, say) for each of `rows`, in their order. Here one
        statement per row (`executemany`); an engine may put several rows in one."""
        self.executemany(f"{head} {row}{tail}", rows)

    def for_update_of(self, alias: str) -> str:
        """`for_update` limited to one table of a join (PostgreSQL refuses to lock the
        nullable side of an outer join)."""
        return f"{self.for_update} OF {alias}" if self.for_update else ""

    def reclaim_free_pages(self, step: int) -> int:
        """Give freed space back to the file system, if the engine needs telling."""
        return 0

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self.execute(sql, params).fetchall())

    def row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        found: Row | None = self.execute(sql, params).fetchone()
        return found

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        found = self.row(sql, params)
        return None if found is None else found[0]

    def changed(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an UPDATE or DELETE; how many rows it changed."""
        return int(self.execute(sql, params).rowcount)


def placeholders(values: Sized) -> str:
    return ",".join("?" * len(values))


def chunks(values: Iterable[str], size: int = 500) -> Iterator[list[str]]:
    """Distinct values in lists of at most `size`: the bound on one IN (...) list."""
    items = list(dict.fromkeys(values))
    for i in range(0, len(items), size):
        yield items[i : i + size]
