"""`courierd run` end to end: real Mosquitto on a free port, real HTTP stand-in for OneTablet.

Each test starts its own broker and daemon, so it can stop, kill and restart them.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.lifecycle import CHAIN
from tests.conftest import Cli
from tests.harness import (
    API_KEY,
    Broker,
    Daemon,
    Rig,
    all_dropped_off,
    delivered,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.integration
STATUSES = [s.value for s in CHAIN]


def test_many_orders_through_the_chain(rig: Rig) -> None:
    """Every order's five statuses reach OneTablet once each, in order, with key and courier."""
    daemon = rig.daemon().start()
    pub = rig.publisher()
    orders = [f"order-{i}" for i in range(25)]
    for i in range(5):
        pub.publish(
            f"couriers/c{i}/profile",
            {"full_name": f"Courier {i}", "phone": "+1555", "vehicle": {"make": "Toyota"}},
            retain=True,
        )
    s = rig.store()  # the profiles first: a cluster does not keep the order of arrival
    wait_until(
        lambda: s.db.value("SELECT count(*) FROM couriers WHERE profile IS NOT NULL") == 5,
        10,
        "the profiles",
    )
    s.close()
    for step, status in enumerate(STATUSES):
        for n, order in enumerate(orders):
            pub.status(f"c{n % 5}", f"{order}-{step}", order, status, ts="2024-01-15T18:05:00Z")
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, orders), 30)
    got = delivered(rig.onetablet)
    for n, order in enumerate(orders):
        reqs = got[order]
        assert statuses(reqs) == STATUSES
        first = reqs[0]
        assert first.headers["x-api-key"] == API_KEY
        assert first.json == {
            "delivery_status": "dasher_confirmed",
            "courier_info": {
                "full_name": f"Courier {n % 5}",
                "phone": "+1555",
                "vehicle": {"make": "Toyota"},
            },
        }
        assert len({r.headers["idempotency-key"] for r in reqs}) == 5
    wait_until(
        lambda: daemon.metric('courierd_pushes_total{outcome="delivered"}') == 125,
        5,
        "delivered counter",
    )

    def events(outcome: str) -> float:
        return daemon.metric(f'courierd_status_events_total{{outcome="{outcome}"}}')

    if rig.backend == "sqlite":
        assert events("accepted") == 125
    else:  # a cluster's shared subscriptions hand a courier's messages out round robin:
        # some arrive after a later one was already taken (filled, then stale)
        wait_until(lambda: events("accepted") + events("stale") == 125, 10, "every event")
    assert daemon.stop() == 0
    pub.close()


def test_out_of_order_duplicates_and_skips_over_mqtt(rig: Rig) -> None:
    """Reordered, repeated and skipping events still give the chain exactly once each."""
    rig.daemon().start()
    pub = rig.publisher()
    pub.status("c1", "e3", "o1", "dasher_out_for_delivery")
    pub.status("c1", "e1", "o1", "dasher_confirmed")
    pub.status("c1", "e3", "o1", "dasher_out_for_delivery")
    pub.status("c1", "e2", "o1", "arrived_at_store")
    pub.status("c1", "e9", "o1", "dasher_out_for_delivery")
    pub.status("c1", "e4", "o1", "dropoff")
    pub.status("c1", "e4", "o1", "dropoff")
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, ["o1"]), 10)
    assert statuses(delivered(rig.onetablet)["o1"]) == STATUSES
    if rig.backend == "postgres":
        return  # a cluster's shared subscriptions do not keep the arrival order below
    s = rig.store()
    view = s.queries.order_view("o1")
    s.close()
    assert view is not None
    assert [t["inferred"] for t in view["transitions"]] == [True, True, True, False, False]


