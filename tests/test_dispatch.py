"""The dispatcher on a real store and a real HTTP stand-in, driven directly."""

from __future__ import annotations

import functools
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from courierd.config import StoreSettings
from courierd.daemon.dispatch import Dispatcher
from courierd.daemon.ingest import commit_messages
from courierd.daemon.ipc import NOTIFICATIONS, PUSHES, wake_for
from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import BatchReport, Status, StatusEvent
from courierd.edges.pusher import Pusher
from courierd.store import Store, open_store
from courierd.store.outbox import PushResult
from courierd.store.schema import DELIVERED
from tests import pg
from tests.conftest import API_KEY, open_path
from tests.harness import wait_until


def test_a_push_waiting_for_a_place_in_flight_is_not_sent_after_a_cancel(
    db_path: Path, onetablet: Sandbox
) -> None:
    """With every place in flight taken, a push waits unclaimed in the database; if
    `order cancel` lands meanwhile, it is never sent (CONTRACT.md 4.4)."""
    store = open_path(db_path)
    store.writer.commit(
        [
            StatusEvent("e1", "first", "c1", Status.DASHER_CONFIRMED),
            StatusEvent("e2", "second", "c1", Status.DASHER_CONFIRMED),
        ],
        now=1.0,
    )
    started, release = threading.Event(), threading.Event()

    def hold_first(r: Request) -> None:
        if r.order_id == "first":
            started.set()
            release.wait(10)

    onetablet.responder = hold_first
    pusher = Pusher(onetablet.url, API_KEY)
    dispatch_store = open_path(db_path)
    # One place in flight: "first" is sent and held; "second" waits for the place.
    dispatcher = Dispatcher(dispatch_store.outbox, pusher, concurrency=1)
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run, args=(stop,))
    loop.start()
    try:
        assert started.wait(10)
        store.outbox.hold_for_cancel("second", 2.0, 60.0)
        store.outbox.finish_cancel("second", 3.0)
        release.set()
        wait_until(lambda: store.outbox.stats()[0] == 0, 10, "the outbox to settle")
    finally:
        release.set()
        stop.set()
        dispatcher.wake()
        loop.join(15)
        pusher.close()
    assert [r.order_id for r in onetablet.requests()] == ["first"]
    view = store.queries.order_view("second")
    assert view is not None and view["pushes"][0]["state"] == "cancelled"
    store.close()
    dispatch_store.close()


def test_500_orders_against_a_slow_onetablet_stay_in_order_and_bounded(
    db_path: Path, onetablet: Sandbox
) -> None:
    """500 orders' five statuses each, against a OneTablet that takes 20 ms: at most
    `concurrency` calls are ever open at OneTablet, many orders are in flight at once,
    each order's statuses arrive in chain order, and each push is sent once."""
    store = open_path(db_path)
    orders = [f"o{i}" for i in range(500)]
    store.writer.commit(
        [
            StatusEvent(f"{o}-{s}", o, "c1", status)
            for s, status in enumerate(CHAIN)
            for o in orders
        ],
        now=1.0,
    )
    open_calls, most = 0, 0
    lock = threading.Lock()

    def slow(_: Request) -> None:
        nonlocal open_calls, most
        with lock:
            open_calls += 1
            most = max(most, open_calls)
        time.sleep(0.02)  # OneTablet's latency (the server's, not a wait in the test)
        with lock:
            open_calls -= 1

    onetablet.responder = slow
    concurrency = 64
    pusher = Pusher(onetablet.url, API_KEY, max_connections=concurrency)
    dispatcher = Dispatcher(open_path(db_path).outbox, pusher, concurrency=concurrency)
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run, args=(stop,))
    loop.start()
    try:
        wait_until(lambda: store.outbox.stats()[0] == 0, 120, "every push to be delivered")
    finally:
        stop.set()
        dispatcher.wake()
        loop.join(15)
        pusher.close()
    assert concurrency // 2 <= most <= concurrency  # parallel across orders, yet bounded
    sent: dict[str, list[str]] = {}
    for r in onetablet.requests():
        sent.setdefault(str(r.order_id), []).append(r.json["delivery_status"])
    assert sent == {o: [s.value for s in CHAIN] for o in orders}
    store.close()


