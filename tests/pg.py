"""PostgreSQL for tests: the local server (127.0.0.1:5432, user postgres, trust auth, or
COURIERD_TEST_PG_URL), one database per test, dropped afterwards.

A template database, migrated once per run, makes each test's database a fast copy.
Every database the suite creates is named `courierd_t_<start time>_<run>_...`: at the
end of a run its own are dropped, and at the next start whatever a crashed run left
behind (started hours ago; never a run still going beside this one) is dropped too.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

ADMIN_URL = os.environ.get("COURIERD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RUN = f"{int(time.time())}_{uuid.uuid4().hex[:6]}"
PREFIX = "courierd_t_"
STALE_S = 3 * 3600  # a run that started this long ago is over


def url_of(dbname: str) -> str:
    base = ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


def available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return f"PostgreSQL not reachable at {ADMIN_URL}: {e}"
    return None


def _admin(sql: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


_template: str | None = None


def template() -> str:
    """A database with courierd's schema, made once per run."""
    global _template
    if _template is None:
        from courierd.store.postgres import PostgresDatabase

        name = f"{PREFIX}{RUN}_template"
        _admin(f'CREATE DATABASE "{name}"')
        PostgresDatabase(url_of(name)).close()
        _template = name
    return _template


@contextmanager
def database(from_template: bool = True) -> Iterator[str]:
    """A fresh database (its URL) for the length of the block; dropped afterwards."""
    name = f"{PREFIX}{RUN}_{uuid.uuid4().hex[:10]}"
    copy = f' TEMPLATE "{template()}"' if from_template else ""
    _admin(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield url_of(name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_leftovers(everything: bool = False) -> list[str]:
    """Drop test databases of runs that crashed hours ago, or (`everything`, at the end
    of a run) every database of this run."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (PREFIX + "%",)
            )
        ]
    dropped = []
    for name in names:
        ours = name.startswith(f"{PREFIX}{RUN}_")
        started = name[len(PREFIX) :].split("_", 1)[0]
        stale = not started.isdigit() or int(started) < time.time() - STALE_S
        if (everything and ours) or (not ours and stale):
            _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            dropped.append(name)
    return dropped
