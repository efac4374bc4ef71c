"""Several instances on one PostgreSQL database (CONTRACT.md 10), at the store level:
concurrent ingest of the same orders, leased claims, fencing, slots and leases."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from courierd.config import StoreSettings, load_settings
from courierd.daemon.batcher import Reader
from courierd.daemon.dispatch import Dispatcher
from courierd.daemon.housekeeping import Housekeeper
from courierd.daemon.ingest import clock_offset
from courierd.daemon.ipc import Grant
from courierd.daemon.membership import SlotManager
from courierd.devtools.sandbox import Sandbox
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import DeadLetter, LocationFix, Status, StatusEvent, iso
from courierd.edges.pusher import Pusher
from courierd.errors import FencedOut, StoreUnavailable
from courierd.services import orders
from courierd.store import Store, open_store
from courierd.store.cluster import NOW, DbClock, Slots
from courierd.store.outbox import PushResult
from courierd.store.schema import DELIVERED
from tests import pg
from tests.harness import API_KEY, wait_until
from tests.test_cancel import hold_cancel_calls

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
    """An instance that stops renewing loses its claims when the lease ends (by the
    database's clock: another host's clock running ahead changes nothing); another
    takes the push over, and the first one's late result changes nothing."""
    a = open_store(shared, instance="a", lease_s=0.5)  # claims hold for 1 s
    b = open_store(shared, instance="b", lease_s=0.5)
    a.writer.commit([StatusEvent("e", "o", "c1", Status.DASHER_CONFIRMED)], now=T0)
    (row,) = a.outbox.claim_due(T0, 1)
    assert b.outbox.claim_due(T0 + 3600, 1) == []  # b's clock an hour ahead: a still holds
    claimant = "SELECT claimed_by FROM outbox WHERE id = ?"
    assert a.db.value(claimant, (row.id,)) == a.outbox.holder
    wait_until(lambda: bool(b.outbox.claim_due(T0, 1)), 10, "a's claims lapsing")  # a went quiet
    assert a.db.value(claimant, (row.id,)) == b.outbox.holder  # no longer a's to send
    a.outbox.record_results([PushResult(row.id, "failed", T0 + 40, None, "late")])
    assert b.db.value("SELECT state FROM outbox WHERE id = ?", (row.id,)) == "pending"
    b.outbox.record_results([PushResult(row.id, DELIVERED, T0 + 41)])
    assert b.db.value("SELECT state FROM outbox WHERE id = ?", (row.id,)) == DELIVERED
    a.close()
    b.close()


def rounds(stores: dict[str, Store], n: int = 3) -> dict[str, dict[int, int]]:
    """`n` rounds of every instance (hand-overs done at once); the slots each holds."""
    held: dict[str, dict[int, int]] = {}
    for _ in range(n):
        for name, s in stores.items():
            assert s.slots is not None
            result = s.slots.rebalance()
            s.slots.release(result.handover)
            held[name] = result.held
    return held


def test_slots_are_shared_out_taken_over_and_fenced(shared: StoreSettings) -> None:
    """Three instances share four MQTT slots, none twice; when one stops heartbeating its
    slots go to the others once its lease runs out (with new epochs), and its batches
    are fenced off."""
    stores = {n: open_store(shared, instance=n, lease_s=1.0) for n in ("a", "b", "c")}
    for s in stores.values():
        assert s.slots is not None
        s.slots.join()
    held = rounds(stores)
    owners = [slot for h in held.values() for slot in h]
    assert sorted(owners) == [0, 1, 2, 3]  # each slot held once
    assert all(1 <= len(h) <= 2 for h in held.values())
    victim = max(held, key=lambda n: len(held[n]))
    lost = dict(held[victim])
    vs = stores[victim].slots
    assert vs is not None and vs.holds(lost)
    survivors = {n: s for n, s in stores.items() if n != victim}
    # The victim's transaction is left open (a process stopped half way through a
    # commit): its row locks must not keep the survivors from taking its slots over.
    vs.db.execute("BEGIN")
    vs.holds(lost)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        held.update(rounds(survivors, 1))
        if sorted(slot for n in survivors for slot in held[n]) == [0, 1, 2, 3]:
            break
        time.sleep(0.2)
    assert sorted(slot for n in survivors for slot in held[n]) == [0, 1, 2, 3]
    assert all(len(held[n]) == 2 for n in survivors)
    assert all(held[n][slot] > lost[slot] for n in survivors for slot in held[n] if slot in lost)
    # The survivors ended the silent instance's session: waking up, its first call
    # fails (nothing it had half done commits), then it reconnects, fenced off.
    with pytest.raises(StoreUnavailable):
        vs.db.value("SELECT 1")
    with vs.db.transaction():
        assert not vs.holds(lost)
    with pytest.raises(FencedOut):
        stores[victim].writer.commit(
            [StatusEvent("late", "o", "c1", Status.DASHER_CONFIRMED)], now=T0, slots=lost
        )
    assert stores[victim].outbox.get_order("o") is None
    for s in stores.values():
        s.close()


