"""paho reading in bulk (edges/bulkread.py): the same messages, in the same order, and the
same answers to the broker as paho's own reader, however the stream is cut up."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, _ConnectionState
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from courierd.config import MqttSettings
from courierd.edges.bulkread import BulkReadClient
from courierd.edges.mqtt import KEEP_OVERSIZED, Message, MqttEdge, Room
from tests.harness import Broker, Publisher, wait_until
from tests.test_mqtt_edge import PUBLISH_PROPERTIES


class FakeSocket:
    """What the broker sent so far and we have not read; what we sent."""

    def __init__(self) -> None:
        self.unread = b""
        self.sent = b""
        self.reads = 0
        self.closed = False

    def recv(self, buffer_size: int) -> bytes:
        if not self.unread:
            raise BlockingIOError
        self.reads += 1
        data, self.unread = self.unread[:buffer_size], self.unread[buffer_size:]
        return data

    def send(self, buffer: bytes | bytearray) -> int:
        self.sent += bytes(buffer)
        return len(buffer)

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:  # paho's SocketLike; nothing here selects on it
        raise OSError("a fake socket has no descriptor")

    def setblocking(self, flag: bool) -> None:
        pass


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


BAD = [
    packet(0x32, b"\x00\x09ab"),  # a topic longer than the packet
    b"\x30\xff\xff\xff\xff\x01",  # a 5-byte remaining length
]
# MQTT 5: a PUBLISH whose properties' length is malformed or overruns the packet.
TOPIC_AND_MID = b"\x00\x14couriers/c1/location\x00\x07"
BAD_V5 = [
    *BAD,
    packet(0x32, TOPIC_AND_MID),  # no properties' length at all
    packet(0x32, TOPIC_AND_MID + b"\x80"),  # a length cut short
    packet(0x32, TOPIC_AND_MID + b"\xff\xff\xff\xff\x01{}"),  # a 5-byte length
    packet(0x32, TOPIC_AND_MID + b"\x80\x80\x80\x80\x00{}"),  # 5 bytes saying 0
    packet(0x32, TOPIC_AND_MID + b"\x09\x02\x00"),  # 9 bytes of properties, 2 there
    packet(0x30, TOPIC_AND_MID[:-2] + b"\x81\x01\x26\x00\x01a\x00\x01b"),  # 129, 7
]


def paho_reads(values: dict[str, Any]) -> bool:
    """paho reads these properties back (it refuses a string holding U+0000 or U+FEFF,
    which the bulk reader, skipping properties unread, does not look for: see
    test_properties_are_skipped_unread)."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    try:
        Properties(PacketTypes.PUBLISH).unpack(props.pack())  # type: ignore[no-untyped-call]
    except MalformedPacket:
        return False
    return True


READABLE_PROPERTIES = PUBLISH_PROPERTIES.filter(paho_reads)
# Properties whose length takes 2 or 3 bytes.
LONG_PROPERTIES = st.integers(120, 20_000).map(lambda n: {"UserProperty": [("k", "v" * n)]})


@st.composite
def streams(draw: st.DrawFn, v5: bool) -> list[bytes]:
    """A broker's packets: PUBLISH of every QoS, flags and size, MQTT 5 properties or
    none, PINGRESP, PUBREL of a QoS 2 message, sometimes a malformed packet (MQTT 5: a
    malformed properties' length too) or (MQTT 5) a DISCONNECT, after which nothing
    more is read."""
    packets = []
    qos2: list[int] = []
    for mid in range(1, draw(st.integers(1, 12)) + 1):
        kind = draw(st.sampled_from(["publish"] * 8 + ["ping", "pubrel", "bad", "end"]))
        if kind == "ping":
            packets.append(packet(0xD0, b""))
        elif kind == "pubrel" and qos2:
            packets.append(packet(0x62, qos2.pop(0).to_bytes(2, "big")))
        elif kind == "bad":
            packets.append(draw(st.sampled_from(BAD_V5 if v5 else BAD)))
        elif kind == "end" and v5:
            packets.append(packet(0xE0, b"\x8b"))  # DISCONNECT: the broker shutting down
        else:
            qos = draw(st.sampled_from([0, 1, 1, 1, 2]))
            if qos == 2:
                qos2.append(mid)
            props = draw(st.one_of(st.none(), READABLE_PROPERTIES, LONG_PROPERTIES)) if v5 else None
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


