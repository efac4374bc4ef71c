"""Phase postgres: ingest and pushes with one instance on PostgreSQL, ingest with two."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import SandboxProc, median_run
from bench.phases.ingest import ingest
from bench.phases.pushes import pushes
from courierd.devtools.localbroker import LocalBroker


def postgres_phases(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    scale: float,
    reps: range,
    server: str,
) -> dict[str, Any]:
    """One instance on PostgreSQL (ingest, pushes) and two instances (ingest), each run
    on a database of its own, made and dropped here."""
    import psycopg

    out: dict[str, Any] = {}
    admin = psycopg.connect(server, autocommit=True)

    def fresh(tag: str) -> str:
        name = f"courierd_bench_{int(time.time())}_{tag}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return server.rsplit("/", 1)[0] + f"/{name}"

    made: list[str] = []
    try:
        n = int(40_000 * scale)
        out["ingest_pg"] = median_run(
            [ingest(broker, sandbox, root, n, 0.95, f"pg{i}", pg_url=fresh(f"i{i}")) for i in reps]
        )
        out["ingest_pg2"] = median_run(
            [
                ingest(
                    broker, sandbox, root, n, 0.95, f"pgx{i}", pg_url=fresh(f"x{i}"), instances=2
                )
                for i in reps
            ]
        )
        out["pushes_pg"] = median_run(
            [
                pushes(broker, sandbox, root, int(5_000 * scale), f"pp{i}", fresh(f"p{i}"))
                for i in reps
            ]
        )
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    return out