def test_a_singleton_lease_has_one_holder_until_it_lapses(shared: StoreSettings) -> None:
    """The notifier and housekeeping leases: one instance at a time, handed over when the
    holder stops renewing."""
    a, b = instance(shared, "a"), instance(shared, "b")
    assert a.leases.hold("notifier", 1.0)
    assert not b.leases.hold("notifier", 1.0)
    assert a.leases.hold("notifier", 1.0)  # renewed
    wait_until(lambda: b.leases.hold("notifier", 1.0), 10, "a's lease lapsing")  # a went quiet
    assert not a.leases.hold("notifier", 1.0)
    a.close()
    b.close()


def joined(settings: StoreSettings, name: str, lease_s: float = 15.0) -> tuple[Store, Slots]:
    store = open_store(settings, instance=name, lease_s=lease_s)
    assert store.slots is not None
    store.slots.join()
    return store, store.slots


def test_a_share_handed_over_is_free_at_once(shared: StoreSettings) -> None:
    """An instance joining gets its share from the one holding every slot in one round
    each, long before any lease could run out: the holder hands it over."""
    a, sa = joined(shared, "a")
    assert sa.rebalance().held.keys() == {0, 1, 2, 3}
    b, sb = joined(shared, "b")
    assert sb.rebalance().held == {}  # nothing free
    first = sa.rebalance()  # b is live now: a's fair share is two
    assert first.held.keys() == {0, 1} and first.handover.keys() == {2, 3}
    sa.release(first.handover)
    taken = sb.rebalance()
    assert taken.held.keys() == {2, 3} and not taken.handover
    assert all(taken.held[s] == first.handover[s] + 1 for s in taken.held)  # new epochs
    assert not sa.holds(first.handover)
    a.close()
    b.close()


def test_slots_work_without_their_unused_lease_column(shared: StoreSettings) -> None:
    """Nothing reads or writes `slots.lease_until` (membership is by heartbeat), so the
    migration that drops it later cannot break an instance of this version running
    beside a newer one: join, take, hand over, fence and view all work without it."""
    a, sa = joined(shared, "a")
    with a.db.transaction():
        a.db.execute("ALTER TABLE slots DROP COLUMN lease_until")
    assert sa.rebalance().held.keys() == {0, 1, 2, 3}
    b, sb = joined(shared, "b")
    first = sa.rebalance()
    sa.release(first.handover)
    taken = sb.rebalance()
    assert taken.held.keys() == first.handover.keys()
    with b.db.transaction():
        assert sb.holds(taken.held)
    assert [v["holder"] for v in sa.view()] == ["a", "a", "b", "b"]
    sb.leave()
    assert sa.rebalance().held.keys() == {0, 1, 2, 3}  # taken over
    a.close()
    b.close()


def test_renewing_never_waits_for_an_ingest_transaction(shared: StoreSettings) -> None:
    """A round renews the slots while the instance's own ingest transaction holds them
    (its fence check), at once, instead of waiting out a lock timeout."""
    a, sa = joined(shared, "a")
    ingest = open_store(shared, instance="a")
    held = sa.rebalance().held
    assert ingest.slots is not None
    with ingest.db.transaction():
        assert ingest.slots.holds(held)
        started = time.monotonic()
        assert sa.rebalance().held == held
        assert time.monotonic() - started < 1.5
    a.close()
    ingest.close()


