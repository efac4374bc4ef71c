"""`courierd simulate`: couriers on MQTT that publish like real phones.

Each courier takes an order, walks it through the chain with realistic gaps between
statuses (minutes, compressed by `speed`), sends a location ping every few seconds and
keeps a retained profile. Optional noise: duplicates, reordering, offline bursts that
flush late, and junk payloads. One thread drives everything from a time-ordered heap,
so a thousand couriers cost no more threads than one.
"""

from __future__ import annotations

import heapq
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import format_ts

# Typical seconds from one status to the next: confirmed → arriving → arrived → out → dropoff.
STEP_SECONDS = (20.0, 300.0, 420.0, 600.0)
PING_SECONDS = 4.0
NAMES = ("Mike Driver", "Ana Lopez", "Sam Lee", "Priya Shah", "Tom Berg", "Yuki Sato")
VEHICLES = (
    {"color": "Blue", "make": "Toyota", "model": "Camry"},
    {"color": "Red", "make": "Honda", "model": "Fit"},
    {"color": "Black", "make": "Vespa"},
)


@dataclass
class Noise:
    """Share of messages affected by each kind of noise (0..1)."""

    duplicates: float = 0.0
    reorder: float = 0.0
    offline: float = 0.0  # chance a courier goes offline for a while and flushes late
    junk: float = 0.0


@dataclass
class Courier:
    courier_id: str
    lat: float
    lng: float
    order_id: str = ""
    step: int = -1
    orders_done: int = 0
    offline_until: float = 0.0
    buffered: list[tuple[str, bytes]] = field(default_factory=list)


class Simulation:
    """Publishes through `publish(topic, payload, retain)`; `run()` until `stop` or done."""

    def __init__(
        self,
        publish: Callable[[str, bytes, bool], None],
        *,
        couriers: int = 10,
        speed: float = 60.0,
        orders: int | None = None,
        noise: Noise | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[Counter[str], int], None] | None = None,
    ) -> None:
        self.publish = publish
        self.speed = speed
        self.orders_left = orders
        self.noise = noise or Noise()
        self.rng = random.Random(seed)
        self.clock = clock
        self.sent: Counter[str] = Counter()
        self.orders_done = 0
        self.on_progress = on_progress
        self.couriers = [
            Courier(
                f"courier-{i:04d}", 40.70 + self.rng.random() / 10, -74.02 + self.rng.random() / 10
            )
            for i in range(couriers)
        ]
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0

    def _at(self, delay: float, what: str, index: int) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (self.clock() + delay / self.speed, self._seq, what, index))

    def run(self, stop: threading.Event) -> Counter[str]:
        for i, c in enumerate(self.couriers):
            profile = {
                "full_name": self.rng.choice(NAMES),
                "phone": f"+1555{i:07d}",
                "vehicle": self.rng.choice(VEHICLES),
            }
            self._send(c, f"couriers/{c.courier_id}/profile", profile, kind="profile", retain=True)
            self._at(self.rng.uniform(0, 5), "status", i)
            self._at(self.rng.uniform(0, PING_SECONDS), "ping", i)
        next_progress = self.clock() + 1
        while not stop.is_set() and self._heap:
            when, _, what, i = self._heap[0]
            now = self.clock()
            if when > now:
                stop.wait(min(when - now, 0.2))
            else:
                heapq.heappop(self._heap)
                getattr(self, f"_{what}")(self.couriers[i], i)
            if self.on_progress and self.clock() >= next_progress:
                self.on_progress(self.sent, self.orders_done)
                next_progress = self.clock() + 1
        return self.sent

    def _status(self, c: Courier, i: int) -> None:
        if c.step < 0:
            if self.orders_left is not None:
                if self.orders_left <= 0:
                    if all(x.step < 0 for x in self.couriers):
                        self._heap = [h for h in self._heap if h[2] != "ping"]
                    return
                self.orders_left -= 1
            c.order_id, c.step = str(uuid.UUID(int=self.rng.getrandbits(128))), 0
        event = {
            "event_id": str(uuid.UUID(int=self.rng.getrandbits(128))),
            "order_id": c.order_id,
            "status": CHAIN[c.step].value,
            "ts": _now(),
        }
        self._send(c, f"couriers/{c.courier_id}/status", event, kind="status")
        if c.step == len(CHAIN) - 1:
            c.step, c.orders_done = -1, c.orders_done + 1
            self.orders_done += 1
            self._at(self.rng.uniform(30, 120), "status", i)
        else:
            gap = STEP_SECONDS[c.step]
            c.step += 1
            self._at(self.rng.uniform(0.5 * gap, 1.5 * gap), "status", i)

    def _ping(self, c: Courier, i: int) -> None:
        c.lat += self.rng.uniform(-1e-4, 1e-4)
        c.lng += self.rng.uniform(-1e-4, 1e-4)
        fix = {
            "ts": _now(),
            "lat": round(c.lat, 6),
            "lng": round(c.lng, 6),
            "accuracy_m": round(self.rng.uniform(3, 15), 1),
            "speed_mps": 7.5,
            "heading": 90,
        }
        self._send(c, f"couriers/{c.courier_id}/location", fix, kind="location")
        self._at(PING_SECONDS, "ping", i)

    def _flush(self, c: Courier, _i: int) -> None:
        """Back online: what was queued on the phone goes out at once, late."""
        for topic, payload in c.buffered:
            self.publish(topic, payload, False)
        self.sent["flushed"] += len(c.buffered)
        c.buffered.clear()

    def _send(
        self, c: Courier, topic: str, doc: dict[str, Any], *, kind: str, retain: bool = False
    ) -> None:
        n, rng = self.noise, self.rng
        payload = json.dumps(doc).encode()
        now = self.clock()
        if not retain and now < c.offline_until:
            c.buffered.append((topic, payload))
            self.sent[kind] += 1
            return
        if not retain and rng.random() < n.offline:
            c.offline_until = now + rng.uniform(30, 300) / self.speed
            c.buffered.append((topic, payload))
            self._at((c.offline_until - now) * self.speed, "flush", self.couriers.index(c))
            self.sent[kind] += 1
            return
        if kind == "status" and rng.random() < n.reorder:
            c.buffered.append((topic, payload))  # goes out after the next message
            self.sent[kind] += 1
            self.sent["reordered"] += 1
            return
        self.publish(topic, payload, retain)
        self.sent[kind] += 1
        if c.buffered and now >= c.offline_until:
            self._flush(c, 0)
        if kind == "status" and rng.random() < n.duplicates:
            self.publish(topic, payload, False)
            self.sent["duplicate"] += 1
        if rng.random() < n.junk:
            self.publish(
                f"couriers/{c.courier_id}/status",
                rng.choice([b"{not json", b"[]", b'{"status": "teleported"}', b"\xff"]),
                False,
            )
            self.sent["junk"] += 1


def _now() -> str:
    return format_ts(datetime.now(UTC))


def mqtt_publisher(
    host: str, port: int, client_id: str
) -> tuple[paho.Client, Callable[[str, bytes, bool], None]]:
    """A connected paho client and a QoS 1 publish function for the simulation."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect(host, port)
    client.loop_start()

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        client.publish(topic, payload, qos=1, retain=retain)

    return client, publish


def progress_line(sent: Counter[str], orders_done: int) -> None:
    parts = " ".join(f"{k}={v}" for k, v in sorted(sent.items()))
    sys.stderr.write(f"\rsimulate: orders_done={orders_done} {parts}   ")
    sys.stderr.flush()
