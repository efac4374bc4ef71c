"""The HTTP process (courierd-http): every listener, off the ingest path.

It serves `http.listen` (health, metrics, the dispatch API and the operator page) and
`webhook.listen` on one event loop (edges/http.py), on sockets the MQTT process bound.
Nothing here decodes MQTT, so the page and dispatch tools cannot slow ingest. What
only the MQTT process knows comes over the link pipe (ipc.py), when asked: its health
report (for /healthz and the dashboard) and the Prometheus text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from multiprocessing.connection import Connection
from typing import Any

from courierd.config import Settings
from courierd.daemon.ipc import orphaned, worker_setup
from courierd.edges.health import http_listener
from courierd.edges.http import ApiError, HttpServer, Listener
from courierd.edges.webhook import Webhook

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 5.0
FRESH_S = 0.02
NICE = 5  # added to this process's niceness


class Link:
    """The MQTT process's side, as this process sees it: its health report and the
    Prometheus text, each asked for when needed. One question of each kind at a time:
    callers meanwhile share its answer, and a health report younger than FRESH_S is
    served again, so a flood of /healthz costs the MQTT process at most 1/FRESH_S
    reports a second."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.report: dict[str, Any] | None = None
        self.reported = 0.0  # loop time of `report`
        self._asked: dict[str, asyncio.Future[Any]] = {}  # touched on the loop only

    async def health(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self.report is not None and loop.time() - self.reported < FRESH_S:
            return self.report
        try:
            report: dict[str, Any] = await self._ask("health")
        except ApiError:
            reason = f"daemon: the MQTT process did not answer in {ANSWER_TIMEOUT_S:.0f}s"
            last = self.report or {"reasons": []}
            return {**last, "status": "error", "reasons": [*last["reasons"], reason]}
        self.report, self.reported = report, loop.time()
        return report

    async def metrics(self) -> bytes:
        text: bytes = await self._ask("metrics")
        return text

    async def _ask(self, kind: str) -> Any:
        asked = self._asked.get(kind)
        if asked is None or asked.done():
            asked = self._asked[kind] = asyncio.get_running_loop().create_future()
            self.pipe.send((kind, None))
        try:
            return await asyncio.wait_for(asyncio.shield(asked), ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(503, f"the MQTT process did not give its {kind} in time") from None

    def answered(self, kind: str, value: Any) -> None:
        """On the loop: an answer came."""
        asked = self._asked.get(kind)
        if asked is not None and not asked.done():
            asked.set_result(value)


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
    link = Link(pipe)
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
        if kind in ("health", "metrics"):
            loop.call_soon_threadsafe(link.answered, kind, value)
        elif kind == "stop":
            return


def _more_files() -> None:
    """Room for MAX_CONNECTIONS per listener under a soft limit of 1024 open files."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
