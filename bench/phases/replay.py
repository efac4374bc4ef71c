"""Phase replay: 1M accepted fixes through the writer, replayed; bytes per fix on disk."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import PING_T0, say
from courierd.config import StoreSettings
from courierd.domain.model import iso
from courierd.store import open_store


def replay_cost(root: Path, fixes: int) -> dict[str, Any]:
    """`courierd replay` (CONTRACT.md 13): `fixes` accepted fixes of geofenced orders,
    200 per order (approach, wait, leave), committed through the real writer in batches
    of 500 fixes of 50 couriers; then every order replayed with the settings unchanged
    (read, rules, compare: the command without its printing). Also the bytes each
    accepted fix takes on disk: its track_points row and index entries (SQLite dbstat)."""
    from courierd.commands.replay import replay_orders
    from courierd.domain.geofence import GeofenceRules
    from courierd.domain.model import Assignment, Input, LocationFix, Place, Status, StatusEvent
    from courierd.store.replays import ReplayReads

    per_order, together = 200, 50
    orders = max(1, fixes // per_order)
    say(f"replay: {orders * per_order:,} accepted fixes of {orders:,} orders")
    store = open_store(StoreSettings(path=root / "replay.db"))
    t0 = PING_T0
    started = time.perf_counter()
    for first in range(0, orders, together):
        group = range(first, min(orders, first + together))
        setup: list[Input] = []
        for o in group:  # order ids as OneTablet's: UUIDs (the id is in every row)
            oid = str(uuid.UUID(int=o))
            setup += [
                Assignment(oid, f"rc{o}", pickup=Place(40.7, -74.0 + o * 1e-3)),
                StatusEvent(oid, oid, f"rc{o}", Status.DASHER_CONFIRMED, iso(t0)),
            ]
        store.writer.commit(setup, now=t0)
        batch: list[Input] = []
        for i in range(per_order):
            north = 3000 - 50 * i if i < 60 else (i % 3) * 5 if i < 140 else 0
            east = 0 if i < 140 else 50 * (i - 139)
            for o in group:
                lat, lng = 40.7 + north / 111_320, -74.0 + o * 1e-3 + east / 84_300
                batch.append(LocationFix(f"rc{o}", iso(t0 + 10 * i), lat, lng, 5.0))
            if len(batch) >= 500:
                store.writer.commit(batch, now=t0)
                batch = []
        store.writer.commit(batch, now=t0)
    write_s = time.perf_counter() - started
    stored = store.db.value("SELECT count(*) FROM track_points")
    on_disk: dict[str, int] = dict(
        store.db.rows(
            "SELECT name, sum(pgsize) FROM dbstat WHERE name = 'track_points' "
            "OR name LIKE 'track_points_%' GROUP BY name"
        )
    )
    store.close()
    readonly = open_store(StoreSettings(path=root / "replay.db"), readonly=True)
    reads = ReplayReads(readonly.db)
    started = time.perf_counter()  # the baseline: reading the same rows, no rules
    assert sum(len(h.fixes) for h in reads.histories(reads.order_ids())) == stored
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = reads.order_ids()
    results = list(replay_orders(reads, ids, GeofenceRules(), False))
    replay_s = time.perf_counter() - started
    readonly.close()
    changed = sum(r.changed for r in results)
    per_fix = {name: round(size / stored, 1) for name, size in on_disk.items()}
    total = round(sum(on_disk.values()) / stored, 1)
    million_s = replay_s * 1_000_000 / stored
    say(f"  written through the writer in {write_s:.1f} s; {stored:,} rows, {total} bytes/fix")
    say(f"  replayed in {replay_s:.1f} s ({stored / replay_s:,.0f} fixes/s, 1M: {million_s:.0f} s)")
    say(f"  reading the same rows alone: {read_s:.1f} s ({replay_s / read_s:.2f}x)")
    return {
        "fixes": stored,
        "orders": len(ids),
        "orders_changed": changed,  # with the settings unchanged: 0
        "write_s": round(write_s, 2),
        "replay_s": round(replay_s, 2),
        "read_only_s": round(read_s, 2),  # the baseline: the rows read, no rules run
        "replay_over_read": round(replay_s / read_s, 2),
        "fixes_per_s": round(stored / replay_s),
        "projected_1m_fixes_s": round(million_s, 1),
        "goal_1m_fixes_s": 30,
        "bytes_per_fix": total,
        "bytes_per_fix_by_part": per_fix,
    }