def test_properties_are_skipped_unread() -> None:
    """courierd reads no MQTT 5 properties: the bulk reader skips them by their length,
    so a block paho would refuse for what it holds (a NUL in a user property), within
    its length, does not drop the connection (paho's reader drops it, and the broker
    would send that message again on the next). One whose length overruns the packet
    is paho's, which drops the connection."""
    plain, bulk = clients(True)
    message = publish(
        True, b"couriers/c1/status", b"{}", 1, 7, props={"UserProperty": ("a\0", "b")}
    )
    assert run(plain, [message]) == ([], b"", True)
    assert run(bulk, [message]) == ([(b"couriers/c1/status", b"{}", 7, 1)], b"", False)
    # Ten bytes of properties said, four there (the payload would be taken for them).
    overrun = packet(0x32, b"\x00\x12couriers/c1/status\x00\x07\x0a\x26\x00\x01a")
    for client in clients(True):
        assert run(client, [overrun]) == ([], b"", True)


@pytest.mark.parametrize("size", [0, 6, 127, 128, 16_383, 16_384, 2_097_152])
def test_properties_of_every_length_size_are_skipped_as_paho_reads_them(size: int) -> None:
    """A properties block of 1, 2, 3 and 4 length bytes, at each edge: the bulk reader
    hands over what paho's reader hands over (a user property of `size` bytes)."""
    block = b""
    while len(block) < size:  # user properties of up to 65,535 bytes of value each
        room = min(size - len(block) - 6, 65_535)
        block += b"\x26\x00\x01k" + room.to_bytes(2, "big") + b"v" * room
    assert len(block) == size
    message = packet(0x32, TOPIC_AND_MID + remaining_length(len(block)) + block + b"{}")
    plain, bulk = clients(True)
    expected = ([(b"couriers/c1/location", b"{}", 7, 1)], b"", False)
    assert run(plain, [message]) == expected
    assert run(bulk, [message]) == expected


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


def connected_edge(ours: socket.socket, keepalive: int, receive_max: int, **kw: Any) -> MqttEdge:
    """An edge whose client is connected on `ours` (the broker at the socket pair's other
    end), supervised: once the connection is lost, paho's thread ends (no reconnect)."""
    settings_ = MqttSettings().model_copy(update={"keepalive_s": keepalive})
    edge = MqttEdge(settings_, queue.SimpleQueue(), receive_max, supervised=True, **kw)
    client = edge._client
    client._sock, client._keepalive = ours, keepalive
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    client._last_msg_out = client._last_bytes_received = time.monotonic()
    edge.connected.set()
    return edge


def start_network_thread(edge: MqttEdge) -> threading.Thread:
    """paho's own network thread (a daemon: a test that finds it stuck fails, not hangs)."""
    edge._client.loop_start()
    thread = edge._client._thread
    assert thread is not None and thread.daemon
    return thread


def end_network_thread(edge: MqttEdge, thread: threading.Thread) -> None:
    """What `stop()` does, with a deadline on the join (loop_stop's has none)."""
    edge._stopping = True
    edge._client._thread_terminate = True
    edge.room.made()
    if edge._client._sockpairW is not None:  # out of its select() at once
        edge._client._sockpairW.send(b"\0")
    thread.join(10)
    assert not thread.is_alive(), "paho's thread did not end"
    edge._client._reset_sockets()


def test_a_stalled_ingest_keeps_the_connection_alive_in_the_middle_of_a_read() -> None:
    """The inbox full and nobody taking from it (the database down): paho's thread lets
    one message in per quarter of the keepalive and, in the middle of a bulk read, still
    sends a PINGREQ whenever one is due and keeps the connection, as paho's own reader
    did between two packets (there, a PINGRESP behind the backlog is read only later)."""
    broker_end, ours = socket.socketpair()
    ours.setblocking(False)
    broker_end.settimeout(5)
    edge = connected_edge(ours, keepalive=1, receive_max=2)
    client = edge._client
    backlog = [publish(True, b"couriers/c1/location", b"{}", 1, mid) for mid in range(1, 41)]
    broker_end.sendall(b"".join(backlog))
    thread = start_network_thread(edge)
    try:
        sent = b""
        while len(sent) < 4:  # two PINGREQs, a keepalive apart, the connection kept
            more = broker_end.recv(4 - len(sent))
            assert more, f"the connection was closed after {sent!r}"
            sent += more
        assert sent == b"\xc0\x00\xc0\x00"
        assert edge.inbox.qsize() < 40 and client._sock is ours
    finally:
        end_network_thread(edge, thread)
        broker_end.close()
        ours.close()


