"""What the daemon's processes share: how a worker starts, and how it dies with its parent.

`courierd run` is four processes (see supervisor.py for why). The MQTT process
starts the ingest, dispatch and HTTP processes with multiprocessing "spawn" and talks to
them over pipes; the database is the only state they share. Messages are tuples
`(kind, value)`:

- ingest pipe, request/reply: ("batch", ([(topic, payload, size), ...], [what each
  was parsed into, or None: parse it], fence)) or ("probe", None) → ("ok",
  BatchReport | None), ("unavailable", reason: the database failed, nothing was
  written, try again), ("fenced", reason: the slots in `fence` are another instance's
  now, nothing written, do not ack) or ("fatal", reason); ("stop", None) ends it. It
  announces itself with ("ready", clock offset | None: courierd's clock minus the
  host's, for parsing on arrival, batcher.Reader) once its database is open.
- report pipe, dispatch → MQTT process: ("ready", None), then ("stats", DispatchStats)
  every REPORT_S, ("slots", Grant) (a cluster: the MQTT sessions to hold, and until
  when), or ("fatal", reason).
- control pipe, MQTT process → dispatch: ("holding", {slot: epoch}) (a cluster: the
  sessions it holds, after each Grant), ("stop", None).
- wake pipe, ingest → dispatch: after a commit that wrote pushes or notifications, what
  it wrote (`wake_for`): b"p" wakes the dispatcher, b"n" the notifier.
- link pipe, MQTT process ↔ HTTP process (web.py), request/reply: ("health", None) →
  ("health", report), ("metrics", None) → ("metrics", prometheus_text); ("stop", None)
  ends it. The HTTP process announces ("ready", None) once it listens, or ("fatal",
  reason).

If the MQTT process disappears (kill -9), the pipes close and the workers exit at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from courierd.config import Settings
from courierd.domain.model import BatchReport
from courierd.logs import setup_logging

log = logging.getLogger(__name__)

PUSHES, NOTIFICATIONS = b"p", b"n"  # what a wake-up of the dispatch process says is new


def wake_for(report: BatchReport) -> bytes:
    """Whom a committed batch wakes in the dispatch process: the dispatcher if it wrote
    pushes, the notifier if it wrote notifications; nobody (b"") if neither. So the
    notifier does not look for notifications after every batch of pings and statuses."""
    return (PUSHES if report.pushes else b"") + (NOTIFICATIONS if report.notifications else b"")


REPORT_S = 0.25
LINK_S = 0.25


class Grant(NamedTuple):
    """A cluster's slot manager to the MQTT process: hold these sessions (slot → epoch)
    until `valid_until` (time.monotonic(), which is the same clock in every process of
    the host), unless a later grant says otherwise. Past it, the database has not
    confirmed them for too long: another instance may take them over, so the MQTT
    process disconnects them. `problem` says why the bookkeeping is failing, if it is;
    `unheld` counts the cluster's slots no live instance held in the round (a gauge;
    None while the rounds fail: this instance cannot tell, and says so as NaN)."""

    slots: dict[int, int]
    valid_until: float
    problem: str | None = None
    unheld: int | None = 0


def worker_setup(settings: Settings, name: str) -> None:
    """Named for `ps`/`top` (courierd-ingest, courierd-push); logging as the parent's;
    signals ignored: the MQTT process says when to stop."""
    set_process_name(name)
    setup_logging(settings.log.level, settings.log.format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


GC_YOUNG = 20_000  # a worker's collector runs after this many new objects (CPython: 700)


def settle_gc() -> None:
    """Once a worker has started: what it has built so far (modules, settings, its
    connections) lives as long as it does, so the cyclic collector stops walking it
    (`gc.freeze`), and it runs after GC_YOUNG new objects instead of 700.

    A push in flight holds a few hundred objects (aiohttp's request, response, task),
    and 256 are in flight: at CPython's defaults the collector walked them over and
    over, 40-47 µs per push (a sixth of the push process's CPU), and re-walked every
    module at each full collection. Garbage in cycles still goes, a few MB at most later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def quick_thread_handovers() -> None:
    """A thread woken with work (the batcher by a commit, the dispatcher by new pushes or
    replies) waits for the GIL while a busy thread (paho's, the pusher's loop) runs out
    its switch interval: 5 ms by default, paid at every hand-over on the way from
    publish to POST. At 1 ms the wait is shorter; the switches cost little."""
    sys.setswitchinterval(0.001)


def set_process_name(name: str) -> None:
    """The name `top`, `ps -o comm` and /proc/PID/comm show (Linux; at most 15 bytes)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME


def orphaned() -> None:
    """The MQTT process is gone: exit at once, leaving the rest to the database."""
    log.error("daemon.orphaned (the MQTT process is gone); exiting")
    os._exit(1)


# The processes' entry points. They import their job's modules only once started, so
# the MQTT process (which must name them) never loads sqlite3, httpx or the store.


def ingest_process(settings: Settings, pipe: Connection, wake: Connection, instance: str) -> None:
    from courierd.daemon.ingest import ingest_main

    ingest_main(settings, pipe, wake, instance)


def dispatch_process(
    settings: Settings, reports: Connection, control: Connection, wake: Connection, instance: str
) -> None:
    from courierd.daemon.dispatch import dispatch_main

    dispatch_main(settings, reports, control, wake, instance)


def web_process(
    settings: Settings,
    pipe: Connection,
    http_sockets: list[socket.socket],
    webhook_sockets: list[socket.socket],
) -> None:
    from courierd.daemon.web import web_main

    web_main(settings, pipe, http_sockets, webhook_sockets)


class WebLink:
    """The MQTT process's end of the link pipe: `run()`, on a thread of its own (the
    pipe's one writer), answers the HTTP process's questions; `stop()`."""

    def __init__(
        self,
        pipe: Connection,
        health: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        on_exit: Callable[[str], None],
    ) -> None:
        self.pipe, self.on_exit = pipe, on_exit
        self.answers: dict[str, Callable[[], Any]] = {"health": health, "metrics": metrics}
        self.ready = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if not self.pipe.poll(LINK_S):
                    continue
                kind, value = self.pipe.recv()
                if kind in self.answers:
                    self.pipe.send((kind, self.answers[kind]()))
                elif kind == "ready":
                    self.ready.set()
                elif kind == "fatal":
                    self.on_exit(str(value))
            self.pipe.send(("stop", None))
        except (EOFError, OSError):
            if not self._stopping.is_set():
                self.on_exit("http process exited")

    def stop(self) -> None:
        """The HTTP process is told to stop (by `run`'s thread, within LINK_S)."""
        self._stopping.set()
