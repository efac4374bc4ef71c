"""Several instances on one PostgreSQL database (CONTRACT.md 10), at the store level:
concurrent ingest of the same orders, leased claims, fencing, slots and leases."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from courierd.config import StoreSettings
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import Status, StatusEvent
from courierd.errors import FencedOut, StoreUnavailable
from courierd.store import Store, open_store
from courierd.store.outbox import PushResult
from courierd.store.schema import DELIVERED
from tests import pg

T0 = 1_700_000_000.0


@pytest.fixture
def shared() -> Iterator[StoreSettings]:
    """One PostgreSQL database, for several instances."""
    if (why := pg.available()) is not None:
        pytest.skip(why)
    with pg.database() as url:
        yield StoreSettings(url=url)


def instance(settings: StoreSettings, name: str, slots: int = 4) -> Store:
    return open_store(settings, instance=name, slots=slots)


def test_instances_ingesting_the_same_orders_push_each_status_once(
    shared: StoreSettings,
) -> None:
    """Two instances commit interleaved batches of the same orders' events (as a shared
    subscription hands them out, round robin): every order gets each status once, in
    chain order, and its state is the furthest status seen."""
    rng = random.Random(3)
    orders = [f"o{i}" for i in range(20)]
    events = [
        StatusEvent(f"{o}-{s.value}-{k}", o, "c1", s)
        for o in orders
        for s in CHAIN
        for k in range(2)  # every event twice: redelivery
    ]
    rng.shuffle(events)
    halves = [events[0::2], events[1::2]]
    errors: list[BaseException] = []

    def ingest(name: str, mine: list[StatusEvent]) -> None:
        store = instance(shared, name)
        try:
            for i in range(0, len(mine), 7):
                store.writer.commit(mine[i : i + 7], now=T0)
        except BaseException as e:  # reported below: a thread's failure is the test's
            errors.append(e)
        finally:
            store.close()

    threads = [threading.Thread(target=ingest, args=(f"i{n}", h)) for n, h in enumerate(halves)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    check = instance(shared, "check")
    for o in orders:
        pushed = [
            r[0]
            for r in check.db.rows("SELECT status FROM outbox WHERE order_id = ? ORDER BY id", (o,))
        ]
        assert pushed == [s.value for s in CHAIN], (o, pushed)
        assert check.db.value("SELECT state FROM orders WHERE order_id = ?", (o,)) == "dropoff"
        transitions = check.db.value("SELECT count(*) FROM transitions WHERE order_id = ?", (o,))
        assert transitions == len(CHAIN)
    check.close()


def test_claims_are_exclusive_and_keep_each_orders_order(shared: StoreSettings) -> None:
    """Two instances claiming at once never get the same push, and an order's next push
    waits while another instance holds its current one."""
    a, b = instance(shared, "a"), instance(shared, "b")
    a.writer.commit(
        [StatusEvent(f"e{i}", f"o{i}", "c1", Status.ARRIVED_AT_STORE) for i in range(10)], now=T0
    )
    got_a = a.outbox.claim_due(T0, 6)
    got_b = b.outbox.claim_due(T0, 20)
    assert len(got_a) == 6 and len(got_b) == 4
    assert not {r.id for r in got_a} & {r.id for r in got_b}
    assert {r.status for r in got_a + got_b} == {"dasher_confirmed"}  # heads only
    b.outbox.record_results([PushResult(r.id, DELIVERED, T0) for r in got_b])
    assert {r.status for r in b.outbox.claim_due(T0, 20)} == {"arriving_at_store"}
    a.close()
    b.close()


def test_a_dead_instances_claims_expire_and_its_late_results_are_fenced(
    shared: StoreSettings,
) -> None:
    """An instance that stops renewing loses its claims when the lease ends; another
    takes the push over, and the first one's late result changes nothing."""
    a, b = instance(shared, "a"), instance(shared, "b")
    a.writer.commit([StatusEvent("e", "o", "c1", Status.DASHER_CONFIRMED)], now=T0)
    (row,) = a.outbox.claim_due(T0, 1)
    assert b.outbox.claim_due(T0 + 10, 1) == []  # a's lease still holds
    claimant = "SELECT claimed_by FROM outbox WHERE id = ?"
    assert a.db.value(claimant, (row.id,)) == a.outbox.holder
    (taken,) = b.outbox.claim_due(T0 + a.outbox.lease_s + 1, 1)  # a went quiet
    assert taken.id == row.id
    assert a.db.value(claimant, (row.id,)) == b.outbox.holder  # no longer a's to send
    a.outbox.record_results([PushResult(row.id, "failed", T0 + 40, None, "late")])
    assert b.db.value("SELECT state FROM outbox WHERE id = ?", (row.id,)) == "pending"
    b.outbox.record_results([PushResult(row.id, DELIVERED, T0 + 41)])
    assert b.db.value("SELECT state FROM outbox WHERE id = ?", (row.id,)) == DELIVERED
    a.close()
    b.close()