def test_kill_9_mid_stream_loses_nothing(rig: Rig) -> None:
    """SIGKILL three times while events flow: all statuses arrive, in order; a push sent
    twice keeps its Idempotency-Key."""
    rig.onetablet.faults.latency_ms = 3  # keep pushes in flight when the kill lands
    daemon = rig.daemon().start()
    orders = [f"k{i}" for i in range(30)]
    events = [(o, step) for step in range(5) for o in orders]
    done = threading.Event()

    def publish_all() -> None:
        pub = rig.publisher()
        for o, step in events:
            pub.status("c1", f"{o}-{step}", o, STATUSES[step])
            time.sleep(0.04)  # pacing: a stream over about 6 s, outlasting the restarts
        pub.close()
        done.set()

    threading.Thread(target=publish_all, daemon=True).start()
    rng = random.Random(7)

    def pushed_or_finished(n: int) -> bool:
        """n pushes made, or all of them (a fast machine can finish before a kill)."""
        return len(rig.onetablet.requests()) >= n or all_dropped_off(rig.onetablet, orders)

    for _ in range(3):  # kill after a random number of further pushes, three times
        target = len(rig.onetablet.requests()) + rng.randint(5, 40)
        # A cluster member that was killed takes its MQTT sessions back only once their
        # leases (5 s in these tests) lapse: allow for that on PostgreSQL.
        wait_until(functools.partial(pushed_or_finished, target), 45, "some pushes")
        daemon.kill()  # the broker keeps queueing for courierd's session meanwhile
        daemon = rig.daemon().start()
    assert done.wait(30)
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, orders), 60)
    keys: dict[tuple[str, str], str] = {}
    for order, reqs in delivered(rig.onetablet).items():
        seq = statuses(reqs)
        deduped = [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]
        assert deduped == STATUSES, (order, seq)  # nothing lost, nothing reordered
        for r in reqs:
            key = (order, r.json["delivery_status"])
            assert (
                keys.setdefault(key, r.headers["idempotency-key"]) == r.headers["idempotency-key"]
            )
    assert daemon.stop() == 0


def test_broker_restart_and_daemon_downtime(rig: Rig) -> None:
    """Broker restarted under the daemon: it reconnects. Daemon down while couriers
    publish: the persistent session delivers everything when it is back."""
    daemon = rig.daemon().start()
    rig.broker.stop()
    wait_until(lambda: daemon.health()[0] == 503, 10, "health to report the lost broker")
    assert "mqtt" in daemon.health()[1]["reasons"][0]
    rig.broker.start()
    wait_until(lambda: daemon.health()[0] == 200, 20, "reconnect")
    pub = rig.publisher()
    pub.status("c1", "a1", "b1", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "b1" in delivered(rig.onetablet), 10)

    assert daemon.stop() == 0
    for step, status in enumerate(STATUSES[1:], start=2):
        pub.status("c1", f"a{step}", "b1", status)
    for i in range(20):
        pub.status("c2", f"x{i}", f"late-{i}", "dropoff")
    pub.close()
    rig.daemon().start()
    late = [f"late-{i}" for i in range(20)]
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, ["b1", *late]), 20)
    assert statuses(delivered(rig.onetablet)["b1"]) == STATUSES


def test_onetablet_outage_then_recovery_keeps_order(rig: Rig) -> None:
    """500s and 503s for a while: every push is retried and delivered, in order."""
    failures = {"left": 25}
    lock = threading.Lock()

    def flaky(_: Request) -> tuple[int, dict[str, str], object] | None:
        with lock:
            if failures["left"] > 0:
                failures["left"] -= 1
                code = 500 if failures["left"] % 2 else 503
                return code, {}, {"error": "Down", "message": "maintenance"}
        return None

    rig.onetablet.responder = flaky
    daemon = rig.daemon().start()
    pub = rig.publisher()
    for o in ("p1", "p2", "p3"):
        for step, status in enumerate(STATUSES):
            pub.status("c1", f"{o}-{step}", o, status)
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, ["p1", "p2", "p3"]), 30)
    for o in ("p1", "p2", "p3"):
        assert statuses(delivered(rig.onetablet)[o]) == STATUSES
    assert daemon.metric('courierd_pushes_total{outcome="retry"}') >= 20
    assert daemon.stop() == 0


def test_401_pauses_everything_then_recovers(rig: Rig) -> None:
    """With a refused key: few calls (no hammering), health 503; when fixed: all delivered."""
    refusing = threading.Event()
    refusing.set()
    rig.onetablet.responder = lambda _: (
        (401, {}, {"error": "Unauthorized", "message": "key revoked"})
        if refusing.is_set()
        else None
    )
    daemon = rig.daemon(COURIERD_ONETABLET__RETRY_SCHEDULE_S="[0.3, 0.6, 1.0]").start()
    pub = rig.publisher()
    for i in range(10):
        pub.status("c1", f"u{i}", f"u{i}", "dasher_confirmed")
    wait_until(lambda: daemon.health()[0] == 503, 10, "health to turn red")
    assert "401" in daemon.health()[1]["reasons"][0]
    calls_before = len(rig.onetablet.requests())
    wait_until(lambda: len(rig.onetablet.requests()) >= calls_before + 2, 10, "probes")
    assert len(rig.onetablet.requests()) <= calls_before + 5  # probes, one at a time
    refusing.clear()
    orders = [f"u{i}" for i in range(10)]
    assert rig.onetablet.wait_for(lambda _: all(o in delivered(rig.onetablet) for o in orders), 15)
    wait_until(lambda: daemon.health()[0] == 200, 5, "health to recover")
    assert daemon.stop() == 0


