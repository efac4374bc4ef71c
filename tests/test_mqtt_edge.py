"""The MQTT edge's callback: convert and enqueue; shed QoS 0 only when far behind."""

from __future__ import annotations

import queue

import paho.mqtt.client as paho

from courierd.config import MqttSettings
from courierd.edges.mqtt import Message, MqttEdge


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
