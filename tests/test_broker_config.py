"""The shipped broker configuration is part of the product: config/mosquitto.conf starts,
and config/mosquitto.acl lets every party use exactly its topics, on a real Mosquitto."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import Broker, free_port, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
USERS = ("courierd", "dispatch", "c1", "c2", "alice")


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto with the shipped ACL, password auth and one user per party."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed (apt-get install mosquitto)")
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in USERS:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-pw"], check=True)
    broker = Broker(
        tmp_path / "broker",
        anonymous=False,
        persistence=False,
        listener_options=(
            f"password_file {passwd}\nacl_file {ROOT / 'config' / 'mosquitto.acl'}\n"
        ),
    ).start()
    yield broker
    broker.stop()


class Party:
    """One MQTT 5 client logged in as `user`, recording what it receives."""

    def __init__(self, port: int, user: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user}-acl-test", protocol=paho.MQTTv5
        )
        self.client.username_pw_set(user, f"{user}-pw")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, bytes(msg.payload)))

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def received(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def delivered(reader: Party, writer: Party, topic: str, sentinel_topic: str) -> bool:
    """Whether `writer` may publish to `topic` as seen by `reader`: a denied message is
    dropped silently, so an allowed sentinel is sent after it on the same connection;
    once the sentinel is in, the message would be in too."""
    writer.publish(topic, b"probe:" + topic.encode())
    writer.publish(sentinel_topic, b"sentinel:" + topic.encode())
    wait_until(
        lambda: (sentinel_topic, b"sentinel:" + topic.encode()) in reader.received(), 10, "sentinel"
    )
    return (topic, b"probe:" + topic.encode()) in reader.received()


def test_each_party_writes_exactly_its_topics(acl_broker: Broker) -> None:
    """Couriers write only their own status/location/profile/lwt; an OwnTracks user only
    its own subtree; dispatch its assignments; courierd its alerts and order events."""
    courierd = Party(acl_broker.port, "courierd")
    dispatch = Party(acl_broker.port, "dispatch")
    c1, alice = Party(acl_broker.port, "c1"), Party(acl_broker.port, "alice")
    try:
        courierd.subscribe("couriers/#", "owntracks/#", "dispatch/assignments")
        dispatch.subscribe("dispatch/alerts", "dispatch/events")
        own = "couriers/c1/status"
        for kind in ("status", "location", "profile", "lwt"):
            assert delivered(courierd, c1, f"couriers/c1/{kind}", own)
        for topic in ("couriers/c2/status", "couriers/c1/orders", "dispatch/assignments"):
            assert not delivered(courierd, c1, topic, own), topic
        mine = "owntracks/alice/phone"
        assert delivered(courierd, alice, "owntracks/alice/phone/event", mine)
        assert not delivered(courierd, alice, "owntracks/bob/phone", mine)
        assert delivered(courierd, dispatch, "dispatch/assignments", "dispatch/assignments")
        for topic in ("dispatch/alerts", "dispatch/events"):
            assert delivered(dispatch, courierd, topic, "dispatch/alerts")
    finally:
        for party in (courierd, dispatch, c1, alice):
            party.close()


def test_a_courier_reads_only_what_is_addressed_to_it(acl_broker: Broker) -> None:
    """couriers/{id}/orders reaches that courier only; other couriers' data never does."""
    courierd = Party(acl_broker.port, "courierd")
    c1, c2 = Party(acl_broker.port, "c1"), Party(acl_broker.port, "c2")
    try:
        c1.subscribe("couriers/#", "dispatch/#", "owntracks/#")
        courierd.publish("couriers/c2/orders", b"for c2")
        c2.publish("couriers/c2/status", b"c2's status")
        courierd.publish("dispatch/events", b"for dispatch")
        courierd.publish("couriers/c1/orders", b"for c1")
        wait_until(lambda: ("couriers/c1/orders", b"for c1") in c1.received(), 10, "c1's own")
        assert c1.received() == [("couriers/c1/orders", b"for c1")]
    finally:
        for party in (courierd, c1, c2):
            party.close()


def test_courierd_reads_the_brokers_counts_and_a_courier_does_not(acl_broker: Broker) -> None:
    """The two $SYS counts courierd exports (what the broker holds, what it dropped) are
    readable by courierd alone."""
    courierd, c1 = Party(acl_broker.port, "courierd"), Party(acl_broker.port, "c1")
    counts = ("$SYS/broker/store/messages/count", "$SYS/broker/publish/messages/dropped")
    try:
        c1.subscribe(*counts)
        courierd.subscribe(*counts)
        wait_until(
            lambda: {t for t, _ in courierd.received()} == set(counts),
            30,  # Mosquitto publishes $SYS every sys_interval (10 s)
            "courierd to get both counts",
        )
        # A sentinel after them: what c1 could read, it would have read by now.
        c1.subscribe("couriers/c1/orders")
        courierd.publish("couriers/c1/orders", b"sentinel")
        wait_until(lambda: c1.received(), 10, "the sentinel")
        assert c1.received() == [("couriers/c1/orders", b"sentinel")]
    finally:
        courierd.close()
        c1.close()


def test_shipped_mosquitto_conf_starts(tmp_path: Path) -> None:
    """config/mosquitto.conf (with this test's paths and certificates) is a configuration
    Mosquitto accepts and serves with: every directive in it is valid."""
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("openssl or mosquitto_passwd not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes"),
            *("-keyout", "server.key", "-out", "server.crt", "-subj", "/CN=127.0.0.1"),
            *("-days", "1"),
        ],
        cwd=certs,
        check=True,
        capture_output=True,
    )
    shutil.copy(certs / "server.crt", certs / "ca.crt")
    (tmp_path / "passwd").touch()
    shutil.copy(ROOT / "config" / "mosquitto.acl", tmp_path / "courierd.acl")
    broker = Broker(tmp_path / "broker")
    tls_port = free_port()
    text = (ROOT / "config" / "mosquitto.conf").read_text()
    text = text.replace("/etc/mosquitto/certs/", f"{certs}/")
    text = text.replace("/etc/mosquitto/passwd", str(tmp_path / "passwd"))
    text = text.replace("/etc/mosquitto/courierd.acl", str(tmp_path / "courierd.acl"))
    text = text.replace("/var/lib/mosquitto/", f"{broker.dir}/")
    text = re.sub(
        r"^listener 1883 127.0.0.1$", f"listener {broker.port} 127.0.0.1", text, flags=re.M
    )
    text = re.sub(r"^listener 8883$", f"listener {tls_port} 127.0.0.1", text, flags=re.M)
    broker.conf.write_text(text + f"user {getpass.getuser()}\n")  # as the test broker does
    broker.start()
    broker.stop()
    log = (broker.dir / "mosquitto.log").read_text()
    assert "Error" not in log, log