def test_a_failed_round_loses_nothing(shared: StoreSettings) -> None:
    """After a round fails (its database session was ended), the next one still holds
    every slot, at the same epochs: nothing was given up, nothing is taken over."""
    a, sa = joined(shared, "a")
    held = sa.rebalance().held
    with psycopg.connect(pg.admin_url(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (a.db.value("SELECT pg_backend_pid()"),))
    with pytest.raises(StoreUnavailable):
        sa.rebalance()
    assert sa.rebalance().held == held
    a.close()


def test_leases_are_timed_by_the_databases_clock(
    shared: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock is an hour ahead or behind takes nothing from a live holder and
    keeps what it holds: every lease time is the database's."""
    a, sa = joined(shared, "a")
    held = sa.rebalance().held
    assert held.keys() == {0, 1, 2, 3}
    b, sb = joined(shared, "b")
    real = time.time
    for skew in (3600.0, -3600.0):
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        assert sb.rebalance().held == {}  # a is live: nothing free yet
        kept = sa.rebalance()
        assert kept.held | kept.handover == held
        assert not a.leases.hold("notifier", 15) or not b.leases.hold("notifier", 15)
        lag = a.db.value(f"SELECT max(abs(heartbeat_at - {NOW})) FROM instances")
        assert lag < 5
    a.close()
    b.close()


def test_messages_are_parsed_on_arrival_by_the_databases_clock(
    shared: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock an hour behind the database's: the ingest process tells the
    MQTT process so (`clock_offset`), and a fix stamped by the database's clock is on
    time when parsed on arrival, not an hour in the future (future_ts)."""
    real = time.time
    stamp = json.dumps({"ts": iso(real()), "lat": 41.0, "lng": -73.0}).encode()
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    store = instance(shared, "a")
    offset = clock_offset(store)
    assert offset is not None and abs(offset - 3600) < 5
    reader = Reader("user")
    reader.set_clock(offset)
    assert isinstance(reader("couriers/c1/location", stamp, len(stamp)), LocationFix)
    reader.set_clock(0.0)  # as if told nothing: judged by this host's clock
    late = reader("couriers/c1/location", stamp, len(stamp))
    assert isinstance(late, DeadLetter) and late.reason == "future_ts"
    store.close()


def test_pushes_are_due_at_once_whatever_the_committing_hosts_clock(
    shared: StoreSettings,
) -> None:
    """A push committed, or retried by the operator, on a host whose clock is an hour
    ahead is due at once for the other instances (they claim by the database's clock):
    it waited for the hour to pass."""
    a, b = instance(shared, "a"), instance(shared, "b")
    a.writer.commit(
        [StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=time.time() + 3600
    )
    claimed = b.outbox.claim_due(b.clock(), 10)
    assert [r.order_id for r in claimed] == ["o1"]
    b.outbox.record_results([PushResult(claimed[0].id, "failed", time.time(), None, "400")])
    assert a.queries.retry_failed("o1", now=time.time() + 3600) == 1
    assert [r.order_id for r in b.outbox.claim_due(b.clock(), 10)] == ["o1"]
    a.close()
    b.close()


def test_a_cancel_hold_lasts_its_time_by_the_databases_clock(
    shared: StoreSettings, onetablet: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`order cancel` run on a host whose clock is 10 minutes behind holds the order's
    pushes for its configured time as the database (and so every other instance) sees
    it: the hold was written on the host's clock, already 7 minutes over for the others,
    whose housekeeping released it while OneTablet was still being asked."""
    settings = load_settings(
        None,
        {
            "onetablet": {"base_url": onetablet.url, "api_key": API_KEY},
            "store": {"url": shared.postgres_url},
        },
    )
    a, b = instance(shared, "a"), instance(shared, "b")
    a.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=time.time())
    asked, answer = hold_cancel_calls(onetablet)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 600)
    worker = threading.Thread(target=orders.cancel, args=(settings, "o1", "OTHER", None, a))
    worker.start()
    try:
        assert asked.wait(10)
        monkeypatch.setattr(time, "time", real)
        left = b.db.value(f"SELECT hold_until - {NOW} FROM orders WHERE order_id = 'o1'")
        assert abs(left - orders.cancel_hold_s(settings)) < 5
        assert b.outbox.release_expired_holds(b.clock()) == 0
    finally:
        answer.set()
        worker.join(10)
        a.close()
        b.close()


def test_housekeeping_on_a_host_ahead_judges_holds_and_silence_by_the_databases_clock(
    shared: StoreSettings,
) -> None:
    """The instance doing housekeeping has a host clock 10 minutes ahead. A cancel hold
    taken just now stays (its pushes were released while the cancel was in progress),
    and a courier heard from just now is not reported offline (every courier whose
    messages another instance took was: a false alert per courier)."""
    a, b = instance(shared, "a"), instance(shared, "b")
    try:
        a.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=time.time())
        a.outbox.hold_for_cancel("o1", a.clock(), 180.0)
        # An order abandoned two days ago: its expiry shows that a round has run.
        a.writer.commit(
            [StatusEvent("e9", "o9", "c9", Status.DASHER_CONFIRMED)], now=time.time() - 2 * 86400
        )
        keeper = Housekeeper(b, offline_after_s=300.0, clock=lambda: time.time() + 600)
        stop = threading.Event()
        runner = threading.Thread(target=keeper.run, args=(stop,))
        runner.start()
        try:
            wait_until(
                lambda: a.db.value("SELECT state FROM orders WHERE order_id = 'o9'") == "expired",
                10,
                "a housekeeping round",
            )
        finally:
            stop.set()
            runner.join(10)
        states = a.db.rows("SELECT state FROM outbox WHERE order_id = 'o1'")
        assert states == [("held",)]
        offline = a.db.rows("SELECT courier_id FROM couriers WHERE offline = 1 ORDER BY courier_id")
        assert offline == [("c9",)]
    finally:
        a.close()
        b.close()


def test_push_ages_are_by_the_databases_clock(shared: StoreSettings, onetablet: Sandbox) -> None:
    """A dispatcher on a host whose clock is 10 minutes ahead reports a push committed
    just now as just made: the oldest pending push's age (the gauge alerts watch) and
    the delivery latency were 10 minutes."""
    a, b = instance(shared, "a"), instance(shared, "b")
    pusher = Pusher(onetablet.url, API_KEY)
    ahead = Dispatcher(b.outbox, pusher, clock=lambda: time.time() + 600, follow_clock_steps=False)
    try:
        a.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=time.time())
        ahead.turn()  # claims the push, and reads the gauges while it is pending
        assert ahead.report().oldest_pending_age_s < 5
        wait_until(lambda: (ahead.turn(), onetablet.requests())[1], 10, "the push")
        wait_until(lambda: (ahead.turn(), not ahead._inflight)[1], 10, "its reply recorded")
        assert 0 < max(ahead.report().latencies) < 5
    finally:
        pusher.close()
        a.close()
        b.close()


