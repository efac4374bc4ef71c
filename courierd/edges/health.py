"""The HTTP server on `http.listen`: `/healthz` and `/metrics` here, and, given the
settings, the dispatch API, its OpenAPI document and the operator page (api.py).

A small threaded server (one thread per connection, HTTP/1.0: one request each). It
reads a request body only by its Content-Length, at most 64 KiB, and gives up on a
client that stops sending for `Handler.timeout` seconds; every error, the server's own
ones (a malformed request line, oversized headers) included, is the API's JSON shape.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from courierd.config import HttpSettings, Settings
from courierd.edges.api import MAX_BODY, Api, ApiError, LiveStatus, Reply, error_reply
from courierd.errors import ConfigError

log = logging.getLogger(__name__)

HealthCheck = Callable[[], dict[str, Any]]
DRAIN_MAX = 1024 * 1024  # a body we do not take, up to this, is read anyway (no RST)
SOCKET_TIMEOUT_S = 5.0  # a client silent this long mid-request is answered and dropped


class HealthServer:
    """Serves health (200 when `check()` says ok, else 503) and Prometheus metrics, and,
    with `settings`, the dispatch API and the operator page (`live`: the daemon's
    health and dispatch stats, for the dashboard)."""

    def __init__(
        self,
        listen: str,
        check: HealthCheck,
        registry: CollectorRegistry,
        *,
        settings: Settings | None = None,
        live: LiveStatus | None = None,
    ) -> None:
        if settings is not None:
            check_exposure(settings.http)
        self.api = None if settings is None else Api(settings, live)
        host, _, port = listen.rpartition(":")
        try:
            self._server = ThreadingHTTPServer(
                (host.strip("[]"), int(port)), _handler(check, registry, self.api)
            )
        except OSError as e:
            raise ConfigError(
                f"invalid setting http.listen (COURIERD_HTTP__LISTEN): "
                f"cannot listen on {listen}: {e.strerror}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name="http",
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("http.listening port=%d api=%s", self.port, self.api is not None)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever on a server never started
            self._server.shutdown()
        self._server.server_close()
        if self.api is not None:
            self.api.close()


def check_exposure(http: HttpSettings) -> None:
    """Refuse to serve the API beyond this machine without a token (startup, exit 2)."""
    if not http.listen or http.token is not None:
        return
    host = http.listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"invalid setting http.listen (COURIERD_HTTP__LISTEN): {http.listen} is not a "
            "loopback address (127.0.0.0/8, ::1, localhost), so http.token "
            "(COURIERD_HTTP__TOKEN) must be set: the dispatch API would be open to anyone"
        )


def read_body(headers: Message, rfile: io.BufferedIOBase) -> bytes:
    """The request body by its Content-Length (none: empty), at most MAX_BODY bytes."""
    if headers.get("transfer-encoding") is not None:
        raise ApiError(411, "send the body with a Content-Length (chunked bodies are refused)")
    size = _length(headers)
    if size > MAX_BODY:
        if size <= DRAIN_MAX:
            _read(rfile, size)
        raise ApiError(413, f"the body is {size} bytes; at most {MAX_BODY} are accepted")
    return _read(rfile, size)


def _length(headers: Message) -> int:
    lengths = headers.get_all("content-length") or []
    if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,15}", (lengths or ["0"])[0].strip()):
        raise ApiError(400, "Content-Length must be one non-negative integer")
    return int(lengths[0]) if lengths else 0


def _read(rfile: io.BufferedIOBase, size: int) -> bytes:
    try:
        data = rfile.read(size)
    except OSError:  # the socket timed out: the client sent less than it announced
        data = b""
    if len(data) < size:
        raise ApiError(400, f"the body ended before its Content-Length ({size} bytes)")
    return data


def _drain(headers: Message, rfile: io.BufferedIOBase) -> None:
    """Read a body the reply did not need, so that closing does not reset the client."""
    with contextlib.suppress(ApiError, OSError):
        size = _length(headers)
        if 0 < size <= DRAIN_MAX and headers.get("transfer-encoding") is None:
            rfile.read(size)


def _handler(
    check: HealthCheck, registry: CollectorRegistry, api: Api | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "courierd"
        sys_version = ""
        timeout = SOCKET_TIMEOUT_S

        def do_GET(self) -> None:
            self._serve()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET
        do_TRACE = do_CONNECT = do_GET

        def _serve(self) -> None:
            path = self.path.partition("?")[0]
            if path in ("/healthz", "/metrics") and self.command not in ("GET", "HEAD"):
                reply = error_reply(405, "only GET here", (("allow", "GET, HEAD"),))
            elif path == "/healthz":
                report = check()
                status = 200 if report["status"] == "ok" else 503
                reply = Reply(status, json.dumps(report).encode(), "application/json", ())
            elif path == "/metrics":
                reply = Reply(200, generate_latest(registry), CONTENT_TYPE_LATEST, ())
            elif api is not None:
                taken = []

                def body() -> bytes:
                    taken.append(True)
                    return read_body(self.headers, self.rfile)

                reply = api.handle(self.command, self.path, self.headers, body)
                if not taken:
                    _drain(self.headers, self.rfile)
            else:
                reply = error_reply(404, f"no such endpoint: {path[:200]}")
            self._send(reply)

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            """http.server's own errors (malformed request, headers too large) as JSON."""
            self.close_connection = True
            self._send(error_reply(code, message or explain or "malformed request"))

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            self.send_header("content-type", reply.content_type)
            self.send_header("content-length", str(len(reply.body)))
            self.send_header("x-content-type-options", "nosniff")
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the log

    return Handler