BAD_INPUTS = [
    ("couriers/c1/status", b"\xff\xfe", "bad_utf8"),
    ("couriers/c1/status", b"{nope", "bad_json"),
    ("couriers/c1/status", b"[]", "not_object"),
    ("couriers/c1/status", b'{"order_id": "o", "status": "dropoff"}', "missing_field"),
    ("couriers/c1/status", b'{"event_id": 1, "order_id": "o", "status": "dropoff"}', "wrong_type"),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o", "status": "lost"}',
        "unknown_status",
    ),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o", "status": "dropoff", "ts": "x"}',
        "bad_ts",
    ),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "", "status": "dropoff"}',
        "bad_order_id",
    ),
    (
        "couriers/c1/status",
        ('{"event_id": "b", "order_id": "' + "x" * 129 + '", "status": "dropoff"}').encode(),
        "bad_order_id",
    ),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "a/b", "status": "dropoff"}',
        "bad_order_id",
    ),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o", "status": "dropoff", "pad": "' + b"x" * 70000 + b'"}',
        "too_large",
    ),
    ("couriers/c1/gps", b"{}", "unknown_topic"),
    # What used to stop the daemon for good (it exited, was restarted, got the same
    # unacknowledged batch, and exited again):
    ("couriers/c1/status", b"[" * 3000 + b"]" * 3000, "bad_json"),
    ("couriers/c1/status", b'{"event_id": ' + b"9" * 5000 + b"}", "bad_json"),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o", "status": "dropoff", '
        b'"ts": "0001-01-01T00:00:00+01:00"}',
        "bad_ts",
    ),
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o", "status": "dropoff", '
        b'"ts": "9999-12-31T23:59:59-01:00"}',
        "bad_ts",
    ),
    (
        "couriers/c1/status",
        rb'{"event_id": "\ud800", "order_id": "o", "status": "dropoff"}',
        "bad_unicode",
    ),
    ("couriers/c1/profile", rb'{"full_name": "\udfff"}', "bad_unicode"),
    # Ids that would forge a log line (CONTRACT.md 12): never accepted, never pushed.
    (
        "couriers/c1/status",
        b'{"event_id": "b", "order_id": "o-1\\nINFO forged line", "status": "dropoff"}',
        "bad_id",
    ),
    (
        "couriers/c\u2028x/status",
        b'{"event_id": "b", "order_id": "o", "status": "dropoff"}',
        "bad_id",
    ),
    ("dispatch/assignments", b'{"order_id": "o\\u0085", "courier_id": "c1"}', "bad_id"),
    ("couriers/c1/location", b'{"ts": "2024-01-15T18:05:00Z", "lat": NaN, "lng": 0}', "bad_json"),
    ("couriers/c1/location", b'{"ts": "2024-01-15T18:05:00Z", "lat": 1, "lng": 1e999}', "bad_json"),
    (
        "couriers/c1/location",
        b'{"ts": "2024-01-15T18:05:00Z", "lat": 95, "lng": 0}',
        "out_of_range",
    ),
    # Parsed as it arrives (the MQTT process), judged again at commit: still too far ahead.
    ("couriers/c1/location", b'{"ts": "2999-01-01T00:00:00Z", "lat": 1, "lng": 1}', "future_ts"),
    ("couriers/c1/status", b'{"pad": "' + b"x" * 200_000 + b'"}', "too_large"),
]


