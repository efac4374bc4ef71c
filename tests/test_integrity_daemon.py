"""Data integrity (CONTRACT.md 12) through the real daemon and a real Mosquitto, on each
backend: late assignments, event ids of other orders, abandoned orders."""

from __future__ import annotations

import time

import pytest

from courierd.domain.model import iso
from tests.harness import Rig, delivered, statuses, wait_until

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
