"""`courierd run`: the MQTT process, which supervises the ingest and dispatch processes.

This process holds paho (its network thread converts and enqueues), the batcher that
hands batches to the ingest process and acknowledges them once committed, /healthz and
/metrics, and the main thread: READY/WATCHDOG/STOPPING for systemd, a dead loop or
worker process is fatal (exit 1), and SIGTERM/SIGINT stop intake, finish the batch and
the in-flight pushes, and exit 0. See `core.py` for why there are three processes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from courierd.config import Settings
from courierd.daemon.workers import dispatch_main, ingest_main
from courierd.domain.model import BatchReport, DispatchStats
from courierd.edges import systemd
from courierd.edges.health import HealthServer
from courierd.edges.metrics import Metrics
from courierd.edges.mqtt import Message, MqttEdge
from courierd.errors import CourierdError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
STALL_S = 30.0  # a loop silent this long is stuck: stop pinging the watchdog
START_TIMEOUT_S = 60.0


def take_batch(
    inbox: queue.SimpleQueue[Message], *, size: int, wait_s: float, timeout: float
) -> list[Message]:
    """The first message (waiting up to `timeout`), then whatever follows within `wait_s`."""
    try:
        batch = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + wait_s
    while len(batch) < size:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(inbox.get(timeout=left))
            except queue.Empty:
                break
    return batch


def record_batch(metrics: Metrics, report: BatchReport) -> None:
    """Apply a batch report to the Prometheus metrics."""
    metrics.batch_size.observe(report.size)
    for kind, n in report.kinds.items():
        metrics.received.labels(kind).inc(n)
    for outcome, n in report.outcomes.items():
        metrics.events.labels(outcome).inc(n)
    for reason, n in report.rejected.items():
        metrics.rejected.labels(reason).inc(n)
    metrics.transitions.inc(report.transitions)


class Daemon:
    """The running service. `run()` blocks until stopped and returns the exit code."""

    def __init__(self, settings: Settings, on_ready: Callable[[], None] = lambda: None) -> None:
        settings.require_onetablet()
        self.settings = settings
        self.metrics = Metrics()
        self.stop_requested = threading.Event()
        self._stop_intake = threading.Event()
        self._fatal: list[str] = []
        self._dispatch = DispatchStats()
        self._last_report = time.monotonic()
        self._batch_heartbeat = time.monotonic()
        # SimpleQueue: put() is a fraction of Queue.put() on paho's busy thread.
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.edge = MqttEdge(
            settings.mqtt,
            self.inbox,
            receive_max=min(65535, settings.ingest.batch_size * 2),
            on_subscribed=self._ready,
        )
        self._is_ready = threading.Event()
        self._dispatch_ready = threading.Event()
        self._on_ready = on_ready
        ctx = multiprocessing.get_context("spawn")
        self._ingest_pipe, ingest_end = ctx.Pipe()
        self._report_pipe, report_end = ctx.Pipe(duplex=False)
        control_end, self._control_pipe = ctx.Pipe(duplex=False)
        wake_reader, wake_writer = ctx.Pipe(duplex=False)
        self._ingest = ctx.Process(
            target=ingest_main,
            args=(settings, ingest_end, wake_writer),
            name="courierd-ingest",
            daemon=True,
        )
        self._dispatch_proc = ctx.Process(
            target=dispatch_main,
            args=(settings, report_end, control_end, wake_reader),
            name="courierd-dispatch",
            daemon=True,
        )
        # Ours to close once the children hold them, so a dead child reads as EOF here.
        self._child_ends = [ingest_end, report_end, control_end, wake_reader, wake_writer]
        self.http = (
            HealthServer(settings.http.listen, self.health, self.metrics.registry)
            if settings.http.listen
            else None
        )
        self._batcher = threading.Thread(target=self._batch_loop, name="batcher")
        self._reporter = threading.Thread(target=self._report_loop, name="reports", daemon=True)

    def _ready(self) -> None:
        """Workers up and subscriptions granted: tell systemd once (called on paho's thread)."""
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
        reasons += self._fatal
        if self._dispatch.auth_paused:
            reasons.append("onetablet: API key refused (401); pushes paused")
        return {
            "status": "ok" if not reasons else "error",
            "reasons": reasons,
            "mqtt": "connected" if self.edge.connected.is_set() else "disconnected",
            "onetablet": "unauthorized" if self._dispatch.auth_paused else "ok",
            "outbox_pending": self._dispatch.pending,
        }

    def _die(self, reason: str) -> None:
        log.error("daemon.fatal %s", reason)
        self._fatal.append(reason)
        self.stop_requested.set()

    def _batch_loop(self) -> None:
        """Take a batch, have the ingest process commit it, then ack it (durable, then acked)."""
        size, wait_s = self.settings.ingest.batch_size, self.settings.ingest.batch_ms / 1000
        try:
            while not self._stop_intake.is_set():
                self._batch_heartbeat = time.monotonic()
                batch = take_batch(self.inbox, size=size, wait_s=wait_s, timeout=0.2)
                if not batch:
                    continue
                self._ingest_pipe.send(("batch", [(m.topic, m.payload) for m in batch]))
                kind, result = self._ingest_pipe.recv()
                if kind != "ok":
                    self._die(str(result))
                    return
                for message in batch:
                    self.edge.ack(message)
                record_batch(self.metrics, result)
        except (EOFError, OSError) as e:
            self._die(f"ingest process: {e!r}")

    def _report_loop(self) -> None:
        """Dispatch stats from the dispatch process into /metrics and /healthz."""
        m = self.metrics
        while True:
            try:
                kind, value = self._report_pipe.recv()
            except (EOFError, OSError):
                if not self._stop_intake.is_set():
                    self._die("dispatch process exited")
                return
            if kind == "fatal":
                self._die(str(value))
            elif kind == "ready":
                self._dispatch_ready.set()
            elif kind == "stats":
                stats: DispatchStats = value
                self._dispatch, self._last_report = stats, time.monotonic()
                for outcome, n in stats.outcomes.items():
                    m.pushes.labels(outcome).inc(n)
                for seconds in stats.latencies:
                    m.push_latency.observe(seconds)
                m.auth_paused.set(1 if stats.auth_paused else 0)
                m.outbox_depth.set(stats.pending)
                m.outbox_failed.set(stats.failed)
                m.oldest_pending.set(stats.oldest_pending_age_s)

    def run(self) -> int:
        self._ingest.start()
        self._dispatch_proc.start()
        for end in self._child_ends:
            end.close()
        self._reporter.start()
        if not self._ingest_started() or not self._wait(self._dispatch_ready, "dispatch"):
            return self.shutdown()
        if self.http:
            self.http.start()
        self._batcher.start()
        self.edge.start()
        log.info(
            "daemon.started store=%s mqtt=%s:%s",
            self.settings.store.path,
            self.settings.mqtt.host,
            self.settings.mqtt.port,
        )
        ping_every = systemd.watchdog_interval()
        next_ping = 0.0
        dropped = 0
        while not self.stop_requested.wait(0.2):
            self.metrics.mqtt_connected.set(1 if self.edge.connected.is_set() else 0)
            self.metrics.dropped_qos0.inc(self.edge.dropped_qos0 - dropped)
            dropped = self.edge.dropped_qos0
            for proc in (self._ingest, self._dispatch_proc):
                if not proc.is_alive():
                    self._die(f"{proc.name} exited with {proc.exitcode}")
            if ping_every and time.monotonic() >= next_ping and self._loops_alive():
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
        return self.shutdown()

    def _ingest_started(self) -> bool:
        """Wait for the ingest process's ("ready", None), or its fatal error."""
        if not self._ingest_pipe.poll(START_TIMEOUT_S):
            self._die("ingest process did not start")
            return False
        try:
            kind, value = self._ingest_pipe.recv()
        except (EOFError, OSError) as e:
            self._die(f"ingest process: {e!r}")
            return False
        if kind != "ready":
            self._die(str(value))
            return False
        return True

    def _wait(self, event: threading.Event, what: str) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not event.wait(0.05):
            if self.stop_requested.is_set():
                return False
            if time.monotonic() > deadline:
                self._die(f"{what} process did not start")
                return False
        return True

    def _loops_alive(self) -> bool:
        now = time.monotonic()
        return (
            now - self._batch_heartbeat < STALL_S
            and now - self._last_report < STALL_S
            and self._dispatch.heartbeat_age_s < STALL_S
        )

    def shutdown(self) -> int:
        """Stop intake, finish the batch and in-flight pushes (bounded), close everything."""
        systemd.notify("STOPPING=1")
        log.info("daemon.stopping")
        self._stop_intake.set()
        if self._batcher.is_alive():
            self._batcher.join(timeout=15)
        for proc, pipe in (
            (self._ingest, self._ingest_pipe),
            (self._dispatch_proc, self._control_pipe),
        ):
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send(("stop", None))
                proc.join(timeout=20)  # the dispatcher waits up to 10 s for pushes
                if proc.is_alive():
                    proc.terminate()
        self.edge.stop()  # after the batcher: the last batch's acks still go out
        if self.http:
            self.http.stop()
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