def test_a_database_blip_as_a_reply_is_recorded_loses_no_push(
    shared: StoreSettings, onetablet: Sandbox
) -> None:
    """The database drops the dispatcher's connection (a failover, a restart) just as it
    records a reply, where it reads the database's clock: once it is back, the reply
    is recorded and the order's next push goes out. (The reply was taken and dropped,
    its push stayed in flight for good, and the order was stuck until a restart.)"""
    a, b = instance(shared, "a"), instance(shared, "b")
    pusher = Pusher(onetablet.url, API_KEY)
    later = [0.0]
    d = Dispatcher(
        b.outbox, pusher, monotonic=lambda: time.monotonic() + later[0], follow_clock_steps=False
    )

    def turn() -> None:
        with contextlib.suppress(StoreUnavailable):
            d.turn()

    try:
        statuses = [Status.DASHER_CONFIRMED, Status.ARRIVING_AT_STORE]
        a.writer.commit([StatusEvent(f"e{s}", "o1", "c1", s) for s in statuses], now=time.time())
        d.turn()
        wait_until(lambda: not d._results.empty(), 10, "the first push's reply")
        later[0] += 2  # the clock is due to be read again, as the reply is recorded
        a.db.value(f"SELECT pg_terminate_backend({int(b.db.value('SELECT pg_backend_pid()'))})")

        def pushed_again() -> bool:
            turn()
            return len(onetablet.requests()) >= 2

        wait_until(pushed_again, 20, "the next push")
        assert [r.json["delivery_status"] for r in onetablet.requests()] == [
            s.value for s in statuses
        ]
    finally:
        pusher.close()
        a.close()
        b.close()


