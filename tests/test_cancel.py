"""`order cancel` against a moving order: the check, the hold and the outcome, on a real
store and a real OneTablet stand-in, deterministically (CONTRACT.md 4.4)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from courierd.config import Settings, StoreSettings, load_settings
from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.model import Status, StatusEvent
from courierd.errors import InputError, Rejected
from courierd.services import orders
from courierd.store import Store
from tests.harness import API_KEY

T0 = 1_700_000_000.0


@pytest.fixture
def settings(onetablet: Sandbox, store_settings: StoreSettings) -> Settings:
    """Settings for the order commands, on the same store as the `store` fixture."""
    store = {"path": str(store_settings.path)}
    if store_settings.postgres_url is not None:
        store = {"url": store_settings.postgres_url}
    return load_settings(
        None,
        {
            "onetablet": {
                "base_url": onetablet.url,
                "api_key": API_KEY,
                "retry_schedule_s": [0.05],
            },
            "store": store,
        },
    )


def claimable(store: Store, order_id: str) -> list[str]:
    return [r.status for r in store.outbox.claim_due(T0 + 100, 10) if r.order_id == order_id]


def hold_cancel_calls(onetablet: Sandbox) -> tuple[threading.Event, threading.Event]:
    """OneTablet holds each cancel call: `asked` is set once one arrives, and it answers
    (as the sandbox does) once the test sets `answer` (or after 10 s)."""
    asked, answer = threading.Event(), threading.Event()

    def slow_cancel(r: Request) -> Any:
        if r.path.endswith("/cancel"):
            asked.set()
            answer.wait(10)
        return None

    onetablet.responder = slow_cancel
    return asked, answer


def test_a_dropoff_during_the_cancel_call_is_not_pushed_and_not_lost(
    store: Store, onetablet: Sandbox, settings: Settings
) -> None:
    """While OneTablet is asked to cancel, the order's pushes are held; a dropoff that
    arrives meanwhile is recorded but never pushed, and the cancel does not overwrite a
    state it did not check (the old read-then-overwrite race)."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.ARRIVING_AT_STORE)], now=T0)
    asked, answer = hold_cancel_calls(onetablet)
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(orders.cancel(settings, "o1", "OTHER", None))
    )
    worker.start()
    assert asked.wait(10)
    assert claimable(store, "o1") == []  # held while OneTablet is being asked
    store.writer.commit([StatusEvent("e2", "o1", "c1", Status.DROPOFF)], now=T0 + 1)
    assert claimable(store, "o1") == []  # the dropoff's push waits too
    answer.set()
    worker.join(10)
    assert result["cancelled"] is True and result["dropped_pushes"] == 5
    view = store.queries.order_view("o1")
    assert view is not None and view["state"] == "cancelled" and not view["cancelling"]
    assert {p["state"] for p in view["pushes"]} == {"cancelled"}
    assert [t["status"] for t in view["transitions"]][-1] == "dropoff"  # recorded, not pushed


def test_a_refused_cancel_lets_the_pushes_go_again(
    store: Store, onetablet: Sandbox, settings: Settings
) -> None:
    """OneTablet refuses the cancel (400): exit with its message, the hold is released,
    and the order's pushes flow as if nothing happened."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.ARRIVED_AT_STORE)], now=T0)
    onetablet.responder = lambda r: (
        (400, {}, {"error": "Bad Request", "message": "already picked up"})
        if r.path.endswith("/cancel")
        else None
    )
    with pytest.raises(Rejected, match="already picked up"):
        orders.cancel(settings, "o1", "OTHER", None)
    assert claimable(store, "o1") == ["dasher_confirmed"]
    view = store.queries.order_view("o1")
    assert view is not None and view["state"] == "arrived_at_store" and not view["cancelling"]


def test_cancel_is_refused_after_dropoff_without_calling_onetablet(
    store: Store, onetablet: Sandbox, settings: Settings
) -> None:
    """A dropped-off order cannot be cancelled: exit 2, and OneTablet never hears of it."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.DROPOFF)], now=T0)
    with pytest.raises(InputError, match="dropped off"):
        orders.cancel(settings, "o1", "OTHER", None)
    assert onetablet.requests() == []
    assert claimable(store, "o1") == ["dasher_confirmed"]
