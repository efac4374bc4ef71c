"""The MQTT edge's callback: convert and enqueue; shed QoS 0 only when far behind."""

from __future__ import annotations

import queue
import threading
from typing import Any

import paho.mqtt.client as paho
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from courierd.config import MqttSettings
from courierd.edges.mqtt import LeanProperties, Message, MqttEdge, Room, use_lean_properties
from tests.harness import wait_until


def message(mid: int, qos: int) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid, b"couriers/c1/location")
    msg.payload, msg.qos = b'{"ts": "2024-01-15T18:05:00Z", "lat": 1, "lng": 2}', qos
    return msg


def test_qos0_is_shed_when_far_behind_qos1_never() -> None:
    """Past the backlog limit, QoS 0 pings are dropped and counted; QoS 1 always queues."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    edge = MqttEdge(MqttSettings(), inbox, receive_max=10)
    edge.max_backlog = 3
    for mid in range(5):
        edge._on_message(None, None, message(mid, 0))  # type: ignore[arg-type]
    for mid in range(5, 8):
        edge._on_message(None, None, message(mid, 1))  # type: ignore[arg-type]
    assert edge.dropped_qos0 == 1
    kept = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [m.mid for m in kept] == [0, 1, 2, 3, 5, 6, 7]
    assert kept[0].topic == "couriers/c1/location" and kept[0].payload.startswith(b'{"ts"')


TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
PUBLISH_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "PayloadFormatIndicator": st.integers(0, 1),
        "MessageExpiryInterval": st.integers(0, 2**32 - 1),
        "ContentType": TEXT,
        "ResponseTopic": TEXT,
        "CorrelationData": st.binary(max_size=30),
        "UserProperty": st.lists(st.tuples(TEXT, TEXT), max_size=4),
        "TopicAlias": st.integers(1, 65535),
        "SubscriptionIdentifier": st.lists(st.integers(1, 268435455), min_size=1, max_size=3),
    },
)


@given(PUBLISH_PROPERTIES, st.binary(max_size=40))
def test_lean_properties_read_what_paho_reads(values: dict[str, Any], junk: bytes) -> None:
    """The MQTT process has paho decode into `LeanProperties` (cheap to make): whatever
    an MQTT 5 PUBLISH carries, it reads exactly what paho's own `Properties` reads, and
    refuses what it refuses."""
    sent = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(sent, name, value)
    for raw in (sent.pack() + b"payload", junk):  # type: ignore[no-untyped-call]
        results: list[tuple[object, ...]] = []
        for cls in (Properties, LeanProperties):
            props = cls(PacketTypes.PUBLISH)
            try:
                _, size = props.unpack(raw)  # type: ignore[no-untyped-call]
                results.append((str(props), props.json(), size))  # type: ignore[no-untyped-call]
            except Exception as e:
                results.append((type(e).__name__,))
        assert results[0] == results[1]


def test_an_mqtt5_edge_has_paho_decode_into_lean_properties() -> None:
    """Making an MQTT 5 edge installs them for the process (3.1.1 decodes no properties)."""
    MqttEdge(MqttSettings(), queue.SimpleQueue(), receive_max=10)
    assert vars(_packet)["Properties"] is LeanProperties
    assert use_lean_properties()


def test_a_batch_is_acknowledged_in_one_write_of_what_paho_would_send() -> None:
    """`ack_many` queues one packet: the PUBACKs paho's `ack` would queue one by one,
    back to back; QoS 0 and messages of an earlier connection get none. Fails on the
    edge that acknowledged message by message (no `ack_many`)."""
    one_by_one = MqttEdge(MqttSettings(), queue.SimpleQueue(), receive_max=10)
    batched = MqttEdge(MqttSettings(), queue.SimpleQueue(), receive_max=10)
    for edge in (one_by_one, batched):
        edge._generation = 7
    mids = [1, 2, 255, 256, 65535]
    wanted = [Message("t", b"", mid, 1, 7, 0) for mid in mids]
    others = [Message("t", b"", 9, 0, 7, 0), Message("t", b"", 10, 1, 6, 0)]
    for m in wanted + others:
        one_by_one.ack(m)
    batched.ack_many(others[:1] + wanted + others[1:])
    singles = [bytes(p["packet"]) for p in one_by_one._client._out_packet]
    [packet] = batched._client._out_packet
    assert len(singles) == len(mids)
    assert bytes(packet["packet"]) == b"".join(singles)
    assert packet["command"] == paho.PUBACK and packet["to_process"] == 4 * len(mids)
    batched.ack_many([])
    batched.ack_many(others)
    assert len(batched._client._out_packet) == 1  # nothing to acknowledge: nothing queued


def test_a_full_inbox_holds_paho_until_the_batcher_takes_a_batch() -> None:
    """At the window, paho's thread waits (not reading the socket) until a batch is
    taken and room is made; stopping the edge ends the wait too."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    edge = MqttEdge(MqttSettings(), inbox, receive_max=2)
    for mid in (1, 2):
        edge._on_message(None, None, message(mid, 1))  # type: ignore[arg-type]
    third = threading.Thread(target=edge._on_message, args=(None, None, message(3, 1)))
    third.start()
    wait_until(lambda: edge.room.waiting == 1, 5, "paho's thread waiting for room")
    assert third.is_alive() and inbox.qsize() == 2
    inbox.get_nowait()
    edge.room.made()  # what the batcher does after taking messages
    third.join(5)
    assert not third.is_alive() and inbox.qsize() == 2
    fourth = threading.Thread(target=edge._on_message, args=(None, None, message(4, 1)))
    fourth.start()
    wait_until(lambda: edge.room.waiting == 1, 5, "paho's thread waiting for room")
    edge._stopping = True
    edge.room.made()  # as stop() does
    fourth.join(5)
    assert not fourth.is_alive()