def test_the_clock_follows_the_database_when_the_hosts_clock_steps(
    shared: StoreSettings,
) -> None:
    """The host's clock is set 10 minutes ahead (NTP, an operator): the very next time
    courierd takes is still the database's, not 10 minutes off until the next
    once-a-second read (ingest stamped last_seen by it: a false courier_offline)."""
    a = instance(shared, "a")
    step = [0.0]
    clock = DbClock(a.db, lambda: time.time() + step[0])
    try:
        assert abs(clock() - float(a.db.value(f"SELECT {NOW}"))) < 1
        step[0] = 600.0
        assert abs(clock() - float(a.db.value(f"SELECT {NOW}"))) < 1
    finally:
        a.close()


@pytest.mark.parametrize("step", [600.0, -600.0], ids=["ahead", "behind"])
def test_a_clock_step_while_the_databases_clock_is_read_is_not_halved(
    shared: StoreSettings, step: float
) -> None:
    """The host's clock steps 10 minutes while DbClock reads the database's (between its
    two readings of the host's clock): the offset comes from the reading after the step,
    not the midpoint across it, which was 5 minutes off until the next read, a second
    later."""
    a = instance(shared, "a")
    readings = [0]

    def host() -> float:  # steps from the second reading on: the one after the query
        readings[0] += 1
        return time.time() + (step if readings[0] >= 2 else 0.0)

    clock = DbClock(a.db, host)
    try:
        assert abs(clock() - float(a.db.value(f"SELECT {NOW}"))) < 1
        assert readings[0] == 2  # the database's clock was read, across the step
        assert abs(clock() - float(a.db.value(f"SELECT {NOW}"))) < 1
    finally:
        a.close()


def test_a_status_committed_as_a_hold_is_released_is_not_held_for_good(
    shared: StoreSettings,
) -> None:
    """Housekeeping ends a cancel hold that ran out while another instance commits a
    status of that order: once both are done, both pushes are pending. (The release
    let the held pushes go first and the order after; a status committed in between
    was added held, after the release had looked, and stayed held for good with every
    later push of its order behind it.) A third connection holding the first push's
    row keeps the release at that point while the status is committed."""
    a, b = instance(shared, "a"), instance(shared, "b")
    t0 = time.time()
    errors: list[BaseException] = []

    def run(call: Any, *args: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                call(*args)
            except BaseException as e:  # said below, not lost in the thread
                errors.append(e)

        thread = threading.Thread(target=guarded)
        thread.start()
        return thread

    def waiting(conn: psycopg.Connection[Any]) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]

    try:
        a.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=t0)
        a.outbox.hold_for_cancel("o1", t0 - 120, 60)  # a hold that ran out a minute ago
        later = [StatusEvent("e2", "o1", "c1", Status.ARRIVING_AT_STORE)]
        with psycopg.connect(shared.postgres_url or "", autocommit=True) as blocker:
            with blocker.transaction():
                blocker.execute("SELECT id FROM outbox WHERE order_id = 'o1' FOR UPDATE")
                with psycopg.connect(shared.postgres_url or "", autocommit=True) as watcher:
                    releasing = run(b.outbox.release_expired_holds, t0)
                    wait_until(lambda: waiting(watcher) >= 1, 10, "the release to wait")
                    committing = run(lambda: a.writer.commit(later, now=t0 + 1))
                    wait_until(
                        lambda: not committing.is_alive() or waiting(watcher) >= 2,
                        10,
                        "the status committed, or waiting for the release",
                    )
            releasing.join(10)
            committing.join(10)
        assert not errors, errors
        assert a.db.rows("SELECT status, state FROM outbox WHERE order_id = 'o1' ORDER BY id") == [
            ("dasher_confirmed", "pending"),
            ("arriving_at_store", "pending"),
        ]
    finally:
        a.close()
        b.close()