class Clocks:
    """The wall and monotonic clocks, set by the test: `advance` moves both, as time
    passing does; setting `wall` alone is a clock step."""

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 0.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def to(self, wall: float) -> None:
        self.advance(wall - self.wall)


def _dispatcher(store_path: Path, onetablet: Sandbox, clocks: Clocks) -> tuple[Dispatcher, Pusher]:
    client = Pusher(onetablet.url, API_KEY)
    d = Dispatcher(
        open_path(store_path).outbox,
        client,
        concurrency=4,
        schedule=(1.0, 5.0, 30.0),
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
        rng=random.Random(0),
    )
    return d, client


def _settle(d: Dispatcher) -> None:
    """Turn until every claimed push has come back and been recorded."""
    wait_until(lambda: (d.turn(), not d._inflight)[1], 10, "replies to be recorded")


def test_401_backs_off_once_per_probe_up_to_30s_and_a_5xx_probe_keeps_the_pause(
    db_path: Path, onetablet: Sandbox
) -> None:
    """Eight pushes in flight all get 401: one step of backoff, not eight. Each probe that
    gets 401 steps 1 s → 5 s → 30 s; a probe answered 503 keeps the pause (no next probe
    at once); once the key works, everything is delivered."""
    store = open_path(db_path)
    T0 = 1_000_000.0
    store.writer.commit(
        [StatusEvent(f"e{i}", f"o{i}", "c1", Status.DASHER_CONFIRMED) for i in range(12)], now=T0
    )
    answer: dict[str, tuple[int, dict[str, str], object] | None] = {
        "now": (401, {}, {"error": "Unauthorized", "message": "key revoked"})
    }
    onetablet.responder = lambda _: answer["now"]
    clocks = Clocks(T0)
    d, client = _dispatcher(db_path, onetablet, clocks)
    try:
        _settle(d)
        assert d.paused_until == T0 + 1  # first step only, however many 401s came back
        sent = len(onetablet.requests())
        for delay in (5.0, 30.0, 30.0):  # each probe answered 401 steps the backoff once
            clocks.to(d.paused_until)
            _settle(d)
            assert len(onetablet.requests()) == sent + 1  # one probe, not a burst
            sent += 1
            assert d.paused_until == clocks.wall + delay
        answer["now"] = (503, {}, {"error": "Unavailable", "message": "deploying"})
        clocks.to(d.paused_until)
        _settle(d)
        assert d.paused_until == clocks.wall + 30  # still paused, still 30 s apart
        clocks.advance(1)
        _settle(d)
        assert len(onetablet.requests()) == sent + 1  # no second probe right after the 503
        answer["now"] = None
        clocks.to(d.paused_until)
        _settle(d)
        assert d.paused_until is None
        clocks.advance(40)  # past every retry that was scheduled meanwhile
        wait_until(lambda: (d.turn(), store.outbox.stats()[0] == 0)[1], 10, "the backlog")
    finally:
        client.close()
        store.close()


Answer = dict[str, tuple[int, dict[str, str], object] | None]


def _refused_at_first(
    db_path: Path, onetablet: Sandbox, order_id: str, t0: float
) -> tuple[Store, Answer, Clocks, Dispatcher, Pusher]:
    """One order's first status committed at `t0`, and OneTablet answering 503 until the
    test sets `answer["now"]` to None (the sandbox's own answer); the dispatcher on
    clocks the test sets."""
    store = open_path(db_path)
    store.writer.commit(
        [StatusEvent(f"e{order_id[1:]}", order_id, "c1", Status.DASHER_CONFIRMED)], now=t0
    )
    answer: Answer = {"now": (503, {}, {"error": "Unavailable", "message": "later"})}
    onetablet.responder = lambda _: answer["now"]
    clocks = Clocks(t0)
    d, client = _dispatcher(db_path, onetablet, clocks)
    return store, answer, clocks, d, client


