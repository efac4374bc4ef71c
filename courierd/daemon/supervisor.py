"""`courierd run`: the MQTT process, which supervises the ingest, dispatch and HTTP processes.

Why separate processes: paho parses MQTT packets in Python, and at full speed its
network thread needs an interpreter to itself; ingest and push threads in the same
process cut the drain rate roughly in half (measured), and sixteen push threads
starve the ingest writer the same way one level down. So:

- this process: paho (its network thread converts, parses (batcher.Reader) and
  enqueues), the batcher (batcher.py), the metrics, and the main thread:
  READY/WATCHDOG/STOPPING for systemd, supervision, signals;
- the ingest process (ingest.py): commits batches;
- the dispatch process (dispatch.py): delivers the outbox, and does housekeeping;
- the HTTP process (web.py): every listener (health, metrics, the dispatch API, the
  page, the webhook), so that no HTTP client can slow ingest. This process binds its
  sockets (a taken port is exit 2 here) and sends it the health report.

Start-up: the database lock (one daemon per SQLite file), then the workers open the
database, then READY — without waiting for the broker, which may be down: the outbox
is still delivered, health says MQTT is down, and paho connects when it can.
Stop: one deadline (daemon.stop_timeout_s, under the unit's TimeoutStopSec) for intake,
the last batch, and in-flight pushes; whatever is still running then is killed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import Any

from prometheus_client import generate_latest

from courierd.config import Settings, redact
from courierd.daemon.batcher import Batcher, IngestFailed, Reader
from courierd.daemon.ipc import (
    WebLink,
    dispatch_process,
    ingest_process,
    quick_thread_handovers,
    set_process_name,
    web_process,
)
from courierd.daemon.sessions import PROFILES, SHARED_KINDS, Sessions
from courierd.daemonlock import DaemonLock
from courierd.domain.model import BatchReport, DispatchStats
from courierd.domain.owntracks import SUBSCRIPTIONS as OWNTRACKS
from courierd.domain.telemetry import ASSIGNMENTS_TOPIC, SUBSCRIPTIONS
from courierd.edges import systemd
from courierd.edges.listen import bind, check_exposure
from courierd.edges.metrics import Metrics
from courierd.edges.mqtt import Message
from courierd.errors import CourierdError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
START_TIMEOUT_S = 60.0


def instance_name() -> str:
    """This run's name in a cluster: host, pid and a random part (a restarted instance,
    even with the same pid, is a new member with new claims)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _once(callback: Callable[[], None]) -> Callable[[], None]:
    done = threading.Event()

    def call() -> None:
        if not done.is_set():
            done.set()
            callback()

    return call


def record_batch(metrics: Metrics, report: BatchReport) -> None:
    """Apply a batch report to the Prometheus metrics."""
    metrics.batch_size.observe(report.size)
    metrics.stages.labels("receive").observe(report.waited_s)
    metrics.stages.labels("commit").observe(report.commit_s)
    for kind, n in report.kinds.items():
        metrics.received.labels(kind).inc(n)
    for outcome, n in report.outcomes.items():
        metrics.events.labels(outcome).inc(n)
    for reason, n in report.rejected.items():
        metrics.rejected.labels(reason).inc(n)
    metrics.transitions.inc(report.transitions)
    for key, n in report.tracking.items():
        kind, _, name = key.partition("_")
        if kind == "fix":
            metrics.fixes_ignored.labels(name).inc(n)
        elif kind == "ignored":
            metrics.ignored.labels(name).inc(n)
        elif key == "geofence_status":
            metrics.geofence_statuses.inc(n)
        elif key in ("courier_offline", "courier_back"):
            metrics.alerts.labels(key).inc(n)


