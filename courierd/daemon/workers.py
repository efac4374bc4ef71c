"""The worker processes: the ingest writer and the dispatcher, beside (not under) paho.

paho parses MQTT packets in Python, and at full speed its network thread needs an
interpreter to itself: every other thread in its process costs it GIL time (measured:
the ingest and push threads in the same process cut the drain rate roughly in half).
The same holds one level down: sixteen push threads starve the ingest writer of the
GIL. So `courierd run` is three processes, each with one job:

- MQTT process (`service.py`): paho, batching, acks, /healthz, /metrics, supervision;
- ingest process (`ingest_main`): commits batches. Over its pipe, request/reply:
  ("batch", [(topic, payload), ...]) → ("ok", BatchReport) or ("fatal", text);
  ("stop", None) ends it. It announces itself with ("ready", None) and, after a
  commit that enqueued pushes, writes a byte on the wake pipe to the dispatcher;
- dispatch process (`dispatch_main`): delivers the outbox. On the report pipe it sends
  ("ready", None), then ("stats", DispatchStats) every REPORT_S, or ("fatal", text);
  on the control pipe it receives ("stop", None).

The database is the only state they share. If the MQTT process disappears (kill -9),
the pipes close and both workers exit at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from courierd.config import Settings
from courierd.errors import CourierdError
from courierd.logs import setup_logging

if TYPE_CHECKING:
    pass

# Each worker imports only what its job needs (see the imports inside the entry points):
# the MQTT process never loads sqlite or httpx, the ingest process never loads httpx.
log = logging.getLogger(__name__)

REPORT_S = 0.25


def _worker_setup(settings: Settings) -> None:
    setup_logging(settings.log.level, settings.log.format)
    # The MQTT process decides when to stop and tells us over a pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _orphaned() -> None:
    log.error("core.orphaned (the MQTT process is gone); exiting")
    os._exit(1)


def ingest_main(settings: Settings, ingest: Connection, wake: Connection) -> None:
    """Entry point of the ingest process: commit batches until told to stop."""
    from courierd.daemon.ingest import commit_messages
    from courierd.store.sqlite import Store

    _worker_setup(settings)
    try:
        store = Store(settings.store.path, synchronous=settings.store.synchronous)
    except CourierdError as e:
        ingest.send(("fatal", str(e)))
        return
    ingest.send(("ready", None))
    while True:
        try:
            kind, batch = ingest.recv()
        except (EOFError, OSError):
            _orphaned()
        if kind == "stop":
            break
        try:
            result = commit_messages(store, batch, time.time())
        except Exception as e:
            log.exception("core.ingest_failed")
            ingest.send(("fatal", f"database: {e}"))
            break
        ingest.send(("ok", result))
        if result.pushes:
            # If the dispatcher is gone, the MQTT process hears of it on its own pipe.
            with contextlib.suppress(OSError):
                wake.send_bytes(b"w")
    store.close()


def dispatch_main(
    settings: Settings, reports: Connection, control: Connection, wake: Connection
) -> None:
    """Entry point of the dispatch process: deliver the outbox until told to stop."""
    from courierd.daemon.dispatch import Dispatcher
    from courierd.edges.onetablet import OneTabletClient
    from courierd.store.sqlite import PendingCheck, Store

    _worker_setup(settings)
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None
    try:
        # Marking pushes delivered needs no fsync: losing the last marks to a power cut
        # re-sends those pushes with the same Idempotency-Key.
        store = Store(settings.store.path, synchronous="NORMAL")
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
        store,
        client,
        concurrency=ot.max_concurrency,
        schedule=ot.retry_schedule_s,
        still_pending=PendingCheck(settings.store.path),
    )
    stop = threading.Event()
    send_lock = threading.Lock()

    def report(kind: str, value: object) -> None:
        with send_lock:
            try:
                reports.send((kind, value))
            except OSError:
                _orphaned()

    def run_dispatcher() -> None:
        try:
            dispatcher.run(stop)
        except BaseException as e:
            log.exception("core.dispatcher_failed")
            report("fatal", f"dispatcher: {e}")

    def run_reporter() -> None:
        while not stop.wait(REPORT_S):
            report("stats", dispatcher.report())

    worker = threading.Thread(target=run_dispatcher, name="dispatch")
    worker.start()
    threading.Thread(target=run_reporter, name="reporter", daemon=True).start()
    report("ready", None)
    _listen(control, wake, dispatcher.wake)
    stop.set()
    dispatcher.wake()
    worker.join()
    report("stats", dispatcher.report())
    client.close()
    store.close()


def _listen(control: Connection, wake: Connection, on_wake: object) -> None:
    """Relay wake-ups from ingest to the dispatcher until the control pipe says stop."""
    assert callable(on_wake)
    channels: list[Connection] = [control, wake]
    while True:
        for ready in wait(channels):
            assert isinstance(ready, Connection)
            try:
                message = ready.recv_bytes() if ready is wake else ready.recv()
            except (EOFError, OSError):
                if ready is wake:  # the ingest process ended; keep serving the outbox
                    channels.remove(wake)
                    continue
                _orphaned()
            if ready is control and message[0] == "stop":
                return
            on_wake()