def test_a_round_failing_for_any_reason_keeps_the_slots_and_says_why(
    shared: StoreSettings,
) -> None:
    """A statement timeout in a round (QueryCanceled) is not the end of the slot
    manager: it keeps the slots it was granted until that grant runs out, health hears
    why, and the next good round goes on as before."""
    a, sa = joined(shared, "a")
    grants: list[Grant] = []
    manager = SlotManager(sa, grants.append)
    manager.turn()
    good = grants[-1]
    assert good.slots.keys() == {0, 1, 2, 3} and good.problem is None
    a.db.execute("SET statement_timeout = '200ms'")
    with (
        psycopg.connect(shared.postgres_url or "", autocommit=True) as blocker,
        blocker.transaction(),
    ):
        blocker.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")
        manager.turn()
    kept = grants[-1]
    assert kept.slots == good.slots and kept.valid_until == good.valid_until
    assert good.unheld == 0 and kept.unheld is None  # the gauge says it cannot tell
    assert "statement timeout" in (kept.problem or "")
    manager.turn()
    assert grants[-1].slots == good.slots and grants[-1].problem is None
    assert grants[-1].valid_until > good.valid_until
    a.close()


def test_a_round_without_the_right_to_end_sessions_still_takes_over(
    shared: StoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance on a role that may not end another's database sessions
    (InsufficientPrivilege) says so once, and still takes a silent instance's slots
    over, once the server ends that instance's idle transaction itself."""
    role = f"courierd_t_{uuid.uuid4().hex[:8]}"
    url = shared.postgres_url or ""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT pg_read_all_stats TO "{role}"')  # sees, may not end
        admin.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{role}"')
        admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
        admin.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')
    try:
        a, sa = joined(shared, "a", lease_s=1.0)
        lost = sa.rebalance().held
        a.db.execute("SET idle_in_transaction_session_timeout = '4s'")
        a.db.execute("BEGIN")  # a stops half way through a commit
        sa.holds(lost)
        other = StoreSettings(url=url.replace("postgres@", f"{role}@"))
        b, sb = joined(other, "b", lease_s=1.0)
        deadline = time.monotonic() + 20
        while sb.rebalance().held.keys() != lost.keys() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sb.rebalance().held.keys() == lost.keys()
        assert "cluster.cannot_end_sessions" in caplog.text
        a.close()
        b.close()
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def test_an_idle_connection_ended_meanwhile_is_no_error(shared: StoreSettings) -> None:
    """A connection kept idle that the server (or a proxy between) ended meanwhile is
    opened again when the next transaction begins: the write goes through, no error."""
    a = instance(shared, "a")
    with psycopg.connect(pg.admin_url(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (a.db.value("SELECT pg_backend_pid()"),))
    a.writer.heartbeat(T0)
    assert a.db.value("SELECT value FROM meta WHERE key = 'heartbeat'") is not None
    a.close()


def test_unheld_slots_are_counted_until_someone_takes_them(shared: StoreSettings) -> None:
    """Slots no live instance holds (handed over and not yet taken, or their holder gone
    silent) are counted (courierd_cluster_slots_unheld) until someone takes them."""
    a, sa = joined(shared, "a")
    assert sa.rebalance().held.keys() == {0, 1, 2, 3} and sa.unheld == 0
    b, sb = joined(shared, "b")
    first = sa.rebalance()
    sa.release(first.handover)
    sa.rebalance()  # a keeps its fair share; b has not come for the rest yet
    assert sa.unheld == 2
    sb.rebalance()
    assert sb.unheld == 0
    sa.rebalance()
    assert sa.unheld == 0
    a.close()
    b.close()