class Daemon:
    """The running service. `run()` blocks until stopped and returns the exit code."""

    def __init__(
        self,
        settings: Settings,
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        settings.require_onetablet()
        self.settings = settings
        self.metrics = Metrics()
        self.stop_requested = threading.Event()
        # Set by the signal handler, and nothing more: see `_stop_now`.
        self.signal_received: int | None = None
        self._stop_intake = threading.Event()
        self._fatal: list[str] = []
        self._dispatch = DispatchStats()
        self._last_report = time.monotonic()
        # SimpleQueue: put() is a fraction of Queue.put() on paho's busy thread.
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        owntracks = settings.owntracks.enabled
        # A cluster (PostgreSQL) reads the broker through shared subscriptions; alone,
        # courierd subscribes to all of couriers/# (see sessions.py).
        self.clustered = settings.store.url is not None
        self.instance = instance_name()
        kinds = (*SHARED_KINDS, PROFILES, ASSIGNMENTS_TOPIC) if self.clustered else SUBSCRIPTIONS
        # Messages are parsed as they arrive, beside the ingest process (batcher.py).
        self.reader = Reader(settings.owntracks.courier_id if owntracks else None)
        self.sessions = Sessions(
            settings.mqtt,
            self.inbox,
            receive_max=settings.ingest.receive_maximum,
            subscriptions=kinds + (OWNTRACKS if owntracks else ()),
            unsubscriptions=() if owntracks else OWNTRACKS,
            shared=self.clustered,
            on_subscribed=_once(on_subscribed),
            interpret=self.reader,
        )
        self._dispatch_ready = threading.Event()
        self._slots_known = threading.Event()  # a cluster: the first share came in
        self._control_lock = threading.Lock()  # the control pipe has two writers
        ctx = multiprocessing.get_context("spawn")
        self._ingest_pipe, ingest_end = ctx.Pipe()
        self._report_pipe, report_end = ctx.Pipe(duplex=False)
        control_end, self._control_pipe = ctx.Pipe(duplex=False)
        wake_reader, wake_writer = ctx.Pipe(duplex=False)
        self._ingest = ctx.Process(
            target=ingest_process,
            args=(settings, ingest_end, wake_writer, self.instance),
            name="courierd-ingest",
            daemon=True,
        )
        self._dispatch_proc = ctx.Process(
            target=dispatch_process,
            args=(settings, report_end, control_end, wake_reader, self.instance),
            name="courierd-dispatch",
            daemon=True,
        )
        # Ours to close once the children hold them, so a dead child reads as EOF here.
        self._child_ends = [ingest_end, report_end, control_end, wake_reader, wake_writer]
        # Every listener, in a process of its own; bound here, so a bad address is exit 2.
        check_exposure(settings.http)
        http = bind(settings.http.listen, "http.listen") if settings.http.listen else []
        hook = settings.webhook.listen
        webhook = bind(hook, "webhook.listen") if hook else []
        self._sockets = http + webhook
        web_pipe, web_end = ctx.Pipe()
        self._web = (
            ctx.Process(
                target=web_process,
                args=(settings, web_end, http, webhook),
                name="courierd-http",
                daemon=True,
            )
            if self._sockets
            else None
        )
        self._child_ends.append(web_end)
        self.web_link = WebLink(
            web_pipe, self.health, lambda: generate_latest(self.metrics.registry), self._die
        )
        self._web_thread = threading.Thread(target=self.web_link.run, name="web-link", daemon=True)
        self.batcher = Batcher(
            self.inbox,
            self._ingest_pipe,
            self.sessions,
            size=settings.ingest.batch_size,
            wait_s=settings.ingest.batch_ms / 1000,
            on_report=self._committed,
        )
        self._batch_thread = threading.Thread(target=self._batch_loop, name="batcher")
        # Read at each scrape, as /healthz reads them: a gauge the main loop set every
        # 0.2 s could say the database was fine next to a health reply saying it was full.
        self.metrics.database_ok.set_function(
            lambda: 1 if self.batcher.database_problem is None else 0
        )
        self.metrics.mqtt_connected.set_function(lambda: 1 if self.sessions.connected() else 0)
        self._watch_backlog()
        self._reporter = threading.Thread(target=self._report_loop, name="reports", daemon=True)

    def _committed(self, report: BatchReport) -> None:
        record_batch(self.metrics, report)
        if report.clock_offset is not None:
            self.reader.set_clock(report.clock_offset)

    def _watch_backlog(self) -> None:
        """The backlog gauges, read when /metrics is scraped (README "When courierd is
        behind")."""
        m, batcher = self.metrics, self.batcher
        m.ingest_behind.set_function(lambda: batcher.behind_s(time.monotonic()))
        m.ingest_lag.set_function(lambda: batcher.lag_s(time.monotonic()))
        m.inflight.set_function(batcher.inflight)
        m.window.set_function(self.window)

    def window(self) -> int:
        """Messages courierd lets wait for a batch at most (ingest.window): the broker's
        Receive Maximum, and held on courierd's side too (MqttEdge._make_room)."""
        return self.settings.ingest.receive_maximum

    def backlog(self) -> dict[str, Any]:
        """The `ingest` part of the health report, and whether it is behind."""
        now = time.monotonic()
        behind = self.batcher.behind_s(now)
        return {
            "behind": behind >= self.settings.ingest.behind_after_s,
            "behind_s": round(behind, 1),
            "lag_s": round(self.batcher.lag_s(now), 3),
            "inflight": self.batcher.inflight(),
            "window": self.window(),
        }

    def health(self) -> dict[str, Any]:
        """What /healthz reports: ok only if MQTT is up, the database takes writes, the
        ingest and dispatch loops are turning and OneTablet accepts the key."""
        reasons = []
        if self.clustered and not self._slots_known.is_set():
            reasons.append("cluster: waiting for this instance's share of MQTT sessions")
        elif not self.sessions.subscribed():
            if self.clustered and not self.sessions.held():
                pass  # more instances than slots: this one only delivers pushes
            else:
                reasons.append("mqtt: disconnected from the broker")
        if self.batcher.database_problem is not None:
            reasons.append(f"database: {self.batcher.database_problem}")
        if self.clustered and (problem := self.sessions.problem()) is not None:
            reasons.append(problem)
        reasons += self._stalled()
        reasons += self._fatal
        if self._dispatch.auth_paused:
            reasons.append("onetablet: API key refused (401); pushes paused")
        report: dict[str, Any] = {
            "status": "ok" if not reasons else "error",
            "reasons": reasons,
            "mqtt": "connected" if self.sessions.connected() else "disconnected",
            "database": "ok" if self.batcher.database_problem is None else "unavailable",
            "onetablet": "unauthorized" if self._dispatch.auth_paused else "ok",
            "outbox_pending": self._dispatch.pending,
            "ingest": (ingest := self.backlog()),
            "warnings": [],
        }
        if ingest["behind"]:
            # A warning, not a failure (README "When courierd is behind"): courierd is at
            # its maximum, the broker holds the rest; a restart would only make it worse.
            report["warnings"].append(
                f"ingest: behind for {ingest['behind_s']:.0f}s, committing at its maximum; "
                "the broker holds the backlog"
            )
        if self.clustered:
            report["instance"] = self.instance
            report["slots"] = self.sessions.held()
        return report

    def _stalled(self) -> list[str]:
        """Loops that stopped turning (they would otherwise look healthy while idle)."""
        if not self._dispatch_ready.is_set():
            return []
        now = time.monotonic()
        stall = self.settings.daemon.stall_after_s
        out = []
        if self._batch_thread.is_alive() and now - self.batcher.heartbeat > stall:
            out.append(f"ingest: batcher loop stalled for {now - self.batcher.heartbeat:.0f}s")
        if now - self._last_report > stall:
            out.append(f"dispatch: no report for {now - self._last_report:.0f}s")
        elif self._dispatch.heartbeat_age_s > stall:
            out.append(f"dispatch: loop stalled for {self._dispatch.heartbeat_age_s:.0f}s")
        return out

    def _die(self, reason: str) -> None:
        log.error("daemon.fatal %s", reason)
        self._fatal.append(reason)
        self.stop_requested.set()

    def _batch_loop(self) -> None:
        try:
            self.batcher.run(self._stop_intake)
        except IngestFailed as e:
            self._die(str(e))
        except Exception as e:  # a bug in this thread must not leave health green
            log.exception("daemon.batcher_failed")
            self._die(f"batcher: {e!r}")

    def _tell_dispatch(self, message: tuple[str, Any]) -> None:
        with contextlib.suppress(OSError), self._control_lock:
            self._control_pipe.send(message)

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
                self._last_report = time.monotonic()
                self._dispatch_ready.set()
            elif kind == "slots":  # a Grant: hold these, and say what we hold
                holding = self.sessions.grant(value)
                self._slots_known.set()
                self._tell_dispatch(("holding", holding))
                m.slots_unheld.set(math.nan if value.unheld is None else value.unheld)
            elif kind == "stats":
                stats: DispatchStats = value
                self._dispatch, self._last_report = stats, time.monotonic()
                for outcome, n in stats.outcomes.items():
                    m.pushes.labels(outcome).inc(n)
                for seconds in stats.latencies:
                    m.push_latency.observe(seconds)
                for stage, values in stats.stages.items():
                    histogram = m.stages.labels(stage)
                    for seconds in values:
                        histogram.observe(seconds)
                m.auth_paused.set(1 if stats.auth_paused else 0)
                m.outbox_depth.set(stats.pending)
                m.outbox_failed.set(stats.failed)
                m.oldest_pending.set(stats.oldest_pending_age_s)
                m.couriers_offline.set(stats.couriers_offline)
                counts = stats.broker_counts
                m.broker_stored.set(counts.get("stored", math.nan))
                m.broker_dropped.set(counts.get("dropped", math.nan))
                m.alerts.labels("courier_offline").inc(stats.watchdog_alerts)

    def run(self) -> int:
        set_process_name("courierd")  # and its workers courierd-ingest, courierd-push
        quick_thread_handovers()
        self._ingest.start()
        self._dispatch_proc.start()
        if self._web is not None:
            self._web.start()
            self._web_thread.start()
        for end in self._child_ends:
            end.close()
        for sock in self._sockets:
            sock.close()  # the HTTP process has its own copies now
        self._reporter.start()
        if not self._ingest_started() or not self._wait(self._dispatch_ready, "dispatch"):
            return self.shutdown()
        if self._web is not None and not self._wait(self.web_link.ready, "http"):
            return self.shutdown()
        self._batch_thread.start()
        if not self.clustered:  # a cluster's slots come from the dispatch process
            self.sessions.hold({0: 0})  # paho connects in the background, and keeps trying
        systemd.notify("READY=1\nSTATUS=database open; connecting to the broker")
        store = self.settings.store
        log.info(
            "daemon.ready store=%s mqtt=%s:%s ingest_pid=%s dispatch_pid=%s http_pid=%s",
            store.path if store.url is None else redact(store.url.get_secret_value()),
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            self._ingest.pid,
            self._dispatch_proc.pid,
            None if self._web is None else self._web.pid,
        )
        ping_every = systemd.watchdog_interval()
        next_ping = 0.0
        dropped = 0
        while not self._stop_now(0.2):
            self.sessions.tick()  # a cluster's grant runs out here, however things stand
            now_dropped = self.sessions.dropped_qos0()
            self.metrics.dropped_qos0.inc(max(0, now_dropped - dropped))
            dropped = now_dropped
            for proc in (self._ingest, self._dispatch_proc, self._web):
                if proc is not None and not proc.is_alive():
                    self._die(f"{proc.name} exited with {proc.exitcode}")
            if ping_every and time.monotonic() >= next_ping and not self._stalled():
                systemd.notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping_every
        return self.shutdown()

    def _ingest_started(self) -> bool:
        """Wait for the ingest process's ("ready", its clock offset), or its fatal error."""
        if not self._ingest_pipe.poll(START_TIMEOUT_S):
            self._die("ingest process did not start")
            return False
        try:
            kind, value = self._ingest_pipe.recv()
        except (EOFError, OSError) as e:
            self._die(f"ingest process exited (its pipe: {e!r})")
            return False
        if kind != "ready":
            self._die(str(value))
            return False
        self.reader.set_clock(value)
        return True

    def _stop_now(self, wait_s: float) -> bool:
        """Whether to stop (a fatal error, or a signal), after waiting up to `wait_s`.

        The signal handler only notes the signal; this turns it into `stop_requested`
        on the main thread's normal path. Setting the Event in the handler itself takes
        the Event's lock, which the main thread may hold inside `Event.wait` when the
        signal lands: it then waits on itself for good (seen once in CI: SIGTERM
        logged, then nothing until the SIGKILL 40 s later)."""
        signum = self.signal_received
        if signum is not None and not self.stop_requested.is_set():
            log.info("daemon.signal %s", signal.Signals(signum).name)
            self.stop_requested.set()
        return self.stop_requested.wait(wait_s)

    def _wait(self, event: threading.Event, what: str) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not event.wait(0.05):
            if self._stop_now(0):
                return False
            if time.monotonic() > deadline:
                self._die(f"{what} process did not start")
                return False
        return True

    def shutdown(self) -> int:
        """Stop intake, finish the batch and in-flight pushes, all within one deadline."""
        systemd.notify("STOPPING=1")
        log.info("daemon.stopping")
        deadline = time.monotonic() + self.settings.daemon.stop_timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop_intake.set()
        if self._batch_thread.is_alive():
            self._batch_thread.join(timeout=left())
        batcher_done = not self._batch_thread.is_alive()
        # After the batcher (the last batch's acks still go out), before the dispatch
        # process gives a cluster's slots back: the next holder must not find us there.
        self.sessions.stop()
        for proc, pipe in (
            (self._ingest, self._ingest_pipe),
            (self._dispatch_proc, self._control_pipe),
        ):
            # The ingest pipe has one writer, the batcher thread: still at it (the ingest
            # process hangs, and a send to it may wait), the process is killed below.
            if proc.is_alive() and (pipe is not self._ingest_pipe or batcher_done):
                with contextlib.suppress(OSError), self._control_lock:
                    pipe.send(("stop", None))
                proc.join(timeout=left())
        for proc in (self._ingest, self._dispatch_proc):
            if proc.is_alive():  # they ignore SIGTERM: the pipe is how they are told
                log.warning("daemon.killing %s (past the stop deadline)", proc.name)
                proc.kill()
                proc.join(5)
        # Last: health is answered (503, stopping) until the end.
        if self._web is not None and self._web.is_alive():
            self.web_link.stop()
            self._web.join(timeout=max(left(), 2.0))
            if self._web.is_alive():
                log.warning("daemon.killing %s (past the stop deadline)", self._web.name)
                self._web.kill()
                self._web.join(5)
        code = EXIT_FATAL if self._fatal else EXIT_OK
        log.info("daemon.stopped exit=%d", code)
        return code


def run_daemon(settings: Settings, on_subscribed: Callable[[], None] = lambda: None) -> int:
    """Entry point of `courierd run`; `on_subscribed` runs once MQTT subscriptions are
    granted (the demo starts its couriers then: a first run has no session yet)."""
    # First of all: a second daemon on the same SQLite file stops here (exit 1, one line).
    # PostgreSQL is meant to be shared: its instances form a cluster instead.
    lock = None if settings.store.url is not None else DaemonLock(settings.store.path).acquire()
    try:
        return _run(Daemon(settings, on_subscribed))
    finally:
        if lock is not None:
            lock.release()


def _run(daemon: Daemon) -> int:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        daemon.signal_received = signum  # no lock, no logging here: see Daemon._stop_now

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return daemon.run()
    except CourierdError:
        daemon.shutdown()
        raise
