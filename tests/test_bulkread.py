"""paho reading in bulk (edges/bulkread.py): the same messages, in the same order, and the
same answers to the broker as paho's own reader, however the stream is cut up."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from courierd.config import MqttSettings
from courierd.edges.bulkread import BulkReadClient
from courierd.edges.mqtt import KEEP_OVERSIZED, Message, MqttEdge
from tests.harness import Broker, Publisher, wait_until
from tests.test_mqtt_edge import PUBLISH_PROPERTIES


class FakeSocket:
    """What the broker sent so far and we have not read; what we sent."""

    def __init__(self) -> None:
        self.unread = b""
        self.sent = b""
        self.reads = 0
        self.closed = False

    def recv(self, size: int) -> bytes:
        if not self.unread:
            raise BlockingIOError
        self.reads += 1
        data, self.unread = self.unread[:size], self.unread[size:]
        return data

    def send(self, data: bytes) -> int:
        self.sent += bytes(data)
        return len(data)

    def close(self) -> None:
        self.closed = True


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (128 if n else 0))
        if not n:
            return bytes(out)


def packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + remaining_length(len(body)) + body


def publish(
    v5: bool,
    topic: bytes,
    payload: bytes,
    qos: int,
    mid: int,
    flags: int = 0,
    props: dict[str, Any] | None = None,
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for name, value in (props or {}).items():
            setattr(properties, name, value)
        body += properties.pack()  # type: ignore[no-untyped-call]
    return packet(0x30 | qos << 1 | flags, body + payload)


PAYLOADS = st.one_of(
    st.binary(max_size=200),
    st.integers(16_380, 20_000).map(lambda n: b"x" * n),  # a 3-byte remaining length
)
TOPICS = st.one_of(
    st.sampled_from([b"couriers/c1/location", b"couriers/c2/status", b"dispatch/assignments"]),
    st.binary(max_size=20),  # empty (malformed in 3.1.1) and invalid UTF-8 too
)


@st.composite
def streams(draw: st.DrawFn, v5: bool) -> list[bytes]:
    """A broker's packets: PUBLISH of every QoS, flags and size, MQTT 5 properties or
    none, PINGRESP, PUBREL of a QoS 2 message, sometimes a malformed packet or (MQTT 5)
    a DISCONNECT, after which nothing more is read."""
    packets = []
    qos2: list[int] = []
    for mid in range(1, draw(st.integers(1, 12)) + 1):
        kind = draw(st.sampled_from(["publish"] * 8 + ["ping", "pubrel", "bad", "end"]))
        if kind == "ping":
            packets.append(packet(0xD0, b""))
        elif kind == "pubrel" and qos2:
            packets.append(packet(0x62, qos2.pop(0).to_bytes(2, "big")))
        elif kind == "bad":
            packets.append(
                draw(
                    st.sampled_from(
                        [
                            packet(0x32, b"\x00\x09ab"),  # a topic longer than the packet
                            b"\x30\xff\xff\xff\xff\x01",  # a 5-byte remaining length
                        ]
                    )
                )
            )
        elif kind == "end" and v5:
            packets.append(packet(0xE0, b"\x8b"))  # DISCONNECT: the broker shutting down
        else:
            qos = draw(st.sampled_from([0, 1, 1, 1, 2]))
            if qos == 2:
                qos2.append(mid)
            props = draw(st.one_of(st.none(), PUBLISH_PROPERTIES)) if v5 else None
            flags = draw(st.sampled_from([0, 1, 8, 9]))  # RETAIN, DUP
            packets.append(publish(v5, draw(TOPICS), draw(PAYLOADS), qos, mid, flags, props))
    return packets


def run(client: paho.Client, chunks: list[bytes]) -> tuple[list[Any], bytes, bool]:
    """Feed `chunks` as they would arrive, each read until the socket is empty: what
    reached the application, what the client sent back, whether it dropped the line."""
    sock = FakeSocket()
    client._sock = sock
    for chunk in chunks:
        sock.unread += chunk
        while sock.unread and client._sock is sock:
            client.loop_read()
    return received(client), sock.sent, client._sock is not sock


def received(client: paho.Client) -> list[Any]:
    return client._userdata  # type: ignore[no-any-return]


def clients(v5: bool) -> tuple[paho.Client, BulkReadClient]:
    options: dict[str, Any] = {"protocol": paho.MQTTv5 if v5 else paho.MQTTv311, "manual_ack": True}
    plain = paho.Client(CallbackAPIVersion.VERSION2, userdata=[], **options)
    bulk = BulkReadClient(
        CallbackAPIVersion.VERSION2, deliver=lambda *_: None, userdata=[], **options
    )
    bulk._deliver = lambda topic, payload, mid, qos, _at: bulk._userdata.append(
        (topic, payload, mid, qos)
    )
    for client in (plain, bulk):
        client.on_message = lambda c, userdata, m: userdata.append(
            (m._topic, bytes(m.payload), m.mid, m.qos)
        )
    return plain, bulk


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.data())
def test_bulk_reading_hands_over_what_paho_reads(v5: bool, data: st.DataObject) -> None:
    """Whatever the broker sends, cut wherever TCP cuts it, the bulk reader hands over the
    same messages in the same order, sends the same answers (PUBREC, PUBCOMP) and drops
    the connection on the same malformed packet as paho's own reader."""
    stream = b"".join(data.draw(streams(v5)))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    plain, bulk = clients(v5)
    assert run(bulk, chunks) == run(plain, chunks)


