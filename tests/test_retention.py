"""Bounded growth (CONTRACT.md 4.12): under steady load the database file stops growing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from courierd.config import StoreSettings
from courierd.daemon.housekeeping import Housekeeper
from courierd.devtools.sandbox import Sandbox
from courierd.domain.model import (
    Assignment,
    DeadLetter,
    LocationFix,
    Place,
    Status,
    StatusEvent,
    iso,
)
from courierd.store import Store, open_store
from courierd.store.outbox import PushResult
from courierd.store.schema import DELIVERED
from tests.conftest import Cli
from tests.harness import open_path
from tests.test_api import TOKEN, Client, serve

HOUR = 3600.0


def one_hour_of_traffic(store, hour: int, start: float, orders: int = 300) -> None:  # type: ignore[no-untyped-def]
    """`orders` orders through the whole chain, every push delivered, and some junk."""
    for n in range(orders):
        order = f"h{hour}-o{n}"
        at = start + n * HOUR / orders
        store.writer.commit(
            [StatusEvent(f"{order}-{s.value}", order, f"c{n % 50}", s) for s in Status]
            + [DeadLetter("couriers/x/status", b"{junk" * 20, "bad_json", "not JSON")],
            now=at,
        )
        rows = store.outbox.claim_due(at, 10)
        while rows:
            store.outbox.record_results([PushResult(r.id, DELIVERED, at) for r in rows])
            rows = store.outbox.claim_due(at, 10)


def file_size(path: Path, store) -> int:  # type: ignore[no-untyped-def]
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return path.stat().st_size


def test_the_file_stops_growing_over_many_retention_periods(tmp_path: Path) -> None:
    """A retention of one (simulated) hour, 16 hours of steady traffic, pruned every
    quarter of the retention as the daemon does: after the first few hours the file
    size is flat, and finished orders older than the retention are gone."""
    path = tmp_path / "db.sqlite"
    # NORMAL: ~20,000 commits, none waiting for an fsync, which the size does not depend on.
    store = open_store(StoreSettings(path=path, retention_days=HOUR / 86400, synchronous="NORMAL"))
    now = {"t": 1_700_000_000.0}
    keeper = Housekeeper(store, clock=lambda: now["t"])
    assert keeper.prune_every_s == HOUR / 4
    sizes = []
    for hour in range(16):
        start = now["t"]
        for quarter in range(4):
            one_hour_of_traffic(store, hour * 4 + quarter, start + quarter * HOUR / 4, 75)
            now["t"] = start + (quarter + 1) * HOUR / 4
            keeper.prune_now()
        sizes.append(file_size(path, store))
    written = 16 * 300
    kept = store.db.value("SELECT count(*) FROM orders")
    assert kept <= 2 * 300  # at most the last retention period (plus one pruning interval)
    assert store.db.value("SELECT count(*) FROM dead_letters") <= 2 * 300
    assert written > 5 * kept
    settled = sizes[4]
    assert max(sizes[4:]) <= settled * 1.15, sizes  # flat, not growing with the traffic
    assert sizes[-1] < sizes[0] * 3, sizes
    store.close()


def test_pending_and_parked_pushes_are_never_pruned(tmp_path: Path) -> None:
    """A finished order whose push is still pending (OneTablet down for weeks) or parked
    as failed keeps everything, however old."""
    store = open_store(StoreSettings(path=tmp_path / "db.sqlite", retention_days=1))
    t0 = 1_700_000_000.0
    for order in ("pending", "parked", "done"):
        store.writer.commit([StatusEvent(f"{order}-e", order, "c1", Status.DROPOFF)], now=t0)
    for row in store.outbox.claim_due(t0, 10):
        state = {"done": DELIVERED, "parked": "failed"}.get(row.order_id)
        if state:
            store.outbox.record_results([PushResult(row.id, state, t0)])
    done = store.outbox.claim_due(t0, 10)
    while any(r.order_id == "done" for r in done):
        store.outbox.record_results(
            [PushResult(r.id, DELIVERED, t0) for r in done if r.order_id == "done"]
        )
        done = store.outbox.claim_due(t0, 10)
    Housekeeper(store, clock=lambda: t0 + 30 * 86400).prune_now()
    left = {r[0] for r in store.db.rows("SELECT order_id FROM orders")}
    assert left == {"pending", "parked"}
    assert store.db.value("SELECT count(*) FROM outbox WHERE order_id = 'pending'") == 5
    store.close()


def test_a_big_backlog_is_pruned_in_many_small_transactions(tmp_path: Path) -> None:
    """Thousands of old orders are removed a batch at a time, not in one long write that
    would stall ingest."""
    store = open_store(StoreSettings(path=tmp_path / "db.sqlite", retention_days=1))
    t0 = 1_700_000_000.0
    db = store.db
    with db.transaction():
        db.executemany(
            "INSERT INTO orders (order_id, state, updated_at) VALUES (?, 'dropoff', ?)",
            [(f"o{i}", "2020-01-01T00:00:00.000Z") for i in range(6000)],
        )
    steps = []
    while True:
        done = store.retention.step(t0)
        if not done.total:
            break
        steps.append(done.orders)
    assert sum(steps) == 6000 and len(steps) > 2
    assert max(steps) <= 5000
    store.close()


def test_accepted_fixes_go_after_their_own_retention_and_replay_names_who_lost_them(
    cli: Cli, db_path: Path, onetablet: Sandbox
) -> None:
    """Accepted fixes are kept `store.fix_retention_days` (7 by default), apart from the
    orders' 30: fixes older than that go, younger ones stay, and the finished order the
    old ones served stays for its own retention. `courierd replay` then shows that order
    flagged with its missing fixes, as the API's replay does, keeps it out of the
    summary and names it, and replays the other as decided."""
    from courierd.domain.model import Assignment, LocationFix, Place, iso

    now = 1_800_000_000.0
    store = open_path(db_path)

    def delivery(order: str, courier: str, t0: float) -> None:
        store.writer.commit([Assignment(order, courier, pickup=Place(40.7, -74.0))], now=t0)
        for i in range(5):  # near the store: arriving, then arrived
            fix = LocationFix(courier, iso(t0 + 20 * i), 40.7, -74.0, 5.0)
            store.writer.commit([fix], now=t0 + 20 * i)
        store.writer.commit(
            [StatusEvent(f"{order}-d", order, courier, Status.DROPOFF, iso(t0 + 200))],
            now=t0 + 200,
        )
        rows = store.outbox.claim_due(t0 + 200, 100)
        while rows:
            store.outbox.record_results([PushResult(r.id, DELIVERED, t0 + 200) for r in rows])
            rows = store.outbox.claim_due(t0 + 200, 100)

    delivery("old", "c1", now - 8 * 86400)  # its fixes are past 7 days, the order is not
    delivery("young", "c2", now - 6 * 86400)
    assert store.db.value("SELECT count(*) FROM track_points") == 10
    Housekeeper(store, clock=lambda: now).prune_now()

    kept = store.db.rows("SELECT DISTINCT courier_id FROM track_points")
    assert kept == [("c2",)] and store.db.value("SELECT count(*) FROM track_points") == 5
    orders = store.db.rows("SELECT order_id, state FROM orders ORDER BY order_id")
    assert orders == [("old", "dropoff"), ("young", "dropoff")]  # 30 days for them
    store.close()

    r = cli("replay", "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)
    flagged = {o["order_id"]: o["missing_fixes"] for o in got["orders"]}
    assert flagged["young"] == 0 and flagged["old"] > 0, flagged
    assert got["summary"]["orders_replayed"] == 1  # the faithful one only
    assert got["summary"]["orders_missing_fixes"] == 1
    assert "1 orders flagged, not in the summary" in r.err
    assert "store.fix_retention_days): old" in r.err
    text = cli("replay", "--order", "old")
    assert text.code == 0, text.err
    assert f"old  {flagged['old']} of its fixes pruned: not faithful" in text.out
    assert "orders replayed: 0" in text.out
    server = serve(db_path.parent, onetablet, TOKEN)  # the API's replay says the same
    try:
        client = Client(server.port, onetablet, db_path)
        for order, missing in flagged.items():
            code, doc, _ = client.call("GET", f"/v1/orders/{order}/replay")
            assert code == 200 and doc["missing_fixes"] == missing, (order, doc)
    finally:
        server.stop()

    # Past the orders' own retention, the finished orders go too.
    store = open_path(db_path)
    Housekeeper(store, clock=lambda: now + 31 * 86400).prune_now()
    assert store.db.value("SELECT count(*) FROM orders") == 0
    assert store.db.value("SELECT count(*) FROM track_points") == 0
    store.close()


def test_fix_retention_is_a_setting_like_the_others(tmp_path: Path) -> None:
    """`store.fix_retention_days` is validated as the other retention is, and prunes on
    its own schedule: the housekeeper runs at least every quarter of the shorter one."""
    from pydantic import ValidationError

    for bad in (0, -1, 40000):
        with pytest.raises(ValidationError):
            StoreSettings(fix_retention_days=bad)
    settings = StoreSettings(path=tmp_path / "db.sqlite", fix_retention_days=0.1)
    assert StoreSettings().fix_retention_days == 7.0
    store = open_store(settings)
    assert store.retention.fix_retention_s == 0.1 * 86400
    assert store.retention.retention_s == 30 * 86400
    assert Housekeeper(store).prune_every_s == 0.1 * 86400 / 4
    store.close()


def test_an_order_whose_oldest_fixes_were_pruned_is_flagged_not_replayed_over_later_ones(
    cli: Cli, db_path: Path, onetablet: Sandbox
) -> None:
    """Retention prunes a courier's oldest fixes first: when those of an order's segment
    went, the fixes from its first one on that are still kept are the courier's LATER
    ones (another order's), so replay must not take them: the whole segment counts as
    missing, the same way for `courierd replay` and the API, and the order stays out of
    the summary; the later order is replayed as decided."""
    import time

    from courierd.domain.model import Assignment, LocationFix, Place, iso

    store = open_path(db_path)
    t0 = time.time() - 3600  # recent: nothing of it is due for pruning by the server

    def delivery(order: str, start: float) -> list[str]:
        store.writer.commit([Assignment(order, "c1", pickup=Place(40.7, -74.0))], now=start)
        stamps = [iso(start + 1 + 20 * i) for i in range(5)]
        for i, ts in enumerate(stamps):
            store.writer.commit([LocationFix("c1", ts, 40.7, -74.0, 5.0)], now=start + 1 + 20 * i)
        store.writer.commit(
            [StatusEvent(f"{order}-d", order, "c1", Status.DROPOFF, iso(start + 200))],
            now=start + 200,
        )
        return stamps

    first = delivery("o1", t0)
    delivery("o2", t0 + 300)  # the same courier's next order: its fixes come after o1's
    assert store.db.value("SELECT count(*) FROM track_points") == 10
    with store.db.transaction():  # retention pruned o1's oldest two
        store.db.execute(
            "DELETE FROM track_points WHERE courier_id = 'c1' AND ts IN (?, ?)", tuple(first[:2])
        )
    store.close()

    r = cli("replay", "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)
    flagged = {o["order_id"]: o["missing_fixes"] for o in got["orders"]}
    assert flagged == {"o1": 5, "o2": 0}, flagged  # not 0: o2's fixes are not o1's
    assert got["summary"]["orders_replayed"] == 1
    assert got["summary"]["orders_missing_fixes"] == 1
    assert "1 orders flagged, not in the summary" in r.err
    assert "store.fix_retention_days): o1" in r.err
    text = cli("replay", "--order", "o1")
    assert text.code == 0, text.err
    assert "o1  5 of its fixes pruned: not faithful" in text.out
    server = serve(db_path.parent, onetablet, TOKEN)
    try:
        client = Client(server.port, onetablet, db_path)
        code, doc, _ = client.call("GET", "/v1/orders/o1/replay")
        assert code == 200 and doc["missing_fixes"] == 5 and doc["fixes"] == 0, doc
        code, doc, _ = client.call("GET", "/v1/orders/o2/replay")
        assert code == 200 and doc["missing_fixes"] == 0 and doc["fixes"] == 5, doc
    finally:
        server.stop()


def keep_across_a_step(store: Store, t0: float, first: float, then: float, n: int) -> list[str]:
    """`n` fixes kept by a clock at `first`, then `n` by one at `then`; see keep_by_clocks."""
    return keep_by_clocks(store, t0, [first, then], n)


def keep_by_clocks(store: Store, t0: float, clocks: list[float], n: int) -> list[str]:
    """`n` fixes kept by a clock reading `clocks[0]` on, then `n` by one reading
    `clocks[1]` on, and so on (the courier's own stamps move on from `t0`, one a second);
    their ts in keeping order."""
    store.writer.commit([Assignment("o1", "c1", pickup=Place(41.0, -74.0))], now=t0)
    for i in range(len(clocks) * n):
        kept_at = clocks[i // n] + i
        store.writer.commit([LocationFix("c1", iso(t0 + i), 40.7, -74.0, 5.0)], now=kept_at)
    kept = [r[0] for r in store.db.rows("SELECT ts FROM track_points ORDER BY id")]
    assert kept == [iso(t0 + i) for i in range(len(clocks) * n)]
    return kept


def prune_all(store: Store, now: float) -> set[str]:
    while store.retention.step(now).total:
        pass
    return {r[0] for r in store.db.rows("SELECT ts FROM track_points")}


@pytest.mark.parametrize("step", ["back", "ahead"])
def test_fixes_kept_later_outlive_those_kept_earlier_whichever_way_the_clock_stepped(
    store: Store, step: str
) -> None:
    """Five fixes kept, the clock steps (back an hour; or it was 45 minutes ahead and
    comes right), five more kept. Once the later ones are past the fix retention, the
    earlier ones go as well: what stays is always every fix kept from some point on,
    which replay relies on (a segment whose first fix is kept is kept whole). Pruning by
    `recorded_at` alone kept the earlier five and took the later ones. On both engines,
    the stamps being the writer's `now` (the clock seam) and the pruning's."""
    t0 = 1_800_000_000.0
    first, then = (t0, t0 - HOUR) if step == "back" else (t0 + 0.75 * HOUR, t0)
    kept = keep_across_a_step(store, t0, first, then, 5)
    # Past the later five's retention (+30 min), not the earlier five's.
    left = prune_all(store, then + store.retention.fix_retention_s + HOUR / 2)
    assert not left & set(kept[5:])  # the later five are past their retention
    assert left == set(kept[len(kept) - len(left) :]), sorted(left)  # none before a gap
    assert not left  # the earlier five went with them, less than CLOCK_STEP_S early


def test_a_large_clock_step_takes_no_fix_early_and_holds_none_back(store: Store) -> None:
    """Past CLOCK_STEP_S, fixes go by their stamps. A host a year behind that comes
    right: the few fixes it stamped a year ago go, the days of others kept before them
    stay (by keeping order they would all have gone). A host a day ahead that comes
    right: the fixes kept since go when due, not a day later."""
    t0 = 1_800_000_000.0
    kept = keep_across_a_step(store, t0, t0, t0 - 365 * 24 * HOUR, 5)
    left = prune_all(store, t0 + HOUR)
    assert left == set(kept[:5]), sorted(left)
    store.db.execute("DELETE FROM track_points")

    t1 = t0 + HOUR  # the courier's fixes move on
    kept = keep_across_a_step(store, t1, t1 + 24 * HOUR, t1, 5)
    left = prune_all(store, t1 + store.retention.fix_retention_s + HOUR)
    assert left == set(kept[:5]), sorted(left)  # those stamped a day ahead wait for it


def test_past_an_hour_s_step_nothing_goes_before_its_stamp_says(store: Store) -> None:
    """CLOCK_STEP_S bounds how early a fix may go by keeping order. A step back of an
    hour and a half: the fixes kept before it stay until their own stamps are due. A fix
    kept while the clock was hours ahead, at the head: the fixes after it that are due go
    by their stamps, and one not yet due stays."""
    t0 = 1_800_000_000.0
    kept = keep_by_clocks(store, t0, [t0, t0 - 1.5 * HOUR], 5)
    left = prune_all(store, t0 - 1.5 * HOUR + store.retention.fix_retention_s + HOUR / 2)
    assert left == set(kept[:5]), sorted(left)
    store.db.execute("DELETE FROM track_points")

    t1 = t0 + HOUR  # the courier's fixes move on
    kept = keep_by_clocks(store, t1, [t1 + 3 * HOUR, t1 - HOUR, t1 + HOUR / 2], 3)
    left = prune_all(store, t1 + store.retention.fix_retention_s)  # due: the middle three
    assert left == set(kept[:3] + kept[6:]), sorted(left)
