"""The ingest loop: one writer thread turning MQTT messages into committed effects.

It drains the inbox in batches bounded by count and by milliseconds, parses every
message (bad ones become dead letters), commits the whole batch in one transaction
(`Store.commit_batch`), and only then acknowledges the messages to the broker. One
fsync per batch, not per message, is what makes `synchronous=FULL` affordable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from courierd.metrics import Metrics
from courierd.model import DeadLetter, LocationFix, ProfileUpdate, StatusEvent
from courierd.mqtt import Message
from courierd.planner import Effects
from courierd.store import Store
from courierd.telemetry import parse

log = logging.getLogger(__name__)

Acker = Callable[[Message], None]


class Ingest:
    """Batches messages from `inbox` into `store`, then acks them with `ack`."""

    def __init__(
        self,
        store: Store,
        inbox: queue.Queue[Message],
        ack: Acker,
        metrics: Metrics,
        *,
        batch_size: int = 500,
        batch_ms: float = 10.0,
        on_pushes: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.inbox = inbox
        self.ack = ack
        self.metrics = metrics
        self.batch_size = batch_size
        self.batch_wait = batch_ms / 1000
        self.on_pushes = on_pushes
        self.clock = clock
        self.heartbeat = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Until `stop`: take a batch, commit it, ack it. Store errors propagate (fatal)."""
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            batch = self._take(timeout=0.2)
            if batch:
                self.commit(batch)

    def _take(self, timeout: float) -> list[Message]:
        """The first message (waiting up to `timeout`), then whatever follows within the window."""
        try:
            batch = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        return batch

    def commit(self, batch: list[Message]) -> Effects:
        inputs = [parse(m.topic, m.payload) for m in batch]
        fx = self.store.commit_batch(inputs, now=self.clock())
        for message in batch:  # only now: the effects are durable
            self.ack(message)
        self._count(inputs, fx)
        if fx.pushes:
            self.on_pushes()
        return fx

    def _count(self, inputs: Sequence[object], fx: Effects) -> None:
        m = self.metrics
        m.batch_size.observe(len(inputs))
        for item in inputs:
            kind = (
                "status"
                if isinstance(item, StatusEvent)
                else "location"
                if isinstance(item, LocationFix)
                else "profile"
                if isinstance(item, ProfileUpdate)
                else "invalid"
                if isinstance(item, DeadLetter)
                else "assignment"
            )
            m.received.labels(kind).inc()
        for outcome in ("accepted", "duplicate", "stale", "cancelled", "wrong_courier"):
            if fx.counts[outcome]:
                m.events.labels(outcome).inc(fx.counts[outcome])
        for letter in fx.dead_letters:
            m.rejected.labels(letter.reason).inc()
            log.warning(
                "ingest.rejected reason=%s topic=%s detail=%r",
                letter.reason,
                letter.topic,
                letter.detail,
            )
        m.transitions.inc(len(fx.transitions))
        for t in fx.transitions:
            log.info(
                "ingest.transition order_id=%s status=%s inferred=%s",
                t.order_id,
                t.status.value,
                t.inferred,
            )
