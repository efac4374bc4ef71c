"""OneTablet → courierd events (CONTRACT.md 11): the store's part on both backends, then
the real listener with a real broker: effects, replies, repeats, junk."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courierd.domain.model import Status, StatusEvent
from courierd.domain.restaurant import Kind, RestaurantEvent
from courierd.store import Store
from tests.conftest import Cli
from tests.harness import Daemon, Rig, delivered, free_port, statuses, wait_until
from tests.hostile import fragments
from tests.test_telemetry_daemon import Listener

T0 = 1_700_000_000.0
SECRET = "webhook-secret-7f1d"


def told(store: Store) -> list[tuple[str, dict[str, Any]]]:
    return [(n.topic, json.loads(n.payload)) for n in store.notices.due(100)]


def test_events_record_cancel_and_tell_the_courier_and_dispatch(store: Store) -> None:
    """Confirmed and ready are recorded and told to the bound courier and dispatch; a
    rejection cancels the order locally (its unsent pushes dropped); the same event id
    twice does nothing the second time."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.ARRIVING_AT_STORE)], now=T0)
    inbound = store.inbound
    assert inbound.apply(RestaurantEvent(Kind.CONFIRMED, "o1", "ev-1"), T0 + 1)
    assert not inbound.apply(RestaurantEvent(Kind.CONFIRMED, "o1", "ev-1"), T0 + 2)
    assert inbound.apply(RestaurantEvent(Kind.READY, "o1", None), T0 + 3)
    view = store.queries.order_view("o1")
    assert view is not None
    assert view["restaurant"] == {"confirmed_at": "2023-11-14T22:13:21.000Z",
                                  "ready_at": "2023-11-14T22:13:23.000Z"}  # fmt: skip
    assert inbound.apply(RestaurantEvent(Kind.REJECTED, "o1", "ev-2"), T0 + 4)
    view = store.queries.order_view("o1")
    assert view is not None and view["state"] == "cancelled"
    assert {p["state"] for p in view["pushes"]} == {"cancelled"}
    got = [(topic, doc["type"]) for topic, doc in told(store)]
    assert got == [
        ("dispatch/events", "order_confirmed"),
        ("couriers/c1/orders", "order_confirmed"),
        ("dispatch/events", "order_ready"),
        ("couriers/c1/orders", "order_ready"),
        ("dispatch/events", "order_cancelled"),
        ("couriers/c1/orders", "order_cancelled"),
    ]


def test_a_dropped_off_order_is_not_cancelled_by_a_late_rejection(store: Store) -> None:
    """As with `order cancel`: after dropoff a rejection is recorded, nothing changes."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.DROPOFF)], now=T0)
    assert store.inbound.apply(RestaurantEvent(Kind.CANCELLED, "o1", "x"), T0 + 1)
    assert store.outbox.get_order("o1").state == "dropoff"  # type: ignore[union-attr]
    assert told(store) == []


def test_an_expired_order_stays_expired_after_a_late_cancellation(store: Store) -> None:
    """Expired is as final as dropoff: a later rejection or cancellation is recorded
    and changes nothing, and nobody is told of a cancellation."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=T0)
    assert store.expiry.step(T0 + 25 * 3600) == ["o1"]
    for kind, event_id in ((Kind.REJECTED, "x"), (Kind.CANCELLED, "y")):
        assert store.inbound.apply(RestaurantEvent(kind, "o1", event_id), T0 + 25 * 3600)
    assert store.outbox.get_order("o1").state == "expired"  # type: ignore[union-attr]
    assert told(store) == []


def test_an_event_for_an_order_not_seen_yet_reaches_its_courier_later(store: Store) -> None:
    """The restaurant confirms before any courier: when one is bound, it is told."""
    assert store.inbound.apply(RestaurantEvent(Kind.CONFIRMED, "early", "e"), T0)
    assert [doc["type"] for topic, doc in told(store)] == ["order_confirmed"]  # dispatch only
    store.notices.published([n.id for n in store.notices.due(10)])
    store.writer.commit([StatusEvent("s1", "early", "c9", Status.DASHER_CONFIRMED)], now=T0 + 5)
    assert [(t, doc["type"], doc["at"]) for t, doc in told(store)] == [
        ("couriers/c9/orders", "order_confirmed", "2023-11-14T22:13:20.000Z")
    ]


def post(port: int, body: bytes, key: str | None = SECRET, path: str = "/onetablet/events"):  # type: ignore[no-untyped-def]
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:  # the reply it holds, closed
            return e.code, json.loads(e.read())


def event(kind: str, order: str, event_id: str | None = None) -> bytes:
    body: dict[str, Any] = {"event": {"type": kind, "order_id": order}, "order": {"x": 1}}
    if event_id:
        body["event"]["id"] = event_id
    return json.dumps(body).encode()


@pytest.fixture
def hooked(sqlite_rig: Rig) -> tuple[Rig, Daemon, int]:
    port = free_port()
    daemon = sqlite_rig.daemon(
        COURIERD_WEBHOOK__LISTEN=f"127.0.0.1:{port}", COURIERD_WEBHOOK__SECRET=SECRET
    ).start()
    return sqlite_rig, daemon, port


