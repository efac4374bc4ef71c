"""`courierd run`: wires the edges (MQTT, SQLite, OneTablet, HTTP) to the loops.

Threads: paho's network thread (convert and enqueue), the ingest writer, the
dispatcher with its push workers, the health server; the main thread supervises:
it sends READY/WATCHDOG/STOPPING to systemd, watches for a dead loop (fatal, exit 1)
and on SIGTERM/SIGINT stops intake, finishes the batch and in-flight pushes, exits 0.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from courierd import systemd
from courierd.config import Settings
from courierd.dispatch import Dispatcher
from courierd.errors import CourierdError
from courierd.health import HealthServer
from courierd.ingest import Ingest
from courierd.metrics import Metrics
from courierd.mqtt import Message, MqttEdge
from courierd.onetablet import OneTabletClient
from courierd.store import Store

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
STALL_S = 30.0  # a loop silent this long is stuck: stop pinging the watchdog


class Daemon:
    """The running service. `run()` blocks until stopped and returns the exit code."""

    def __init__(self, settings: Settings, on_ready: Callable[[], None] = lambda: None) -> None:
        ot = settings.require_onetablet()
        assert ot.base_url is not None and ot.api_key is not None
        self.settings = settings
        self.metrics = Metrics()
        self.stop_requested = threading.Event()
        self._stop_loops = threading.Event()
        self._fatal: list[BaseException] = []
        self.inbox: queue.Queue[Message] = queue.Queue(maxsize=settings.ingest.batch_size * 4)
        self.edge = MqttEdge(
            settings.mqtt,
            self.inbox,
            receive_max=min(65535, settings.ingest.batch_size * 2),
            on_subscribed=self._ready,
        )
        self._is_ready = threading.Event()
        self._on_ready = on_ready

        self.client = OneTabletClient(
            ot.base_url,
            ot.api_key.get_secret_value(),
            transport=ot.transport,
            timeout=ot.timeout_s,
            max_connections=ot.max_concurrency,
        )
        # One connection per writer thread. Ingest commits are what must survive power
        # loss (store.synchronous). The dispatcher only marks pushes delivered: losing
        # its last commits to a power cut re-sends those pushes, with the same
        # Idempotency-Key, so it skips the fsync that would hold the write lock.
        ingest_store = Store(settings.store.path, synchronous=settings.store.synchronous)
        dispatch_store = Store(settings.store.path, synchronous="NORMAL")
        self._stores = [ingest_store, dispatch_store]
        self.dispatcher = Dispatcher(
            self._stores[1],
            self.client,
            self.metrics,
            concurrency=ot.max_concurrency,
            schedule=ot.retry_schedule_s,
        )
        self.ingest = Ingest(
            self._stores[0],
            self.inbox,
            self.edge.ack,
            self.metrics,
            batch_size=settings.ingest.batch_size,
            batch_ms=settings.ingest.batch_ms,
            on_pushes=self.dispatcher.wake,
        )
        self.http = (
            HealthServer(settings.http.listen, self.health, self.metrics.registry)
            if settings.http.listen
            else None
        )
        self._threads = [
            threading.Thread(target=self._guard, args=(self.ingest.run,), name="ingest"),
            threading.Thread(target=self._guard, args=(self.dispatcher.run,), name="dispatch"),
        ]

    def _ready(self) -> None:
        """Store open and subscriptions granted: tell systemd once (called on paho's thread)."""
        if not self._is_ready.is_set():
            self._is_ready.set()
            systemd.notify("READY=1\nSTATUS=connected, ingesting")
            log.info("daemon.ready")
            self._on_ready()

    def health(self) -> dict[str, Any]:
        """What /healthz reports: ok only if MQTT is up, the store works and the key is good."""
        reasons = []
        if not self.edge.subscribed.is_set():
            reasons.append("mqtt: not connected to the broker")
        if self._fatal:
            reasons.append(f"database: {self._fatal[0]}")
        if self.dispatcher.auth_paused:
            reasons.append("onetablet: API key refused (401); pushes paused")
        return {
            "status": "ok" if not reasons else "error",
            "reasons": reasons,
            "mqtt": "connected" if self.edge.connected.is_set() else "disconnected",
            "onetablet": "unauthorized" if self.dispatcher.auth_paused else "ok",
            "outbox_pending": self.dispatcher.outbox_pending,
        }

    def _guard(self, loop: Callable[[threading.Event], None]) -> None:
        """Run a loop; any exception out of it is fatal for the whole process."""
        try:
            loop(self._stop_loops)
        except BaseException as e:
            log.exception("daemon.fatal thread=%s", threading.current_thread().name)
            self._fatal.append(e)
            self.stop_requested.set()

    def run(self) -> int:
        if self.http:
            self.http.start()
        for t in self._threads:
            t.start()
        self.edge.start()
        log.info(
            "daemon.started store=%s mqtt=%s:%s",
            self.settings.store.path,
            self.settings.mqtt.host,
            self.settings.mqtt.port,
        )
        ping_every = systemd.watchdog_interval()
        next_ping = 0.0
        while not self.stop_requested.wait(0.2):
            self.metrics.mqtt_connected.set(1 if self.edge.connected.is_set() else 0)
            if ping_every and time.monotonic() >= next_ping and self._loops_alive():
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
        return self.shutdown()

    def _loops_alive(self) -> bool:
        now = time.monotonic()
        return all(now - hb < STALL_S for hb in (self.ingest.heartbeat, self.dispatcher.heartbeat))

    def shutdown(self) -> int:
        """Stop intake, finish the batch and in-flight pushes (bounded), close everything."""
        systemd.notify("STOPPING=1")
        log.info("daemon.stopping")
        self._stop_loops.set()
        self.dispatcher.wake()
        for t in self._threads:
            t.join(timeout=15)
        self.edge.stop()  # after ingest: the last batch's acks still go out
        if self.http:
            self.http.stop()
        self.client.close()
        for s in self._stores:
            s.close()
        code = EXIT_FATAL if self._fatal else EXIT_OK
        log.info("daemon.stopped exit=%d", code)
        return code


def run_daemon(settings: Settings, on_ready: Callable[[], None] = lambda: None) -> int:
    """Entry point of `courierd run`; `on_ready` runs once MQTT subscriptions are granted."""
    daemon = Daemon(settings, on_ready)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("daemon.signal %s", signal.Signals(signum).name)
        daemon.stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except CourierdError:
        daemon.shutdown()
        raise
