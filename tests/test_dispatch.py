"""The dispatcher on a real store and a real HTTP stand-in, driven directly."""

from __future__ import annotations

import threading
from pathlib import Path

from courierd.daemon.dispatch import Dispatcher
from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.model import Status, StatusEvent
from courierd.edges.onetablet import OneTabletClient
from tests.conftest import API_KEY, open_path
from tests.harness import wait_until


def test_push_claimed_before_a_cancel_is_not_sent(db_path: Path, onetablet: Sandbox) -> None:
    """A push already claimed, waiting for a free worker, is dropped if `order cancel`
    lands meanwhile (CONTRACT.md 4.4): it is checked again just before sending."""
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
    client = OneTabletClient(onetablet.url, API_KEY)
    dispatch_store = open_path(db_path)
    checker = open_path(db_path)
    # One worker: "first" is sent and held; "second" is claimed and waits in the queue.
    dispatcher = Dispatcher(
        dispatch_store.outbox, client, concurrency=1, still_pending=checker.outbox.is_pending
    )
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
        client.close()
    assert [r.order_id for r in onetablet.requests()] == ["first"]
    view = store.queries.order_view("second")
    assert view is not None and view["pushes"][0]["state"] == "cancelled"
    store.close()
    dispatch_store.close()
    checker.close()