@pytest.mark.integration
def test_a_rejection_stops_pushes_and_ready_reaches_the_courier(
    hooked: tuple[Rig, Daemon, int],
) -> None:
    """Through the real listener: `order.ready` reaches the courier's app and dispatch,
    `order.rejected` (flat body) stops the order's pushes without calling OneTablet back."""
    rig, daemon, port = hooked
    courier = Listener(rig.broker.port, "couriers/c1/orders")
    dispatch = Listener(rig.broker.port, "dispatch/events")
    pub = rig.publisher()
    pub.status("c1", "h1", "h-1", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "h-1" in delivered(rig.onetablet), 10)
    assert post(port, event("order.ready", "h-1", "r-1")) == (200, {"status": "ok"})
    assert post(port, event("order.ready", "h-1", "r-1")) == (200, {"status": "ok"})  # again
    wait_until(lambda: courier.messages(), 10, "the courier told")
    assert [m["type"] for _, m in courier.messages()] == ["order_ready"]
    flat = json.dumps({"type": "order.rejected", "order_id": "h-1"}).encode()
    assert post(port, flat) == (200, {"status": "ok"})
    wait_until(lambda: len(dispatch.messages()) == 2, 10, "dispatch told twice")
    assert [m["type"] for _, m in dispatch.messages()] == ["order_ready", "order_cancelled"]
    pub.status("c1", "h2", "h-1", "arriving_at_store")
    pub.status("c1", "h3", "other", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "other" in delivered(rig.onetablet), 10)
    wait_until(lambda: len(courier.messages()) == 2, 10, "the courier told of the rejection")
    assert statuses(delivered(rig.onetablet)["h-1"]) == ["dasher_confirmed"]
    assert not any(r.path.endswith("/cancel") for r in rig.onetablet.requests())
    assert daemon.health()[0] == 200
    for c in (courier, dispatch):
        c.close()
    pub.close()


@pytest.mark.integration
def test_junk_wrong_secrets_and_big_bodies_get_clear_errors(
    hooked: tuple[Rig, Daemon, int],
) -> None:
    """401 without the secret, 413 above 64 KiB, 400 with the error shape for junk, 405
    and 404 elsewhere; the listener goes on serving."""
    _, daemon, port = hooked
    assert post(port, event("order.ready", "j"), key=None)[0] == 401
    assert post(port, event("order.ready", "j"), key="wrong")[0] == 401
    code, body = post(port, b'{"pad": "' + b"x" * 70_000 + b'"}')
    assert code == 413 and set(body) == {"error", "message"}
    for junk in (
        b"{nope",
        b"[]",
        b'{"type": "order.eaten", "order_id": "j"}',
        b'{"type": 5, "order_id": "j"}',
        b'{"event": "order.ready"}',
        b'{"type": "order.ready", "order_id": "a/b"}',
        b'{"type": "order.ready", "order_id": "j", "x": NaN}',
        b"[" * 5000,
        b"\xff\xfe",
    ):
        code, body = post(port, junk)
        assert code == 400 and set(body) == {"error", "message"} and body["message"], junk
    assert post(port, b"{}", path="/elsewhere")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/onetablet/events")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 405
    assert post(port, event("order.confirmed", "j", "ok-1")) == (200, {"status": "ok"})
    assert daemon.health()[0] == 200


@pytest.mark.integration
@given(body=st.one_of(fragments.map(str.encode), st.binary(max_size=500)))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_hostile_bodies_never_break_the_listener(
    hooked: tuple[Rig, Daemon, int], body: bytes
) -> None:
    """Whatever the body: 200 or 400 with the error shape, never a 500 or a hang."""
    _, _, port = hooked
    code, reply = post(port, body)
    assert code in (200, 400), (code, reply)
    assert reply == {"status": "ok"} or set(reply) == {"error", "message"}


def test_a_listener_without_a_secret_is_a_config_error(cli: Cli) -> None:
    """webhook.listen without webhook.secret stops startup (exit 2) naming the setting."""
    r = cli("run", env={"COURIERD_WEBHOOK__LISTEN": "127.0.0.1:9999"})
    assert r.code == 2 and "COURIERD_WEBHOOK__SECRET" in r.err


def test_a_short_or_unsendable_secret_is_a_config_error(cli: Cli) -> None:
    """A webhook.secret too short, or one no HTTP header can carry, is exit 2 naming it."""
    for bad in ("short", "x" * 257, "tab\there-0123456789", " padded-0123456789 "):
        r = cli(
            "run",
            env={"COURIERD_WEBHOOK__LISTEN": "127.0.0.1:9999", "COURIERD_WEBHOOK__SECRET": bad},
        )
        assert r.code == 2, bad
        assert "webhook.secret" in r.err and "COURIERD_WEBHOOK__SECRET" in r.err, r.err
        assert bad not in r.err  # a secret is never echoed