def test_every_paho_thread_waiting_for_room_goes_on_once_it_is_made() -> None:
    """A cluster instance's slots share one inbox and one Room: when the batcher takes a
    batch, every paho thread waiting for room (one per slot) goes on, however their
    checks and waits interleave with the taking (no wake-up is lost to another waiter)."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    room = Room()
    settings = MqttSettings(keepalive_s=60)  # a lost wake-up would wait out 15 s
    edges = [MqttEdge(settings, inbox, receive_max=2, room=room) for _ in range(2)]
    for mid in (1, 2):
        edges[0]._on_message(None, None, message(mid, 1))  # type: ignore[arg-type]
    for round_ in range(50):
        waiting = [
            threading.Thread(target=e._on_message, args=(None, None, message(10 + i, 1)))
            for i, e in enumerate(edges)
        ]
        for t in waiting:
            t.start()
        wait_until(lambda: room.waiting == 2, 5, "both paho threads waiting for room")
        inbox.get_nowait()
        inbox.get_nowait()
        room.made()
        for t in waiting:
            t.join(5)
            assert not t.is_alive(), f"a paho thread still waits for room (round {round_})"
        assert inbox.qsize() == 2


def test_a_message_keeps_the_connection_it_came_on_across_a_wait_for_room() -> None:
    """A message that waited for room is acknowledged on the connection that delivered
    it or not at all, even if that connection was lost during the wait (paho's thread
    keeps the connection alive while it waits, and may find it gone)."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    edge = MqttEdge(MqttSettings(), inbox, receive_max=1)
    edge._generation = 5
    edge._on_message(None, None, message(1, 1))  # type: ignore[arg-type]
    waiting = threading.Thread(target=edge._on_message, args=(None, None, message(2, 1)))
    waiting.start()
    wait_until(lambda: edge.room.waiting == 1, 5, "paho's thread waiting for room")
    edge._on_disconnect(None, None, None, "keepalive timeout", None)  # type: ignore[arg-type]
    inbox.get_nowait()
    edge.room.made()
    waiting.join(5)
    assert inbox.get_nowait().generation == 5 != edge._generation