def test_retries_follow_elapsed_time_when_the_wall_clock_steps(
    db_path: Path, onetablet: Sandbox
) -> None:
    """A push that failed is retried ~1 s later by the monotonic clock even if the wall
    clock was set back an hour meanwhile (the schedule follows the step)."""
    T0 = 1_000_000.0
    store, answer, clocks, d, client = _refused_at_first(db_path, onetablet, "o1", T0)
    try:
        _settle(d)
        assert len(onetablet.requests()) == 1
        answer["now"] = None
        clocks.wall -= 3600  # the wall clock is set back an hour
        d.turn()
        clocks.advance(0.5)
        d.turn()
        assert ok(onetablet) == []  # not yet: the retry is due ~1 s after the failure
        clocks.advance(0.7)
        wait_until(lambda: (d.turn(), "o1" in {r.order_id for r in ok(onetablet)})[1], 10)
    finally:
        client.close()
        store.close()


def skewed(skew: float) -> float:
    """The wall clock, `skew` seconds off."""
    return time.time() + skew


def test_a_shared_databases_retries_are_due_by_its_clock(onetablet: Sandbox) -> None:
    """In a cluster, pushes are due by the database's clock, as leases are, not by the
    hosts': a push committed by an instance whose clock is an hour ahead is due at once
    for one whose clock is an hour behind (it waited two hours), and a retry that one
    schedules 1 s out is not taken at once by the instance ahead (it was two hours
    overdue), but ~1 s later."""
    if (why := pg.available()) is not None:
        pytest.skip(why)
    answer: dict[str, tuple[int, dict[str, str], object] | None] = {
        "now": (503, {}, {"error": "Unavailable", "message": "later"})
    }
    onetablet.responder = lambda _: answer["now"]
    with pg.database() as url:
        settings = StoreSettings(url=url)
        stores, pushers, dispatchers = [], [], []
        for name, skew in (("ahead", 3600.0), ("behind", -3600.0)):
            stores.append(open_store(settings, instance=name))
            pushers.append(Pusher(onetablet.url, API_KEY))
            dispatchers.append(
                Dispatcher(
                    stores[-1].outbox,
                    pushers[-1],
                    concurrency=4,
                    schedule=(1.0, 5.0, 30.0),
                    clock=functools.partial(skewed, skew),
                    rng=random.Random(0),
                    follow_clock_steps=False,
                )
            )
        ahead, behind = dispatchers
        try:
            stores[0].writer.commit(
                [StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=time.time() + 3600
            )
            wait_until(lambda: (behind.turn(), onetablet.requests())[1], 10, "the first try")
            _settle(behind)  # 503: a retry in 1 s (±10 %)
            failed_at = onetablet.requests()[0].at
            answer["now"] = None
            wait_until(lambda: (ahead.turn(), ok(onetablet))[1], 10, "the retry")
            assert ok(onetablet)[0].at - failed_at >= 0.85
        finally:
            for p in pushers:
                p.close()
            for s in stores:
                s.close()


def ok(onetablet: Sandbox) -> list[Request]:
    return [r for r in onetablet.requests() if r.status == 200]


def test_a_committed_batch_wakes_only_whom_it_wrote_for(db_path: Path) -> None:
    """The ingest process wakes the dispatcher for pushes and the notifier for
    notifications, from what the commit reports: a batch of pings wakes nobody, and a
    batch of statuses does not send the notifier looking for what is not there."""
    store = open_path(db_path)
    pings = commit_messages(
        store, [("couriers/c1/location", b'{"ts":"2024-01-01T00:00:00Z","lat":1,"lng":2}', 0)], 2e9
    )
    statuses = commit_messages(
        store,
        [
            (
                "couriers/c1/status",
                b'{"event_id":"e1","order_id":"o1","status":"dasher_confirmed"}',
                0,
            )
        ],
        2e9,
    )
    alert = commit_messages(store, [("couriers/c1/lwt", b"", 0)], 2e9)  # o1 is c1's: offline
    store.close()
    assert (pings.pushes, pings.notifications, wake_for(pings)) == (0, 0, b"")
    assert (statuses.pushes, statuses.notifications, wake_for(statuses)) == (1, 0, PUSHES)
    assert (alert.pushes, alert.notifications, wake_for(alert)) == (0, 1, NOTIFICATIONS)
    assert wake_for(BatchReport(2, pushes=1, notifications=1)) == PUSHES + NOTIFICATIONS


def test_a_worker_settles_its_collector_once_started() -> None:
    """After start, a worker's collector leaves what it built alone (frozen) and runs
    after GC_YOUNG new objects, not CPython's 700: at the defaults it walked the 256
    pushes in flight over and over, a sixth of the push process's CPU. (In a process of
    its own: pytest's collector is not ours to change.)"""
    code = (
        "import gc\n"
        "from courierd.daemon.ipc import GC_YOUNG, settle_gc\n"
        "assert gc.get_threshold()[0] == 700 and gc.get_freeze_count() == 0\n"
        "settle_gc()\n"
        "print(gc.get_threshold()[0] == GC_YOUNG > 700, gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_a_claim_passes_over_the_pushes_in_flight_and_takes_the_next_heads(
    db_path: Path,
) -> None:
    """With places in flight, a claim takes the next pushes due that head their order,
    up to its limit: none of those in flight (left out by the claim itself, not read and
    dropped), and never an order's next push while its head is in flight; once the head
    is delivered, the next push of its order is next in line."""
    store = open_path(db_path)
    for o in range(12):  # o0..o11 confirmed at 1..12 s: due in that order
        store.writer.commit(
            [StatusEvent(f"c{o}", f"o{o}", "c1", Status.DASHER_CONFIRMED)], now=1.0 + o
        )
    for o in range(3):  # o0..o2 also arriving, behind their confirms
        store.writer.commit(
            [StatusEvent(f"a{o}", f"o{o}", "c1", Status.ARRIVING_AT_STORE)], now=20.0
        )
    out = store.outbox

    def claim(limit: int, busy: list[int]) -> list[tuple[str, str]]:
        return [(r.order_id, r.status) for r in out.claim_due(100.0, limit, busy=busy)]

    first = out.claim_due(100.0, 8)
    assert [r.order_id for r in first] == [f"o{o}" for o in range(8)]
    busy = [r.id for r in first]
    assert claim(3, busy) == [(f"o{o}", "dasher_confirmed") for o in (8, 9, 10)]
    busy += [r.id for r in out.claim_due(100.0, 3, busy=busy)]
    # Only o11's confirm is left that no push in flight holds back.
    assert claim(5, busy) == [("o11", "dasher_confirmed")]
    out.record_results([PushResult(first[0].id, DELIVERED, 100.0)])
    busy.remove(first[0].id)
    assert claim(5, busy) == [("o11", "dasher_confirmed"), ("o0", "arriving_at_store")]
    store.close()


def test_a_report_counts_outcomes_and_times_only_the_deliveries(
    db_path: Path, onetablet: Sandbox
) -> None:
    """Each result counts under its outcome; each delivered push adds its latency and
    its four stages (never below 0), and a report without deliveries has no stage."""
    T0 = 1_000_000.0
    store, answer, clocks, d, client = _refused_at_first(db_path, onetablet, "o0", T0)
    try:
        _settle(d)
        first = d.report()
        assert (dict(first.outcomes), first.latencies, first.stages) == ({"retry": 1}, [], {})
        answer["now"] = None
        store.writer.commit(
            [StatusEvent(f"e{i}", f"o{i}", "c1", Status.DASHER_CONFIRMED) for i in (1, 2)],
            now=T0,
        )
        clocks.advance(2.0)  # the retry is due; every push was created 2 s ago
        started = time.time()  # the stages after the claim are on the wall clock
        d.wake()
        wait_until(lambda: (d.turn(), store.outbox.stats()[0] == 0)[1], 10, "deliveries")
        second = d.report()
        assert dict(second.outcomes) == {"delivered": 3}
        assert second.latencies == [2.0, 2.0, 2.0]
        assert list(second.stages) == ["claim", "send", "reply", "record"]
        assert all(len(v) == 3 and min(v) >= 0.0 for v in second.stages.values())
        took = time.time() - started
        stages = second.stages
        for i in range(3):  # a real exchange takes time; the three fit in the wall time
            assert stages["reply"][i] > 0.0
            assert stages["send"][i] + stages["reply"][i] + stages["record"][i] <= took
    finally:
        client.close()
        store.close()
