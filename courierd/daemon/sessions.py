"""The MQTT sessions of the MQTT process: one, or (a cluster) this instance's slots.

Alone (SQLite), courierd reads the broker through one persistent session named
`mqtt.client_id`, subscribed to its topics. In a cluster (PostgreSQL, CONTRACT.md 10)
it holds some of K sessions `{client_id}-{k}`, all members of the same shared
subscriptions (`$share/{client_id}/...`), as the dispatch process's slot manager tells
it: `hold({slot: epoch})` connects what is new (or taken over again) and disconnects
what is no longer ours, keeping the session on the broker for the next holder.

Retained profiles are not delivered to shared subscriptions, and the order in which a
courier's profiles are applied matters; so `couriers/+/profile` is a plain
subscription of slot 0 only, and profiles reach exactly one instance, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from courierd.config import MqttSettings
from courierd.edges.mqtt import Message, MqttEdge

log = logging.getLogger(__name__)

SHARED_KINDS = ("couriers/+/status", "couriers/+/location", "couriers/+/lwt")
PROFILES = "couriers/+/profile"


class Sessions:
    """The edges this process holds, by slot."""

    def __init__(
        self,
        settings: MqttSettings,
        inbox: queue.SimpleQueue[Message],
        *,
        receive_max: int,
        subscriptions: tuple[str, ...],
        unsubscriptions: tuple[str, ...],
        shared: bool,
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.inbox = inbox
        self.receive_max = receive_max
        self.subscriptions = subscriptions
        self.unsubscriptions = unsubscriptions
        self.shared = shared
        self.on_subscribed = on_subscribed
        self._edges: dict[int, tuple[int, MqttEdge]] = {}  # slot → (epoch, edge)
        self._lock = threading.Lock()
        self._stopped = False

    def hold(self, slots: dict[int, int]) -> None:
        """Hold exactly these slots (slot → epoch): connect new ones, drop the rest."""
        with self._lock:
            if self._stopped:
                return
            for slot, (epoch, edge) in list(self._edges.items()):
                if slots.get(slot) != epoch:
                    log.info("mqtt.slot_released slot=%d epoch=%d", slot, epoch)
                    edge.stop()
                    del self._edges[slot]
            for slot, epoch in sorted(slots.items()):
                if slot not in self._edges:
                    log.info("mqtt.slot_taken slot=%d epoch=%d", slot, epoch)
                    edge = self._edge(slot)
                    self._edges[slot] = (epoch, edge)
                    edge.start()

    def _edge(self, slot: int) -> MqttEdge:
        if not self.shared:
            return MqttEdge(
                self.settings,
                self.inbox,
                self.receive_max,
                self.on_subscribed,
                self.subscriptions,
                self.unsubscriptions,
            )
        group = self.settings.client_id
        shared = tuple(
            f"$share/{group}/{topic}" for topic in self.subscriptions if topic != PROFILES
        )
        return MqttEdge(
            self.settings,
            self.inbox,
            self.receive_max,
            self.on_subscribed,
            shared + ((PROFILES,) if slot == 0 else ()),
            tuple(f"$share/{group}/{topic}" for topic in self.unsubscriptions),
            slot=slot,
            client_id=f"{self.settings.client_id}-{slot}",
        )

    def ack(self, message: Message) -> None:
        with self._lock:
            held = self._edges.get(message.slot)
        if held is not None:
            held[1].ack(message)

    def fence(self, batch: list[Message]) -> dict[int, int]:
        """The slots (with their epochs) a batch came through, for the ingest check."""
        with self._lock:
            return {m.slot: self._edges[m.slot][0] for m in batch if m.slot in self._edges}

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._edges)

    def subscribed(self) -> bool:
        """Every held session is connected and subscribed (and there is at least one)."""
        with self._lock:
            edges = [edge for _, edge in self._edges.values()]
        return bool(edges) and all(edge.subscribed.is_set() for edge in edges)

    def connected(self) -> bool:
        with self._lock:
            return any(edge.connected.is_set() for _, edge in self._edges.values())

    def dropped_qos0(self) -> int:
        with self._lock:
            return sum(edge.dropped_qos0 for _, edge in self._edges.values())

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for _, edge in self._edges.values():
                edge.stop()
            self._edges.clear()
