"""The core process: the ingest writer and the dispatcher, beside (not under) paho.

paho parses MQTT packets in Python, and at full speed its network thread needs a whole
interpreter to itself: every other thread in its process costs it GIL time (measured:
the ingest and push threads in the same process cut the drain rate roughly in half).
So `courierd run` is two processes. The MQTT process keeps paho, batching, acks,
/healthz and /metrics; this one commits batches and delivers the outbox.

Protocol, over two pipes from the MQTT process:
- ingest pipe, request/reply: ("batch", [(topic, payload), ...]) → ("ok", BatchReport)
  or ("fatal", text); ("stop", None) ends the process after in-flight pushes.
- report pipe, one way: ("ready", None) once the store is open, then ("stats",
  DispatchStats) every REPORT_S, and ("fatal", text) if the dispatcher dies.
If the MQTT process disappears (kill -9), the pipe closes and this process exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

from courierd.config import Settings
from courierd.dispatch import Dispatcher
from courierd.errors import CourierdError
from courierd.ingest import commit_messages
from courierd.logs import setup_logging
from courierd.onetablet import OneTabletClient
from courierd.store import Store

log = logging.getLogger(__name__)

REPORT_S = 0.25


def core_main(settings: Settings, ingest: Connection, reports: Connection) -> None:
    """Entry point of the core process (multiprocessing, spawn)."""
    setup_logging(settings.log.level, settings.log.format)
    # The MQTT process decides when to stop and tells us over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None
    try:
        ingest_store = Store(settings.store.path, synchronous=settings.store.synchronous)
        # The dispatcher only marks pushes delivered: losing its last commits to a power
        # cut re-sends those pushes with the same Idempotency-Key, so it skips the fsync
        # that would otherwise hold the write lock against ingest.
        dispatch_store = Store(settings.store.path, synchronous="NORMAL")
    except CourierdError as e:
        reports.send(("fatal", str(e)))
        return
    client = OneTabletClient(
        ot.base_url,
        ot.api_key.get_secret_value(),
        transport=ot.transport,
        timeout=ot.timeout_s,
        max_connections=ot.max_concurrency,
    )
    dispatcher = Dispatcher(
        dispatch_store, client, concurrency=ot.max_concurrency, schedule=ot.retry_schedule_s
    )
    stop = threading.Event()
    send_lock = threading.Lock()

    def report(kind: str, value: object) -> None:
        with send_lock:
            try:
                reports.send((kind, value))
            except OSError:
                os._exit(1)  # the MQTT process is gone

    def run_dispatcher() -> None:
        try:
            dispatcher.run(stop)
        except BaseException as e:
            log.exception("core.dispatcher_failed")
            report("fatal", f"dispatcher: {e}")

    def run_reporter() -> None:
        while not stop.wait(REPORT_S):
            report("stats", dispatcher.report())

    threads = [
        threading.Thread(target=run_dispatcher, name="dispatch"),
        threading.Thread(target=run_reporter, name="reporter", daemon=True),
    ]
    for t in threads:
        t.start()
    report("ready", None)
    _serve_ingest(ingest, ingest_store, dispatcher)
    stop.set()
    dispatcher.wake()
    threads[0].join()
    report("stats", dispatcher.report())
    client.close()
    ingest_store.close()
    dispatch_store.close()


def _serve_ingest(ingest: Connection, store: Store, dispatcher: Dispatcher) -> None:
    """Commit batches until told to stop; a dead MQTT process ends us at once."""
    while True:
        try:
            kind, batch = ingest.recv()
        except (EOFError, OSError):
            log.error("core.orphaned (the MQTT process is gone); exiting")
            os._exit(1)
        if kind == "stop":
            return
        try:
            result = commit_messages(store, batch, time.time())
        except Exception as e:
            log.exception("core.ingest_failed")
            ingest.send(("fatal", f"database: {e}"))
            return
        ingest.send(("ok", result))
        if result.pushes:
            dispatcher.wake()
