"""The MQTT sessions of the MQTT process: one, or (a cluster) this instance's slots.

Alone (SQLite), courierd reads the broker through one persistent session named
`mqtt.client_id`, subscribed to its topics, and paho reconnects it by itself. In a
cluster (PostgreSQL, CONTRACT.md 10) it holds some of K sessions `{client_id}-{k}`,
all members of the same shared subscriptions (`$share/{client_id}/...`), as the
dispatch process's slot manager grants them (`grant`, membership.py): what is new (or
taken over again) is connected, what is no longer ours is disconnected, keeping the
session on the broker for the next holder.

A cluster's session never connects by itself. A grant holds until a deadline (the
lease, by this host's monotonic clock); a session lost before then is connected again
(`tick`), one past it is not, and every session is disconnected at the deadline.
So an instance that was stopped or cut off from the database learns that its slots
are confirmed before it connects again, and never kicks their new holder off.

Every message carries its slot, epoch and connection: a batch is committed only under
the epochs its messages came with (`admit`), and acknowledged only on the connection
that delivered it.

Retained profiles are not delivered to shared subscriptions, and the order in which a
courier's profiles are applied matters; so `couriers/+/profile` is a plain
subscription of slot 0 only, and profiles reach exactly one instance, in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from courierd.config import MqttSettings
from courierd.daemon.ipc import Grant
from courierd.edges.mqtt import Message, MqttEdge, Room

log = logging.getLogger(__name__)

SHARED_KINDS = ("couriers/+/status", "couriers/+/location", "couriers/+/lwt")
PROFILES = "couriers/+/profile"
RECONNECT_AFTER_S = 1.0  # a cluster's lost session is connected again after this,
RECONNECT_MAX_S = 30.0  # doubling while it keeps failing (a broker down, a refusal)


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
        monotonic: Callable[[], float] = time.monotonic,
        interpret: Callable[[str, bytes, int], object] | None = None,
    ) -> None:
        self.settings = settings
        self.interpret = interpret  # each edge's (MqttEdge)
        self.inbox = inbox
        self.receive_max = receive_max
        self.subscriptions = subscriptions
        self.unsubscriptions = unsubscriptions
        self.shared = shared
        self.on_subscribed = on_subscribed
        self.monotonic = monotonic
        self._edges: dict[int, MqttEdge] = {}
        self._reconnect_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}  # lost again before subscribing, by slot
        self._grant: Grant | None = None
        self._dropped_before = 0  # QoS 0 drops counted by edges since stopped
        self._lock = threading.Lock()
        self._stopped = False
        # Made when messages are taken out of the inbox: an edge whose paho thread waits
        # for room in it (MqttEdge._make_room) goes on.
        self.room = Room()

    def hold(self, slots: dict[int, int]) -> None:
        """Hold exactly these slots (slot → epoch): connect new ones, drop the rest."""
        with self._lock:
            self._hold(slots)

    def grant(self, grant: Grant) -> dict[int, int]:
        """A cluster: hold what the slot manager granted, unless its deadline has passed
        (a grant that waited in the pipe while this process was stopped). Returns the
        slots now held."""
        with self._lock:
            self._grant = grant
            fresh = self.monotonic() < grant.valid_until
            self._hold(grant.slots if fresh else {})
            return {slot: edge.epoch for slot, edge in self._edges.items()}

    def tick(self) -> None:
        """A cluster, a few times a second: disconnect everything once the grant has run
        out; connect a lost session again while it has not."""
        with self._lock:
            if self._grant is None or self._stopped:
                return
            now = self.monotonic()
            if now >= self._grant.valid_until:
                if self._edges:
                    log.warning(
                        "cluster.slots_dropped slots=%s reason=%s",
                        sorted(self._edges),
                        self._grant.problem or "the database did not confirm them in time",
                    )
                    self._hold({})
                return
            for slot, edge in list(self._edges.items()):
                if edge.subscribed.is_set():
                    self._failures.pop(slot, None)
                if not edge.ended.is_set():
                    continue
                failures = self._failures.get(slot, 0)
                wait = min(RECONNECT_MAX_S, RECONNECT_AFTER_S * 2**failures)
                at = self._reconnect_at.setdefault(slot, now + wait)
                if now >= at:
                    del self._reconnect_at[slot]
                    self._failures[slot] = failures + 1
                    self._retire(edge)
                    self._edges[slot] = self._start(slot, edge.epoch)

    def _hold(self, slots: dict[int, int]) -> None:
        if self._stopped:
            return
        gone = [slot for slot, edge in self._edges.items() if slots.get(slot) != edge.epoch]
        edges = [self._edges.pop(slot) for slot in gone]  # out first, whatever stopping does
        for slot in gone:
            self._reconnect_at.pop(slot, None)
            self._failures.pop(slot, None)
        for edge in edges:
            log.info("mqtt.slot_released slot=%d epoch=%d", edge.slot, edge.epoch)
            # Every DISCONNECT first: each stop waits (at most CLOSE_WAIT_S) for its broker
            # to close the connection, and a broker that no longer answers would otherwise
            # hold this lock (acks, fences, health) once per slot, one after another.
            edge.begin_stop()
        for edge in edges:
            self._retire(edge)
        for slot, epoch in sorted(slots.items()):
            if slot not in self._edges:
                log.info("mqtt.slot_taken slot=%d epoch=%d", slot, epoch)
                self._edges[slot] = self._start(slot, epoch)

    def _retire(self, edge: MqttEdge) -> None:
        edge.stop()
        self._dropped_before += edge.dropped_qos0

    def _start(self, slot: int, epoch: int) -> MqttEdge:
        edge = self._edge(slot, epoch)
        edge.start()
        return edge

    def _edge(self, slot: int, epoch: int) -> MqttEdge:
        if not self.shared:
            return MqttEdge(
                self.settings,
                self.inbox,
                self.receive_max,
                self.on_subscribed,
                self.subscriptions,
                self.unsubscriptions,
                room=self.room,
                interpret=self.interpret,
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
            epoch=epoch,
            supervised=True,
            room=self.room,
            interpret=self.interpret,
        )

    def admit(self, batch: list[Message]) -> tuple[list[Message], dict[int, int] | None]:
        """A cluster: the messages of a batch that came through a session still held, at
        its epoch, and the fence they are committed under (slot → epoch). The others
        are left unacknowledged: the broker gives them to the session's next holder."""
        if not self.shared:
            return batch, None
        with self._lock:
            epochs = {slot: edge.epoch for slot, edge in self._edges.items()}
        kept = [m for m in batch if epochs.get(m.slot) == m.epoch]
        if len(kept) < len(batch):
            log.info("ingest.not_ours messages=%d (slots handed over)", len(batch) - len(kept))
        return kept, {m.slot: m.epoch for m in kept}

    def ack_many(self, messages: list[Message]) -> None:
        """Acknowledge a committed batch: each message on the connection that delivered
        it (none if that is gone), each connection's share in one write (MqttEdge.ack_many)."""
        with self._lock:
            edges = dict(self._edges)
        if len(edges) == 1:  # alone, or a cluster holding one slot: no sorting out
            [(only, alone)] = edges.items()
            alone.ack_many(m for m in messages if m.slot == only)
            return
        by_slot: dict[int, list[Message]] = {}
        for m in messages:
            by_slot.setdefault(m.slot, []).append(m)
        for slot, mine in by_slot.items():
            edge = edges.get(slot)
            if edge is not None:
                edge.ack_many(mine)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._edges)

    def problem(self) -> str | None:
        """A cluster: why this instance's share is not confirmed (for health), if so."""
        with self._lock:
            grant = self._grant
        if grant is None:
            return None
        left = grant.valid_until - self.monotonic()
        if left <= 0:
            why = grant.problem or "the slot manager stopped confirming them"
            return f"cluster: MQTT sessions dropped, their lease is not confirmed ({why})"
        if grant.problem:
            return f"cluster: {grant.problem}; keeping slots {sorted(grant.slots)} for {left:.0f}s"
        return None

    def subscribed(self) -> bool:
        """Every held session is connected and subscribed (and there is at least one)."""
        with self._lock:
            edges = list(self._edges.values())
        return bool(edges) and all(edge.subscribed.is_set() for edge in edges)

    def connected(self) -> bool:
        with self._lock:
            return any(edge.connected.is_set() for edge in self._edges.values())

    def dropped_qos0(self) -> int:
        with self._lock:
            return self._dropped_before + sum(e.dropped_qos0 for e in self._edges.values())

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for edge in self._edges.values():
                edge.begin_stop()  # all DISCONNECTs first: their waits overlap
            for edge in self._edges.values():
                edge.stop()
            self._edges.clear()
