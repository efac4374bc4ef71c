"""Phase memory: RSS/PSS and time to ready on a large database, beside a nearly empty one."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import STATUSES, Courierd, SandboxProc, forget_session, publish_all, say
from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker
from courierd.store import open_store


def big_database(path: Path, active: int, history: int) -> None:
    """`active` orders mid-chain and `history` delivered transitions/pushes, by bulk SQL."""
    store = open_store(StoreSettings(path=path))
    done_orders = history // len(STATUSES)
    now = time.time()
    db = store.db
    with db.transaction():
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES (?, ?, ?, 'x')",
            ((f"a{o}", "arrived_at_store", f"c{o % 500}") for o in range(active)),
        )
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) "
            "VALUES (?, 'dropoff', ?, 'x')",
            ((f"d{o}", f"c{o % 500}") for o in range(done_orders)),
        )
        rows = ((f"d{o}", STATUSES[s]) for o in range(done_orders) for s in range(len(STATUSES)))
        db.executemany(
            "INSERT INTO transitions (order_id, status, inferred, event_id, at, recorded_at) "
            "VALUES (?, ?, 0, NULL, 'x', 'x')",
            rows,
        )
        rows = ((f"d{o}", STATUSES[s]) for o in range(done_orders) for s in range(len(STATUSES)))
        db.executemany(
            "INSERT INTO outbox (order_id, status, body, idempotency_key, state, attempts, "
            "next_attempt_at, created_at, delivered_at) "
            "VALUES (?1, ?2, '{}', ?1 || '/' || ?2, 'delivered', 1, 0, ?3, ?3)",
            ((o, s, now) for o, s in rows),
        )
        db.executemany(
            "INSERT INTO processed_events (order_id, event_id) VALUES (?, ?)",
            ((f"h{i}", f"h{i}") for i in range(history)),
        )
    store.close()


def memory_and_start(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, active: int, history: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, a, h in (("small", 1000, 5000), ("large", active, history)):
        work = root / f"mem-{label}"
        work.mkdir()
        say(f"memory/start ({label}): {a:,} active orders, {h:,} history rows")
        big_database(work / "courierd.db", a, h)
        daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-mem-{label}")
        ready = daemon.start()
        idle = daemon.memory_mb()
        # Move 5,000 of the active orders on and let the pushes go out.
        before = sandbox.count()
        msgs = [
            (
                f"couriers/c{o % 500}/status",
                json.dumps(
                    {"event_id": f"m-{label}-{o}", "order_id": f"a{o}", "status": "dropoff"}
                ).encode(),
            )
            for o in range(min(a, 2500))
        ]
        publish_all(broker.port, msgs)
        sandbox.wait_for_count(before + 2 * len(msgs), 120)
        busy = daemon.memory_mb()
        daemon.stop()
        forget_session(broker.port, f"bench-courierd-mem-{label}")
        say(
            f"  ready in {ready:.2f} s; RSS/PSS idle {idle[0]:.0f}/{idle[1]:.0f} MB, "
            f"after traffic {busy[0]:.0f}/{busy[1]:.0f} MB"
        )
        out |= {
            f"{label}_ready_s": round(ready, 3),
            f"{label}_rss_idle_mb": round(idle[0], 1),
            f"{label}_pss_idle_mb": round(idle[1], 1),
            f"{label}_rss_busy_mb": round(busy[0], 1),
            f"{label}_pss_busy_mb": round(busy[1], 1),
        }
    return out
