"""The HTTP process (courierd-http): every listener, off the ingest path.

It serves `http.listen` (health, metrics, the dispatch API and the operator page) and
`webhook.listen` on one event loop (edges/http.py), on sockets the MQTT process bound.
Nothing here decodes MQTT, so the page and dispatch tools cannot slow ingest. What
only the MQTT process knows comes over the link pipe (ipc.py): its health report every
LINK_S, and the Prometheus text when /metrics asks for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from courierd.config import Settings
from courierd.daemon.ipc import orphaned, worker_setup
from courierd.edges.health import http_listener
from courierd.edges.http import ApiError, HttpServer, Listener
from courierd.edges.webhook import Webhook

log = logging.getLogger(__name__)

METRICS_TIMEOUT_S = 5.0
NICE = 5  # added to this process's niceness


class Link:
    """The MQTT process's side, as this process sees it: the latest health report, and
    the Prometheus text on request (one request at a time; callers share its answer)."""

    def __init__(self, pipe: Connection, stale_after_s: float) -> None:
        self.pipe = pipe
        self.stale_after_s = stale_after_s
        self.report: dict[str, Any] | None = None
        self.received = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._metrics: asyncio.Future[bytes] | None = None  # touched on the loop only

    def health(self) -> dict[str, Any]:
        report, age = self.report, time.monotonic() - self.received
        if report is None:
            return {"status": "error", "reasons": ["starting"]}
        if age > self.stale_after_s:
            reason = f"daemon: no health report from the MQTT process for {age:.0f}s"
            return {**report, "status": "error", "reasons": [*report["reasons"], reason]}
        return report

    async def metrics(self) -> bytes:
        if self._metrics is None or self._metrics.done():
            self._metrics = asyncio.get_running_loop().create_future()
            self.pipe.send(("metrics", None))
        try:
            return await asyncio.wait_for(asyncio.shield(self._metrics), METRICS_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(503, "the MQTT process did not give its metrics in time") from None

    def answered(self, text: bytes) -> None:
        """On the loop: the metrics came."""
        if self._metrics is not None and not self._metrics.done():
            self._metrics.set_result(text)


def web_main(
    settings: Settings,
    pipe: Connection,
    http_sockets: list[socket.socket],
    webhook_sockets: list[socket.socket],
) -> None:
    worker_setup(settings, "courierd-http")
    # Behind ingest and pushes when the cores are busy: on two cores, a dashboard read
    # costs CPU that would otherwise go to them, whichever process spends it.
    with contextlib.suppress(OSError):  # the unit's SystemCallFilter (~@resources) says no
        os.nice(NICE)
    _more_files()
    link = Link(pipe, settings.daemon.stall_after_s)
    listeners: list[Listener] = []
    sockets: list[list[socket.socket]] = []
    api = webhook = None
    if http_sockets:
        listener, api = http_listener(settings, link.health, link.metrics)
        listeners.append(listener)
        sockets.append(http_sockets)
    if webhook_sockets:
        webhook = Webhook(settings)
        listeners.append(webhook.listener())
        sockets.append(webhook_sockets)
    server = HttpServer(listeners, sockets)
    link.loop = server.loop
    try:
        server.start()
    except Exception as e:
        log.exception("http.start_failed")
        pipe.send(("fatal", f"http process: {e!r}"))
        return
    pipe.send(("ready", None))
    try:
        _serve_link(link, server.loop)
    finally:
        server.stop()
        for closing in (api, webhook):
            if closing is not None:
                closing.close()


def _serve_link(link: Link, loop: asyncio.AbstractEventLoop) -> None:
    """Until ("stop", None): health reports in, metrics answers to the loop."""
    while True:
        try:
            kind, value = link.pipe.recv()
        except (EOFError, OSError):
            orphaned()
            return
        if kind == "health":
            link.report, link.received = value, time.monotonic()
        elif kind == "metrics":
            loop.call_soon_threadsafe(link.answered, value)
        elif kind == "stop":
            return


def _more_files() -> None:
    """Room for MAX_CONNECTIONS per listener under a soft limit of 1024 open files."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
