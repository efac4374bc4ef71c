"""Telemetry through the running daemon: a phone that only sends positions, OwnTracks
phones via the real mosquitto_pub (MQTT 3.1.1 and 5), last wills and the watchdog's
alerts on dispatch/alerts (CONTRACT.md 7, 8, 9)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from courierd.domain.model import iso
from tests.harness import Rig, delivered, statuses, wait_until

pytestmark = pytest.mark.integration
STORE = (40.7000, -74.0000)
HOME = (40.7200, -74.0300)


def moved(point: tuple[float, float], north_m: float, east_m: float) -> tuple[float, float]:
    lat, lng = point
    return lat + north_m / 111_320, lng + east_m / (111_320 * math.cos(math.radians(lat)))


def a_delivery(t0: float) -> list[tuple[float, tuple[float, float]]]:
    """Approach the store, wait 3 minutes at it, leave for the customer (fix times)."""
    route = [(t0 + i * 10, moved(STORE, 3000 - i * 200, 0)) for i in range(15)]
    t = route[-1][0]
    route += [(t + 10 * (i + 1), moved(STORE, (i % 3) * 5, 0)) for i in range(18)]
    t = route[-1][0]
    route += [(t + 10 * (i + 1), moved(STORE, 0, 100 * (i + 1))) for i in range(10)]
    return route


class Listener:
    """An MQTT client (dispatch, say) collecting what courierd publishes."""

    def __init__(self, port: int, *topics: str) -> None:
        self.got: list[tuple[str, dict[str, object]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{topics[0]}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, json.loads(msg.payload)))

    def messages(self) -> list[tuple[str, dict[str, object]]]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for_pickup(rig: Rig, order_id: str) -> None:
    """Until dispatch's assignment with the order's pickup is committed."""
    s = rig.store()
    try:
        wait_until(lambda: s.queries.places(order_id)[0] is not None, 10, "the assignment")
    finally:
        s.close()


def test_a_phone_that_only_sends_positions(rig: Rig) -> None:
    """dispatch/assignments with places, the app's dasher_confirmed, then fixes only: the
    order goes through arriving, arrived and out for delivery, each pushed once, in order,
    marked as inferred by the geofence."""
    rig.daemon().start()
    pub = rig.publisher()
    pub.publish(
        "dispatch/assignments",
        {
            "order_id": "geo-1",
            "courier_id": "c1",
            "pickup": {"lat": STORE[0], "lng": STORE[1], "radius_m": 80},
            "dropoff": {"lat": HOME[0], "lng": HOME[1]},
        },
    )
    pub.status("c1", "g1", "geo-1", "dasher_confirmed")
    # A cluster's shared subscriptions hand consecutive messages to different sessions, so
    # the fixes wait until the places and the app's confirmation are in (else the geofence
    # may fire first and the confirmation becomes a gap fill).
    wait_for_pickup(rig, "geo-1")
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("geo-1", [])) == 1)
    for t, (lat, lng) in a_delivery(time.time() - 3600):  # buffered fixes, sent late
        pub.publish("couriers/c1/location", {"ts": iso(t), "lat": lat, "lng": lng, "accuracy_m": 5})
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("geo-1", [])) == 4)
    got = delivered(rig.onetablet)["geo-1"]
    assert statuses(got) == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
    ]
    assert [r.headers.get("x-courierd-source") for r in got] == ["app"] + ["geofence"] * 3
    pub.close()


def mosquitto_pub(port: int, version: str, topic: str, payload: dict[str, object]) -> None:
    subprocess.run(
        [
            *("mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", version, "-q", "1"),
            *("-i", f"owntracks-{version}", "-t", topic, "-m", json.dumps(payload)),
        ],
        check=True,
        capture_output=True,
        timeout=10,
    )


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_owntracks_phones_work_unchanged(rig: Rig, version: str) -> None:
    """OwnTracks JSON published by the real mosquitto_pub: locations drive the order,
    waypoints and transitions are counted and ignored, `_type: lwt` alerts dispatch."""
    if shutil.which("mosquitto_pub") is None:
        pytest.skip("mosquitto_pub not installed (apt-get install mosquitto-clients)")
    daemon = rig.daemon().start()
    alerts = Listener(rig.broker.port, "dispatch/alerts")
    pub = rig.publisher()
    pub.publish(
        "dispatch/assignments",
        {"order_id": "ot-1", "courier_id": "jane", "pickup": {"lat": STORE[0], "lng": STORE[1]}},
    )
    wait_for_pickup(rig, "ot-1")
    topic = "owntracks/jane/phone"
    route = a_delivery(int(time.time()) - 3600)
    for t, (lat, lng) in route[:33]:  # up to and while parked at the store
        fix = {"_type": "location", "lat": lat, "lon": lng, "tst": int(t), "acc": 8, "tid": "ja"}
        mosquitto_pub(rig.broker.port, version, topic, fix)
    mosquitto_pub(rig.broker.port, version, f"{topic}/event", {"_type": "transition"})
    mosquitto_pub(rig.broker.port, version, topic, {"_type": "waypoint", "desc": "home"})
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet).get("ot-1", [])) == 3)
    assert statuses(delivered(rig.onetablet)["ot-1"]) == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
    ]
    mosquitto_pub(rig.broker.port, version, topic, {"_type": "lwt", "tst": int(time.time())})
    wait_until(lambda: alerts.messages(), 10, "the offline alert")
    (alert_topic, alert), *_ = alerts.messages()
    assert alert_topic == "dispatch/alerts"
    assert (alert["type"], alert["courier_id"], alert["order_ids"]) == (
        "courier_offline",
        "jane",
        ["ot-1"],
    )
    wait_until(
        lambda: daemon.metric('courierd_messages_ignored_total{kind="owntracks_waypoint"}') == 1,
        5,
        "the ignored waypoint on /metrics",
    )
    wait_until(
        lambda: daemon.metric('courierd_messages_ignored_total{kind="owntracks_transition"}') == 1,
        5,
        "the ignored transition on /metrics",
    )
    alerts.close()
    pub.close()


def test_the_watchdog_alerts_once_per_silence_and_when_the_courier_is_back(rig: Rig) -> None:
    """A courier with an active order silent for offline_after_s: one courier_offline on
    dispatch/alerts, the gauge at 1, order show says so; its next fix: courier_back.
    A last will on couriers/{id}/lwt alerts at once."""
    daemon = rig.daemon(COURIERD_WATCHDOG__OFFLINE_AFTER_S="10").start()
    alerts = Listener(rig.broker.port, "dispatch/alerts")
    pub = rig.publisher()
    silent_since = time.monotonic()  # c1's last word: the watchdog counts from here
    pub.status("c1", "w1", "watched", "dasher_confirmed")
    pub.status("c2", "w2", "willed", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: {"watched", "willed"} <= set(delivered(rig.onetablet)))
    pub.publish("couriers/c2/lwt", b"")  # after: a cluster does not keep the arrival order
    wait_until(lambda: alerts.messages(), 10, "the last will's alert")
    assert [(m["type"], m["courier_id"]) for _, m in alerts.messages()] == [
        ("courier_offline", "c2")
    ]
    wait_until(lambda: len(alerts.messages()) == 2, 30, "the watchdog's alert")
    assert time.monotonic() - silent_since >= 8  # not before the silence was long enough
    _, offline = alerts.messages()[1]
    assert (offline["type"], offline["courier_id"], offline["order_ids"]) == (
        "courier_offline",
        "c1",
        ["watched"],
    )
    wait_until(lambda: daemon.metric("courierd_couriers_offline") == 2, 5, "the gauge")
    s = rig.store()
    view = s.queries.order_view("watched")
    assert view is not None and view["courier_offline"] is True
    pub.publish(
        "couriers/c1/location",
        {"ts": iso(time.time()), "lat": 40.7, "lng": -74.0, "accuracy_m": 5},
    )
    wait_until(lambda: len(alerts.messages()) == 3, 10, "courier_back")
    assert alerts.messages()[2][1]["type"] == "courier_back"
    assert len([m for _, m in alerts.messages() if m["courier_id"] == "c1"]) == 2  # once each
    s.close()
    alerts.close()
    pub.close()
