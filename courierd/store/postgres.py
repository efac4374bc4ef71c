"""The PostgreSQL backend (psycopg 3): the same store, shared by several instances.

What differs from SQLite is only what sharing needs. Rows a batch rewrites are locked
(`FOR UPDATE`, orders before couriers, each sorted, so instances never deadlock);
claims skip rows another instance holds (`SKIP LOCKED`) and carry a lease
(`concurrent = True` tells the outbox). Migrations run under a transaction-level
advisory lock, so instances starting together migrate once. SQL is written with `?`
placeholders for both engines and translated here.

Errors: a lost connection, a server shutting down, a full disk, a serialization
failure, a deadlock or a write refused by a read-only server (a standby) mean "try
again" (`StoreUnavailable`); the connection is opened again on the next use. Anything
else (a NUL byte in a text value, say) is the data's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from courierd.config import redact
from courierd.errors import StoreError, StoreUnavailable
from courierd.store.cluster import NOW
from courierd.store.db import Database
from courierd.store.schema import POSTGRES_MIGRATIONS

log = logging.getLogger(__name__)

MIGRATION_LOCK = 7_204_301  # pg_advisory_xact_lock key: one migrator at a time


def _is_unavailable(error: Exception) -> bool:
    """The database failed this time (connection, server, resources, contention)."""
    return isinstance(
        error,
        psycopg.OperationalError
        | pg_errors.InsufficientResources
        | pg_errors.SerializationFailure
        | pg_errors.DeadlockDetected
        | pg_errors.LockNotAvailable
        | pg_errors.AdminShutdown
        | pg_errors.CannotConnectNow
        | pg_errors.IdleInTransactionSessionTimeout
        | pg_errors.IdleSessionTimeout,
    ) or (isinstance(error, psycopg.InterfaceError) and "closed" in str(error))


class PostgresDatabase(Database):
    dialect = "postgres"
    for_update = " FOR UPDATE"
    skip_locked = " SKIP LOCKED"
    concurrent = True
    at_once = f"least(?, {NOW})"

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        readonly: bool = False,
        migrations: Sequence[Sequence[str]] = POSTGRES_MIGRATIONS,
        connect_timeout_s: float = 10.0,
        idle_in_transaction_s: float = 15.0,
        application_name: str = "courierd",
    ) -> None:
        self.url = url
        self.application_name = application_name[:63]
        self._idle_ms = int(idle_in_transaction_s * 1000)
        self.location = redact(url)
        self._migrations = tuple(migrations)
        self._connect_timeout = connect_timeout_s
        self._sql: dict[str, str] = {}
        self.readonly = readonly
        try:
            self.conn = self._connect()
            if readonly:
                self._check_version()
            elif migrate:
                self._migrate()
        except StoreError:
            raise
        except psycopg.Error as e:
            raise StoreError(f"cannot open database {self.location}: {e}") from e

    def _connect(self) -> psycopg.Connection[Any]:
        # A transaction left idle means its process is stopped (SIGSTOP, a debugger):
        # the server ends it, so that its row locks do not hold the cluster up. A
        # read-only store's sessions (each one, reconnects included) refuse to write.
        options = f"-c idle_in_transaction_session_timeout={self._idle_ms}"
        if self.readonly:
            options += " -c default_transaction_read_only=on"
        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=int(self._connect_timeout),
                options=options,
                # Who is who, for DBAs, and for the cluster: it ends the sessions of an
                # instance that stopped beating (cluster.py).
                application_name=self.application_name,
            )
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot connect to {self.location}: {e}") from e

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, opened again if the last one was lost."""
        if self.conn.closed or self.conn.broken:
            self.conn = self._connect()
        return self.conn

    def _lost(self, error: psycopg.Error) -> bool:
        """The database failed (or the connection is gone), rather than the data."""
        return _is_unavailable(error) or self.conn.closed or self.conn.broken

    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return out

    # -- Database ---------------------------------------------------------------------

    def _read_only(self, error: psycopg.Error) -> StoreError:
        """A write refused as read-only. Through a store opened read-only (replay,
        stores suggest, the API's reads): a mistake of courierd's, not the database
        failing, so no retry would help. Through a read-write store, the server is the
        read-only one (failover to a standby, default_transaction_read_only): an outage,
        so StoreUnavailable, and the session is dropped so that the next use opens
        another (on the new primary, once there is one)."""
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not self.readonly:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            return StoreUnavailable(
                f"cannot write to {self.location}: the server is read-only (PostgreSQL: {first})"
            )
        return StoreError(
            f"cannot write to {self.location}: this store was opened read-only "
            f"(PostgreSQL: {first})"
        )

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            return self._live().execute(self._translate(sql), tuple(params) or None)
        except pg_errors.ReadOnlySqlTransaction as e:
            raise self._read_only(e) from e
        except psycopg.Error as e:
            if self._lost(e):
                raise StoreUnavailable(f"database {self.location}: {e}") from e
            raise

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if not batch:
            return
        try:
            with self._live().cursor() as cur:
                cur.executemany(self._translate(sql), batch)
        except pg_errors.ReadOnlySqlTransaction as e:
            raise self._read_only(e) from e
        except psycopg.Error as e:
            if self._lost(e):
                raise StoreUnavailable(f"database {self.location}: {e}") from e
            raise

    def _begin(self) -> contextlib.AbstractContextManager[Any]:
        """BEGIN, on a new connection if the one kept idle turns out to be gone (the
        server or a proxy ended it meanwhile): nothing of this transaction was sent yet,
        so trying once more is safe, and a lost idle connection is no error."""
        for attempt in (1, 2):
            try:
                tx = self._live().transaction()
                tx.__enter__()
                return tx
            except psycopg.Error as e:
                if attempt == 2 or not self._lost(e):
                    raise StoreUnavailable(f"cannot write to {self.location}: {e}") from e
                log.info("postgres.reconnecting reason=%s", str(e).strip()[:200])
        raise AssertionError("unreachable")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        tx = self._begin()
        try:
            yield
        except BaseException as e:
            with contextlib.suppress(psycopg.Error):
                tx.__exit__(type(e), e, e.__traceback__)
            if isinstance(e, psycopg.Error) and self._lost(e):
                raise StoreUnavailable(f"write to {self.location} failed: {e}") from e
            raise
        try:
            tx.__exit__(None, None, None)
        except pg_errors.ReadOnlySqlTransaction as e:
            raise self._read_only(e) from e
        except psycopg.Error as e:
            if self._lost(e):
                raise StoreUnavailable(f"commit to {self.location} failed: {e}") from e
            raise

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.close()

    @property
    def schema_version(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        found = self.value("SELECT max(version) FROM schema_version")
        return 0 if found is None else int(found)

    # -- PostgreSQL only --------------------------------------------------------------

    def _check_version(self) -> None:
        """A read-only store never migrates (a replay must not write, even a schema):
        a database behind this courierd is an error telling what to upgrade first."""
        latest = len(self._migrations)
        version = 0
        if self.value("SELECT to_regclass('schema_version') IS NOT NULL"):
            version = int(self.value("SELECT coalesce(max(version), 0) FROM schema_version"))
        if version > latest:
            raise StoreError(
                f"database {self.location} has schema version {version}, newer than "
                f"this courierd understands ({latest}); upgrade courierd"
            )
        if version < latest:
            raise StoreError(
                f"database {self.location} has schema version {version}, older than this "
                f"courierd's ({latest}), and a read-only command does not migrate it: "
                "upgrade the daemon first (this version's `courierd run` migrates it as "
                "it starts), then run this again"
            )

    def _migrate(self) -> None:
        """Apply missing migrations, each atomic with its version row; one migrator at a
        time (instances starting together wait for each other, then find nothing to do)."""
        latest = len(self._migrations)
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            version = self.schema_version
            if version > latest:
                raise StoreError(
                    f"database {self.location} has schema version {version}, newer than "
                    f"this courierd understands ({latest}); upgrade courierd"
                )
            for number in range(version + 1, latest + 1):
                for statement in self._migrations[number - 1]:
                    self.execute(statement)
                self.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