def test_slots_are_shared_out_taken_over_and_fenced(shared: StoreSettings) -> None:
    """Three instances share four MQTT slots, none twice; when one stops heartbeating its
    slots go to the others (with new epochs), and its batches are fenced off."""
    stores = {n: instance(shared, n) for n in ("a", "b", "c")}
    held: dict[str, dict[int, int]] = {n: {} for n in stores}
    now = T0
    for s in stores.values():
        assert s.slots is not None
        s.slots.join(now)
    for _ in range(3):
        for n, s in stores.items():
            assert s.slots is not None
            held[n] = s.slots.rebalance(now, held[n])
        now += 1
    owners = [slot for h in held.values() for slot in h]
    assert sorted(owners) == [0, 1, 2, 3]  # each slot held once
    assert all(1 <= len(h) <= 2 for h in held.values())
    victim = max(held, key=lambda n: len(held[n]))
    lost = dict(held[victim])
    vs = stores[victim].slots
    assert vs is not None and vs.holds(lost)
    for _ in range(20):  # 40 s of rounds every 2 s, without the victim (dead)
        for n, s in stores.items():
            if n != victim:
                assert s.slots is not None
                held[n] = s.slots.rebalance(now, held[n])
        now += 2
    survivors = [slot for n, h in held.items() if n != victim for slot in h]
    assert sorted(survivors) == [0, 1, 2, 3]
    assert all(len(h) == 2 for n, h in held.items() if n != victim)
    # The survivors ended the silent instance's database sessions: waking up, its first
    # call fails (nothing it had half done commits), then it reconnects, fenced off.
    with pytest.raises(StoreUnavailable):
        vs.db.value("SELECT 1")
    with vs.db.transaction():
        assert not vs.holds(lost)
    with pytest.raises(FencedOut):
        stores[victim].writer.commit(
            [StatusEvent("late", "o", "c1", Status.DASHER_CONFIRMED)], now=now, slots=lost
        )
    assert stores[victim].outbox.get_order("o") is None
    for s in stores.values():
        s.close()


def test_a_singleton_lease_has_one_holder_until_it_lapses(shared: StoreSettings) -> None:
    """The notifier and housekeeping leases: one instance at a time, handed over when the
    holder stops renewing."""
    a, b = instance(shared, "a"), instance(shared, "b")
    assert a.leases.hold("notifier", T0, 15)
    assert not b.leases.hold("notifier", T0 + 5, 15)
    assert a.leases.hold("notifier", T0 + 10, 15)  # renewed
    assert not b.leases.hold("notifier", T0 + 20, 15)
    assert b.leases.hold("notifier", T0 + 26, 15)  # lapsed at T0 + 25
    assert not a.leases.hold("notifier", T0 + 27, 15)
    a.close()
    b.close()


def test_unheld_slots_are_counted_until_someone_takes_them(shared: StoreSettings) -> None:
    """A live instance whose slot leases lapsed (paused, or its database link slow) leaves
    slots nobody holds: the others count them (courierd_cluster_slots_unheld) until it
    takes them back."""
    a = open_store(shared, instance="a", slots=4, lease_s=1.0)
    b = open_store(shared, instance="b", slots=4, lease_s=1.0)
    try:
        assert a.slots is not None and b.slots is not None
        a.slots.join(T0)
        b.slots.join(T0)
        held_a = a.slots.rebalance(T0, {})
        held_b = b.slots.rebalance(T0, {})
        assert len(held_a) == len(held_b) == 2 and b.slots.unheld == 0
        # a's leases lapse (1 s) while it still counts as live (10 s): b keeps its share.
        held_b = b.slots.rebalance(T0 + 2, held_b)
        assert len(held_b) == 2 and b.slots.unheld == 2
        a.slots.rebalance(T0 + 2.5, held_a)  # a wakes and takes its share again
        b.slots.rebalance(T0 + 3, held_b)
        assert b.slots.unheld == 0
    finally:
        a.close()
        b.close()