def test_a_backlog_in_the_socket_is_read_at_once() -> None:
    """A backlog waiting in the socket is one read, its messages in the inbox in order
    (paho's own reader: four reads a message, and one wake-up of its thread each)."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    edge = MqttEdge(MqttSettings(), inbox, receive_max=1000)
    sock = FakeSocket()
    edge._client._sock = sock
    sock.unread = b"".join(
        publish(True, b"couriers/c%d/location" % i, b'{"i": %d}' % i, 1, i + 1) for i in range(500)
    )
    while sock.unread:
        edge._client.loop_read()
    assert sock.reads == 1
    got = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert all(len(m) == len(Message._fields) and type(m.payload) is bytes for m in got)
    assert [(m.topic, m.payload, m.mid, m.qos) for m in got] == [
        (f"couriers/c{i}/location", b'{"i": %d}' % i, i + 1, 1) for i in range(500)
    ]


def test_an_unfinished_packet_of_a_lost_connection_is_dropped() -> None:
    """The start of a packet read before the connection was lost is not taken for the
    start of what the next connection sends."""
    _, bulk = clients(False)
    first, second = FakeSocket(), FakeSocket()
    whole = publish(False, b"couriers/c1/status", b"{}", 1, 7)
    first.unread = whole[:5]
    bulk._sock = first
    bulk.loop_read()
    bulk._sock = second  # what paho's reconnect does
    second.unread = publish(False, b"couriers/c2/status", b"[]", 1, 8)
    bulk.loop_read()
    assert received(bulk) == [(b"couriers/c2/status", b"[]", 8, 1)]


def test_a_stalled_ingest_keeps_the_connection_alive_in_the_middle_of_a_read() -> None:
    """The inbox full and nobody taking from it (the database down): paho's thread lets
    one message in per quarter of the keepalive and, in the middle of a bulk read, still
    sends a PINGREQ whenever one is due and keeps the connection, as paho's own reader
    did between two packets (there, a PINGRESP behind the backlog is read only later)."""
    broker_end, ours = socket.socketpair()
    ours.setblocking(False)
    broker_end.settimeout(5)
    edge = MqttEdge(MqttSettings().model_copy(update={"keepalive_s": 1}), queue.SimpleQueue(), 2)
    client = edge._client
    client._sock, client._keepalive = ours, 1
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    client._last_msg_out = client._last_bytes_received = time.monotonic()
    backlog = [publish(True, b"couriers/c1/location", b"{}", 1, mid) for mid in range(1, 41)]
    broker_end.sendall(b"".join(backlog))

    def network_thread() -> None:
        while not edge._stopping:
            client._loop(0.05)

    thread = threading.Thread(target=network_thread)
    thread.start()
    try:
        sent = b""
        while len(sent) < 4:  # two PINGREQs, a keepalive apart, the connection kept
            more = broker_end.recv(4 - len(sent))
            assert more, f"the connection was closed after {sent!r}"
            sent += more
        assert sent == b"\xc0\x00\xc0\x00"
        assert edge.inbox.qsize() < 40 and client._sock is ours
    finally:
        edge._stopping = True
        edge.room.made()
        thread.join(5)
        broker_end.close()
        ours.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_queued_backlog_arrives_whole_and_in_order(broker: Broker, protocol: str) -> None:
    """Over a real Mosquitto, both protocols: a backlog queued for the edge's session
    (small and oversized payloads, MQTT 5 user properties on some) reaches the inbox
    complete and in order, acknowledged batch by batch as the batcher does. Over MQTT 5
    the broker has at most 100 unacknowledged messages out to us (Receive Maximum), so
    all of it arriving also says every PUBACK named the right message."""
    settings_ = MqttSettings(url=broker.url, client_id="bulk", protocol=protocol)
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    edge = MqttEdge(settings_, inbox, receive_max=100)
    edge.start()
    wait_until(edge.subscribed.is_set, 15, "the edge subscribed")
    edge.stop()
    v5 = protocol == "5"
    pub = Publisher(broker.port, "bulk-pub", paho.MQTTv5 if v5 else paho.MQTTv311)
    sent = []
    try:
        for i in range(1500):
            payload = b"y" * 70_000 if i % 500 == 7 else b'{"n": %d}' % i
            props = None
            if v5 and i % 3 == 0:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.UserProperty = ("i", str(i))
            pub.client.publish(f"couriers/c{i % 37}/location", payload, qos=1, properties=props)
            sent.append((f"couriers/c{i % 37}/location", payload))
        pub.publish("couriers/last/location", b"{}")  # waits for its PUBACK: all are queued
        sent.append(("couriers/last/location", b"{}"))
    finally:
        pub.close()
    edge = MqttEdge(settings_, inbox, receive_max=100)
    edge.start()
    got: list[Message] = []
    try:
        while len(got) < len(sent):
            batch = [inbox.get(timeout=30)]
            while len(batch) < 50 and not inbox.empty():
                batch.append(inbox.get_nowait())
            edge.room.made()
            edge.ack_many(batch)
            got += batch
    finally:
        edge.stop()
    assert [(m.topic, m.payload, m.size) for m in got] == [
        (t, p[:KEEP_OVERSIZED] if len(p) > 65_536 else p, len(p)) for t, p in sent
    ]
