"""Publishes the notification outbox (alerts, order events) over MQTT, in order.

A thread of the dispatch process. Each notification is published QoS 1 and deleted once
the broker has acknowledged it; if the broker is away, they wait in the database. In a
cluster only the instance holding the `notifier` lease publishes, so that alerts keep
their order (a paused holder's lease runs out, and another takes over).
"""

from __future__ import annotations

import logging
import threading

from courierd.edges.publisher import MqttPublisher
from courierd.errors import StoreUnavailable
from courierd.store import Store

log = logging.getLogger(__name__)


class Notifier:
    """`run(stop)` until stopped; `wake()` when notifications were written."""

    def __init__(self, store: Store, publisher: MqttPublisher) -> None:
        self.store = store
        self.notices = store.notices
        self.publisher = publisher
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        self.publisher.start()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    sent = self.flush()
                except StoreUnavailable as e:
                    log.warning("notify.database_unavailable error=%s", e)
                    sent = 0
                except Exception:  # never dies: the notifications wait in the database
                    log.exception("notify.failed")
                    sent = 0
                if not sent:
                    self._wake.wait(1.0)
        finally:
            self.publisher.stop()

    def flush(self, limit: int = 100) -> int:
        """Publish what is due, in order, until one is not acknowledged; how many went."""
        if not self.publisher.connected.is_set():
            return 0
        if self.store.db.concurrent and not self.store.leases.hold("notifier", self.store.lease_s):
            return 0  # another instance publishes
        done: list[int] = []
        for notice in self.notices.due(limit):
            if not self.publisher.publish(notice.topic, notice.payload):
                break
            done.append(notice.id)
            log.info("notify.published topic=%s", notice.topic)
        self.notices.published(done)
        return len(done)