def test_every_bad_input_is_dead_lettered_and_daemon_goes_on(rig: Rig) -> None:
    """Each bad message, the hostile ones included: acked, counted, kept with its reason,
    nothing pushed. After a restart (kill -9) the daemon stays up and valid events flow."""
    daemon = rig.daemon().start()
    pub = rig.publisher()
    for topic, payload, _ in BAD_INPUTS:
        pub.publish(topic, payload)
    pub.status("c1", "good-1", "fine", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda rs: len(rs) >= 1, 10)
    s = rig.store()
    expected = [r for _, _, r in BAD_INPUTS]
    if rig.backend == "postgres":
        # A cluster subscribes to the kinds it reads (not couriers/#), and its shared
        # subscriptions do not keep the arrival order.
        expected = sorted(r for r in expected if r != "unknown_topic")
    count = "SELECT count(*) FROM dead_letters"
    wait_until(lambda: s.db.value(count) == len(expected), 10, "every dead letter")
    rows = s.db.rows("SELECT reason, length(payload), size FROM dead_letters ORDER BY id")
    reasons = [r[0] for r in rows]
    assert (sorted(reasons) if rig.backend == "postgres" else reasons) == expected
    assert ("too_large", 4096, len(BAD_INPUTS[-1][1])) in rows  # its start and size
    assert [r.order_id for r in rig.onetablet.requests()] == ["fine"]
    # Counted once acknowledged: after that, a kill -9 cannot have the broker send them again.
    wait_until(
        lambda: daemon.metric_total("courierd_messages_rejected_total") == len(expected),
        10,
        "every dead letter acknowledged",
    )
    assert daemon.metric('courierd_messages_rejected_total{reason="bad_order_id"}') == 3
    assert daemon.health()[0] == 200
    daemon.kill()
    daemon = rig.daemon().start()
    pub.status("c1", "good-2", "fine", "arriving_at_store")
    # (after a kill -9, a cluster member waits for its sessions' leases to lapse)
    assert rig.onetablet.wait_for(lambda _: len(delivered(rig.onetablet)["fine"]) == 2, 40)
    assert s.db.value("SELECT count(*) FROM dead_letters") == len(expected)  # none again
    s.close()
    assert daemon.health()[0] == 200
    assert daemon.stop() == 0


def test_cancelled_order_gets_no_more_pushes(rig: Rig, cli: Cli) -> None:
    """After `order cancel`, pending pushes are dropped and later events are rejected."""
    rig.onetablet.responder = lambda r: (
        (503, {}, {"error": "Busy", "message": "later"}) if "delivery-status" in r.path else None
    )
    rig.daemon().start()
    pub = rig.publisher()
    pub.status("c1", "z1", "zz", "arrived_at_store")
    wait_until(lambda: len(rig.onetablet.requests()) >= 1, 10, "first attempt")
    result = cli("order", "cancel", "zz", env=rig.store_env)
    assert result.code == 0, result.err
    rig.onetablet.responder = None
    pub.status("c1", "z2", "zz", "dropoff")
    pub.status("c1", "ok1", "other", "dasher_confirmed")
    s = rig.store()  # (a cluster may commit z2 after ok1: wait for each)
    dead = "SELECT reason FROM dead_letters"
    wait_until(lambda: s.db.rows(dead) == [("cancelled",)], 10, "z2 rejected as cancelled")
    # What could still go out for zz is its outbox rows: every one must end cancelled, so
    # that "nothing sent" below is final rather than "nothing sent yet".
    pushes = "SELECT DISTINCT state FROM outbox WHERE order_id = 'zz'"
    wait_until(lambda: s.db.rows(pushes) == [("cancelled",)], 10, "zz's pushes cancelled")
    s.close()
    assert rig.onetablet.wait_for(lambda _: "other" in delivered(rig.onetablet), 10)
    assert "zz" not in delivered(rig.onetablet)


def test_wrong_courier_and_dispatch_assignment(rig: Rig) -> None:
    """An order bound to one courier refuses another's events; dispatch can rebind it.
    (Each step waits for the one before: a cluster does not keep arrival order.)"""
    rig.daemon().start()
    pub = rig.publisher()
    s = rig.store()

    def letters() -> int:
        return int(s.db.value("SELECT count(*) FROM dead_letters"))

    def pushed(order: str) -> int:
        return len(delivered(rig.onetablet).get(order, []))

    pub.status("alice", "w1", "w", "dasher_confirmed")
    wait_until(lambda: pushed("w") == 1, 10, "alice's confirm")
    pub.status("bob", "w2", "w", "arriving_at_store")
    wait_until(lambda: letters() == 1, 10, "bob refused")
    pub.publish("dispatch/assignments", {"order_id": "w", "courier_id": "bob"})
    wait_until(lambda: s.outbox.get_order("w").courier_id == "bob", 10, "the rebinding")  # type: ignore[union-attr]
    pub.status("bob", "w3", "w", "arrived_at_store")
    pub.publish("dispatch/assignments", {"order_id": "v", "courier_id": "carol"})
    wait_until(lambda: s.outbox.get_order("v") is not None, 10, "the assignment of v")
    pub.status("alice", "v1", "v", "dasher_confirmed")
    wait_until(lambda: letters() == 2, 10, "alice refused")
    pub.status("carol", "v2", "v", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: pushed("w") == 3 and pushed("v") == 1, 10)
    assert statuses(delivered(rig.onetablet)["w"]) == STATUSES[:3]
    rows = s.db.rows("SELECT reason, payload FROM dead_letters ORDER BY id")
    s.close()
    assert [r[0] for r in rows] == ["wrong_courier", "wrong_courier"]
    assert b'"w2"' in rows[0][1] and b'"v1"' in rows[1][1]