@pytest.mark.parametrize(
    "message",
    [
        # Read by the bulk reader (its properties skipped).
        publish(
            True, b"couriers/c1/location", b"{}", 1, 1, props={"ContentType": "application/json"}
        ),
        # Decoded by paho (an empty topic: a topic alias), handed over by its on_message.
        publish(True, b"", b"{}", 1, 1, props={"TopicAlias": 3}),
    ],
    ids=["properties", "paho-decoded"],
)
def test_a_connection_lost_while_ingest_is_stalled_ends_pahos_thread(message: bytes) -> None:
    """MQTT 5 messages with properties, the inbox full and nobody taking from it, and the
    broker gone meanwhile: paho's thread finds the connection lost, tells the edge (so
    health says so, and a supervised slot is given up) and ends, as paho's own would.
    Fails on the reader that handed messages with properties to paho: from under paho's
    callback lock, a wait for room that found the connection lost had paho take that
    lock again (on_disconnect), and its thread blocked for good (stop() too)."""
    broker_end, ours = socket.socketpair()
    ours.setblocking(False)
    edge = connected_edge(ours, keepalive=1, receive_max=2)
    broker_end.sendall(message * 10)
    broker_end.close()
    thread = start_network_thread(edge)
    try:
        thread.join(10)
        assert not thread.is_alive(), "paho's thread is stuck"
        assert edge.ended.is_set() and not edge.connected.is_set()
        assert 2 <= edge.inbox.qsize() <= 10
    finally:
        if not thread.is_alive():
            end_network_thread(edge, thread)
        ours.close()


def test_a_wait_for_room_ends_at_once_when_the_connection_is_found_lost() -> None:
    """The inbox full, nobody taking from it, a 30 s wait for room (keepalive 120 s), and
    the broker gone: PUBACKs queued meanwhile wake paho's thread, whose write finds the
    connection lost, and the wait ends there, so that the edge says so (a supervised
    slot is given up; alone, paho reconnects) at once, not after the rest of the wait.
    Fails on the wait that went on until room was made or its deadline."""
    with backlog_behind_a_full_inbox() as (broker_end, edge, room, thread):
        assert room.entered.acquire(timeout=10), "paho's thread did not wait for room"
        # The batcher's PUBACKs of what it holds, the inbox still at the window.
        held = [edge.inbox.get_nowait() for _ in range(edge.inbox.qsize())]
        for m in held:
            edge.inbox.put(m)
        broker_end.close()
        edge.ack_many(held)
        thread.join(10)  # (the wait's own deadline is 30 s away)
        assert not thread.is_alive(), "paho's thread still waits for room"
        assert edge.ended.is_set() and not edge.connected.is_set()


class WatchedRoom(Room):
    """A Room that says when paho's thread waits for room: once it has found none, and
    holding the lock that making room takes, so that room made after this wakes it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> bool:
        told = False

        def watched() -> bool:
            nonlocal told
            now = ready()
            if not told:
                told = True
                self.entered.release()
            return now

        return super().wait_for(watched, timeout)


def expect_pubacks(broker_end: socket.socket, batch: list[Message]) -> None:
    """The broker's end reads the PUBACKs of `batch`, in order, before its timeout."""
    expected = b"".join(b"\x40\x02" + m.mid.to_bytes(2, "big") for m in batch)
    got = b""
    while len(got) < len(expected):
        try:
            more = broker_end.recv(len(expected) - len(got))
        except TimeoutError:
            pytest.fail(f"the PUBACKs of {[m.mid for m in batch]} were not written")
        assert more, "the connection was closed"
        got += more
    assert got == expected


@contextmanager
def backlog_behind_a_full_inbox() -> Iterator[
    tuple[socket.socket, MqttEdge, WatchedRoom, threading.Thread]
]:
    """Ten QoS 1 PUBLISHes waiting for an edge on paho's own thread, with a window of 2
    (its inbox is full at two) and a 120 s keepalive (a wait for room times out at 30 s):
    the broker's end of the connection, the edge, its room, paho's thread."""
    broker_end, ours = socket.socketpair()
    ours.setblocking(False)
    broker_end.settimeout(10)
    room = WatchedRoom()
    edge = connected_edge(ours, keepalive=120, receive_max=2, room=room)
    broker_end.sendall(
        b"".join(publish(True, b"couriers/c1/location", b"{}", 1, m) for m in range(1, 11))
    )
    thread = start_network_thread(edge)
    try:
        yield broker_end, edge, room, thread
    finally:
        end_network_thread(edge, thread)
        broker_end.close()
        ours.close()


