"""A small threaded HTTP/1.0 server answering JSON, for courierd's listeners.

One thread per connection, one request each. A request body is read only by its
Content-Length, at most MAX_BODY bytes; a client that stops sending for
SOCKET_TIMEOUT_S seconds is answered and dropped; every error, the server's own ones
(a malformed request line, oversized headers) included, has the `{error, message}`
shape. What a request means is the `Route` given: `http.listen` (health.py) and
`webhook.listen` (webhook.py) each have their own.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
from collections.abc import Callable
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from courierd.edges.api import MAX_BODY, ApiError, Reply, error_reply
from courierd.errors import ConfigError

log = logging.getLogger(__name__)

DRAIN_MAX = 1024 * 1024  # a body we do not take, up to this, is read anyway (no RST)
SOCKET_TIMEOUT_S = 5.0  # a client silent this long mid-request is answered and dropped

# (method, path with query, headers, the body on demand) → the reply
Route = Callable[[str, str, Message, Callable[[], bytes]], Reply]


class JsonServer:
    """`start()` serving `route` on `listen` ("host:port"); `stop()`. `setting` names the
    setting `listen` came from, for the error when the address cannot be had."""

    def __init__(self, listen: str, route: Route, *, setting: str, name: str) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), _handler(route))
        except OSError as e:
            env = "COURIERD_" + setting.upper().replace(".", "__")
            raise ConfigError(
                f"invalid setting {setting} ({env}): cannot listen on {listen}: {e.strerror}"
            ) from None
        self.name = name
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=name,
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("%s.listening port=%d", self.name, self.port)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever on a server never started
            self._server.shutdown()
        self._server.server_close()


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


def _handler(route: Route) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "courierd"
        sys_version = ""
        timeout = SOCKET_TIMEOUT_S

        def do_GET(self) -> None:
            taken = []

            def body() -> bytes:
                taken.append(True)
                return read_body(self.headers, self.rfile)

            try:
                reply = route(self.command, self.path, self.headers, body)
            except ApiError as e:
                reply = error_reply(e.status, e.message, e.headers)
            if not taken:
                _drain(self.headers, self.rfile)
            self._send(reply)

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET
        do_TRACE = do_CONNECT = do_GET

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
            pass  # the callers log what matters; scrapes would drown the log

    return Handler