def test_clean_stop_bad_config_and_fatal_store(sqlite_rig: Rig, tmp_path: Path) -> None:
    """SIGINT exits 0; a bad setting exits 2 naming it; an unusable database exits 1."""
    rig = sqlite_rig
    daemon = rig.daemon().start()
    assert daemon.stop(signal.SIGINT) == 0
    assert "daemon.ready" in daemon.log.read_text()
    bad = rig.daemon(COURIERD_MQTT__URL="tcp://nowhere")
    bad.start(wait_ready=False)
    assert bad.proc is not None and bad.proc.wait(20) == 2
    assert "COURIERD_MQTT__URL" in bad.log.read_text()
    (tmp_path / "blocker").write_text("")
    fatal = rig.daemon(COURIERD_STORE__PATH=str(tmp_path / "blocker" / "x.db"))
    fatal.log = tmp_path / "fatal.log"
    fatal.start(wait_ready=False)
    assert fatal.proc is not None and fatal.proc.wait(20) == 1
    assert "cannot open database" in fatal.log.read_text()


def test_queued_messages_survive_a_broker_kill_9(sqlite_rig: Rig) -> None:
    """With persistence and a 1 s autosave (as config/mosquitto.conf), messages queued
    for a stopped courierd survive a SIGKILLed broker."""
    rig = sqlite_rig
    daemon = rig.daemon().start()
    assert daemon.stop() == 0  # the broker now queues for courierd's session
    pub = rig.publisher()
    for i in range(20):
        pub.status("c1", f"q{i}", f"queued-{i}", "dasher_confirmed")
    published = time.time()
    pub.close()
    saved = rig.broker.dir / "mosquitto.db"
    wait_until(
        lambda: saved.exists() and saved.stat().st_mtime > published + 0.01,
        10,
        "the broker's autosave after the publishes",
    )
    rig.broker.kill()
    rig.broker.start()
    rig.daemon().start()
    orders = [f"queued-{i}" for i in range(20)]
    assert rig.onetablet.wait_for(lambda _: all(o in delivered(rig.onetablet) for o in orders), 20)