def test_acks_queued_while_paho_waited_for_room_are_written_at_once() -> None:
    """A backlog in paho's buffer, the inbox at the window, the batcher taking batches:
    the PUBACKs it queues while paho's thread waits for room reach the broker when the
    wait ends, not after the rest of the buffer (paho's own reader wrote them after
    every packet; the broker sends no more than its window of unacknowledged messages).
    Fails on the edge that wrote them only after a wait that timed out: the batcher
    here waits for each batch's PUBACKs, a wait for room times out only after 30 s."""
    with backlog_behind_a_full_inbox() as (broker_end, edge, room, _):
        for _ in range(4):  # paho's thread waits before the 3rd, 5th, 7th and 9th message
            assert room.entered.acquire(timeout=10), "paho's thread did not wait for room"
            batch = [edge.inbox.get_nowait() for _ in range(edge.inbox.qsize())]
            edge.ack_many(batch)
            room.made()
            expect_pubacks(broker_end, batch)


def test_acks_queued_after_room_was_made_are_written_while_paho_waits() -> None:
    """The batcher's own order: it takes a batch (room made: paho's thread fills the
    inbox from its buffer and waits again at once), then queues the previous batch's
    PUBACKs. They go out while paho's thread still waits, not one commit later (or a
    quarter of the keepalive, 30 s here, if ingest stalls)."""
    with backlog_behind_a_full_inbox() as (broker_end, edge, room, _):
        assert room.entered.acquire(timeout=10), "paho's thread did not wait for room"
        batch = [edge.inbox.get_nowait() for _ in range(edge.inbox.qsize())]
        room.made()
        assert room.entered.acquire(timeout=10), "paho's thread did not wait again"
        edge.ack_many(batch)
        expect_pubacks(broker_end, batch)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.stop()


def take_and_ack(
    edge: MqttEdge, inbox: queue.SimpleQueue[Message], n: int, batch_size: int
) -> list[Message]:
    """Take `n` messages from the inbox in batches, acknowledging each as the batcher
    does after a commit (room made, then one ack_many)."""
    got: list[Message] = []
    while len(got) < n:
        batch = [inbox.get(timeout=30)]
        while len(batch) < batch_size and not inbox.empty():
            batch.append(inbox.get_nowait())
        edge.room.made()
        edge.ack_many(batch)
        got += batch
    return got


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
    # What the daemon parses each message with sees it as the inbox gets it (the start
    # of an oversized payload, its real size), and its result goes with the message.
    edge = MqttEdge(settings_, inbox, receive_max=100, interpret=lambda *seen: seen)
    edge.start()
    try:
        got = take_and_ack(edge, inbox, len(sent), 50)
    finally:
        edge.stop()
    assert [(m.topic, m.payload, m.size) for m in got] == [
        (t, p[:KEEP_OVERSIZED] if len(p) > 65_536 else p, len(p)) for t, p in sent
    ]
    assert all(m.parsed == (m.topic, m.payload, m.size) for m in got)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_without_bulk_reads_paho_s_own_reader_delivers_and_acknowledges(
    broker: Broker, protocol: str
) -> None:
    """The edge's fallback where bulk reads are not usable (a paho without the internals
    bulkread.py builds on; here `bulk_read=False`): paho's own reader and `on_message`.
    A queued backlog reaches the inbox whole and in order through a window of 20 (the
    fallback's wait for room), acknowledged batch by batch; then nothing of it is left
    unacknowledged in the session: connected again, the edge gets only what is new."""
    settings_ = MqttSettings(url=broker.url, client_id="plain", protocol=protocol)
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def plain_edge(subscribed: bool = True) -> MqttEdge:
        edge = MqttEdge(settings_, inbox, receive_max=20, bulk_read=False)
        assert not isinstance(edge._client, BulkReadClient)
        edge.start()
        if subscribed:  # (its SUBACK may come behind a backlog nobody takes yet)
            wait_until(edge.subscribed.is_set, 15, "the edge subscribed")
        return edge

    plain_edge().stop()  # the session and its subscriptions, for the backlog
    version = paho.MQTTv5 if protocol == "5" else paho.MQTTv311
    pub = Publisher(broker.port, "plain-pub", version)
    sent = []
    try:
        for i in range(300):
            pub.client.publish(f"couriers/c{i % 7}/location", b'{"n": %d}' % i, qos=1)
            sent.append((f"couriers/c{i % 7}/location", b'{"n": %d}' % i))
        pub.publish("couriers/last/location", b"{}")  # waits for its PUBACK: all are queued
        sent.append(("couriers/last/location", b"{}"))
    finally:
        pub.close()
    edge = plain_edge(subscribed=False)
    try:
        got = take_and_ack(edge, inbox, len(sent), 10)
    finally:
        edge.stop()
    assert [(m.topic, m.payload) for m in got] == sent
    edge = plain_edge()
    try:
        pub = Publisher(broker.port, "plain-pub", version)
        pub.publish("couriers/new/location", b"{}")
        pub.close()
        assert inbox.get(timeout=30).topic == "couriers/new/location"
    finally:
        edge.stop()
