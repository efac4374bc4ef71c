"""Data integrity (CONTRACT.md 12) through the real daemon and a real Mosquitto, on each
backend: late assignments, event ids of other orders, abandoned orders."""

from __future__ import annotations

import json
import time

import pytest

from courierd.domain.model import iso
from tests.conftest import Cli
from tests.harness import Rig, delivered, statuses, wait_until
from tests.test_telemetry_daemon import STORE, a_delivery, wait_for_pickup

pytestmark = pytest.mark.integration


def test_a_late_older_assignment_does_not_replace_the_newer_one(rig: Rig) -> None:
    """dispatch binds as-1 to c-new, then an assignment 60 s older to c-old arrives: the
    order stays c-new's, whose dasher_confirmed is pushed; c-old's is wrong_courier."""
    daemon = rig.daemon().start()
    pub = rig.publisher()
    now = time.time()
    pub.publish("dispatch/assignments", {"order_id": "as-1", "courier_id": "c-new", "ts": iso(now)})
    pub.publish(
        "dispatch/assignments", {"order_id": "as-1", "courier_id": "c-old", "ts": iso(now - 60)}
    )
    received = 'courierd_messages_received_total{kind="assignment"}'
    wait_until(lambda: daemon.metric(received) == 2, 10, "both assignments committed")
    pub.status("c-old", "e-old", "as-1", "dasher_confirmed")
    pub.status("c-new", "e-new", "as-1", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "as-1" in delivered(rig.onetablet), 10)
    wrong = 'courierd_messages_rejected_total{reason="wrong_courier"}'
    wait_until(lambda: daemon.metric(wrong) == 1, 10, "c-old's event refused")
    assert statuses(delivered(rig.onetablet)["as-1"]) == ["dasher_confirmed"]
    s = rig.store()
    try:
        assert s.db.value("SELECT courier_id FROM orders WHERE order_id = 'as-1'") == "c-new"
        assert s.db.value("SELECT event_id FROM transitions WHERE order_id = 'as-1'") == "e-new"
        refused = "SELECT topic FROM dead_letters WHERE reason = 'wrong_courier'"
        assert s.db.value(refused) == "couriers/c-old/status"
    finally:
        s.close()
    pub.close()


def test_an_abandoned_order_expires_without_a_push_and_refuses_later_events(
    rig: Rig, cli: Cli
) -> None:
    """With store.abandon_after_h at 2 s, an order nobody touches becomes expired:
    `order show` says so, it is not active, nothing is pushed; a later event for it is an
    `expired` dead letter, while another order's event sent after it is pushed."""
    daemon = rig.daemon(COURIERD_STORE__ABANDON_AFTER_H=str(2 / 3600)).start()
    pub = rig.publisher()
    pub.status("c1", "e1", "ab-1", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "ab-1" in delivered(rig.onetablet), 10)

    def state() -> str:
        shown = cli("order", "show", "ab-1", env=rig.store_env)
        return str(json.loads(shown.out)["state"]) if shown.code == 0 else ""

    wait_until(lambda: state() == "expired", 20, "the order to expire")
    s = rig.store()
    try:
        active, _ = s.queries.order_page(state="active", courier_id=None, limit=10, after=None)
        assert active == []
    finally:
        s.close()
    pub.status("c1", "e2", "ab-1", "arrived_at_store")
    pub.status("c2", "e3", "sentinel", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "sentinel" in delivered(rig.onetablet), 10)
    refused = 'courierd_messages_rejected_total{reason="expired"}'
    wait_until(lambda: daemon.metric(refused) == 1, 10, "the late event refused")
    assert statuses(delivered(rig.onetablet)["ab-1"]) == ["dasher_confirmed"]
    pub.close()


def test_buffered_fixes_depart_after_an_arrival_sent_without_ts(rig: Rig) -> None:
    """The app says arrived_at_store without a ts; the phone's buffered fixes (taken an
    hour ago: parked at the store, then away) arrive after it. dasher_out_for_delivery
    is inferred on the fixes' clock, not from when courierd received the arrival."""
    rig.daemon().start()
    pub = rig.publisher()
    pickup = {"lat": STORE[0], "lng": STORE[1], "radius_m": 80}
    pub.publish("dispatch/assignments", {"order_id": "dep-1", "courier_id": "c1", "pickup": pickup})
    wait_for_pickup(rig, "dep-1")
    pub.status("c1", "a1", "dep-1", "arrived_at_store")
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("dep-1", [])) == 3)
    for t, (lat, lng) in a_delivery(time.time() - 3600)[15:]:  # parked, then away
        pub.publish("couriers/c1/location", {"ts": iso(t), "lat": lat, "lng": lng, "accuracy_m": 5})
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("dep-1", [])) == 4)
    assert statuses(delivered(rig.onetablet)["dep-1"])[-1] == "dasher_out_for_delivery"
    pub.close()