def test_tls_and_password_auth(tmp_path: Path, onetablet: Sandbox) -> None:
    """mqtts:// with a CA file and username/password: connects, ingests, pushes."""
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl or mosquitto_passwd not installed")
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=courierd-test-ca",
        "-days",
        "1",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (certs / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    passwd = certs / "passwd"
    passwd.touch()
    for user, password in (("courierd", "s3cret"), ("c1", "phone")):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    broker = Broker(
        tmp_path / "broker",
        anonymous=False,
        listener_options=(
            f"cafile {certs}/ca.crt\ncertfile {certs}/server.crt\n"
            f"keyfile {certs}/server.key\npassword_file {passwd}\n"
        ),
    ).start()
    try:
        env = {
            "COURIERD_MQTT__URL": f"mqtts://127.0.0.1:{broker.port}",
            "COURIERD_MQTT__CA_FILE": str(certs / "ca.crt"),
            "COURIERD_MQTT__USERNAME": "courierd",
            "COURIERD_MQTT__PASSWORD": "s3cret",
            "COURIERD_ONETABLET__BASE_URL": onetablet.url,
            "COURIERD_ONETABLET__API_KEY": API_KEY,
        }
        daemon = Daemon(tmp_path, env).start()
        phone = paho.Client(CallbackAPIVersion.VERSION2, client_id="c1", protocol=paho.MQTTv5)
        phone.tls_set(ca_certs=str(certs / "ca.crt"))
        phone.username_pw_set("c1", "phone")
        phone.connect("127.0.0.1", broker.port)
        phone.loop_start()
        phone.publish(
            "couriers/c1/status",
            json.dumps({"event_id": "t1", "order_id": "tls-1", "status": "dasher_confirmed"}),
            qos=1,
        ).wait_for_publish(10)
        assert onetablet.wait_for(lambda _: "tls-1" in delivered(onetablet), 10)
        phone.disconnect()
        phone.loop_stop()
        assert daemon.stop() == 0
        assert "s3cret" not in daemon.log.read_text()  # the password is never logged
        wrong = Daemon(tmp_path, {**env, "COURIERD_MQTT__PASSWORD": "nope"})
        wrong.log = tmp_path / "wrong.log"
        wrong.start(wait_ready=False)
        wait_until(lambda: "mqtt.refused" in wrong.log.read_text(), 10, "a refused login")
        assert wrong.health()[0] == 503
        assert wrong.stop() == 0
    finally:
        broker.stop()


def test_a_corrupt_row_costs_one_event_not_the_daemon(rig: Rig) -> None:
    """An order row with a state nobody knows (hand-edited, or from a future version)
    dead-letters the event that needs it (corrupt_row, on /metrics); the daemon stays up
    and every other order goes on."""
    daemon = rig.daemon().start()
    s = rig.store()
    s.db.execute("INSERT INTO orders (order_id, state, updated_at) VALUES ('bad', 'lost', 'x')")
    s.close()
    pub = rig.publisher()
    pub.status("c1", "f1", "bad", "dropoff")
    pub.status("c1", "f2", "good", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "good" in delivered(rig.onetablet), 10)
    wait_until(
        lambda: daemon.metric('courierd_messages_rejected_total{reason="corrupt_row"}') == 1,
        5,
        "the corrupt_row counter",
    )
    assert "bad" not in delivered(rig.onetablet)
    assert daemon.health()[0] == 200
    pub.close()


def test_a_dead_worker_process_is_fatal(rig: Rig) -> None:
    """If the ingest or dispatch process dies, the daemon exits 1 for systemd to restart it;
    after the restart everything published meanwhile still arrives."""
    for victim in ("ingest", "dispatch"):
        daemon = rig.daemon().start()
        assert daemon.proc is not None
        os.kill(daemon.workers()[victim], signal.SIGKILL)
        assert daemon.proc.wait(20) == 1
        assert "exited" in daemon.log.read_text()
    pub = rig.publisher()
    pub.status("c1", "d1", "after-death", "dasher_confirmed")
    rig.daemon().start()  # (a cluster member waits for its dead predecessor's leases)
    assert rig.onetablet.wait_for(lambda _: "after-death" in delivered(rig.onetablet), 40)
    pub.close()


def test_mqtt_3_1_1_fallback_keeps_its_session(sqlite_rig: Rig) -> None:
    """With mqtt.protocol 3.1.1 (clean_session=False) events flow, and events published
    while courierd is down arrive when it is back."""
    rig = sqlite_rig
    daemon = rig.daemon(COURIERD_MQTT__PROTOCOL="3.1.1").start()
    pub = rig.publisher()
    pub.status("c1", "v1", "old-proto", "dasher_confirmed")
    assert rig.onetablet.wait_for(lambda _: "old-proto" in delivered(rig.onetablet), 10)
    assert daemon.stop() == 0
    pub.status("c1", "v2", "old-proto", "arriving_at_store")
    rig.daemon(COURIERD_MQTT__PROTOCOL="3.1.1").start()
    assert rig.onetablet.wait_for(
        lambda _: len(delivered(rig.onetablet).get("old-proto", [])) == 2, 10
    )
    pub.close()


def test_pushes_over_the_webhooks_transport(sqlite_rig: Rig) -> None:
    """With transport = webhooks, each transition is one POST /webhooks carrying
    event.type, the order id and the REST body (CONTRACT.md section 5)."""
    rig = sqlite_rig
    rig.daemon(COURIERD_ONETABLET__TRANSPORT="webhooks").start()
    pub = rig.publisher()
    pub.status(
        "c1", "wh1", "hooked", "arriving_at_store", courier_info={"full_name": "Mike Driver"}
    )
    assert rig.onetablet.wait_for(lambda rs: len([r for r in rs if r.status == 200]) == 2, 10)
    bodies = [r.json for r in rig.onetablet.requests()]
    assert {r.path for r in rig.onetablet.requests()} == {"/webhooks"}
    assert bodies == [
        {
            "event": {"type": "order.delivery_status", "order_id": "hooked"},
            "order_id": "hooked",
            "delivery_status": status,
            "courier_info": {"full_name": "Mike Driver"},
        }
        for status in STATUSES[:2]
    ]
    pub.close()
