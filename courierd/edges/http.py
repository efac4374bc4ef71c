"""courierd's HTTP listeners, on aiohttp's server (README "Dependencies" says why).

What every listener gets here, whatever it serves (CONTRACT.md 6.1):

- `Host` must be a name the listener is meant for (loopback names, its listen address,
  its `allowed_hosts`); any other gets 421 and no data. A request without `Host`
  (HTTP/1.0) passes: browsers, and so DNS rebinding, always send one;
- a request, headers and body, must arrive whole within `deadline_s` (10 s) of the
  connection being ready for it (opened, or its last reply written); else the
  connection is cut (408 if part of a request came). An idle keep-alive connection is
  closed the same way;
- bodies up to MAX_BODY (64 KiB), by Content-Length (chunked bodies: 411; more: 413);
- at most MAX_CONNECTIONS connections per listener. At the cap, a new connection
  pushes out the oldest one that has no request being answered, so slow or idle
  clients cannot keep others out for longer than it takes to open as many again;
- every error, aiohttp's own (a malformed request line, oversized headers) included,
  has the `{error, message}` shape.

What a request means is the `Handler` given: health.py, api.py and webhook.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from multidict import CIMultiDictProxy

from courierd.edges.listen import allowed_names, bind, host_of

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # request bodies, order documents included
MAX_CONNECTIONS = 400  # per listener; 300 slow clients leave room (CONTRACT.md 6.1)
JSON_TYPE = "application/json"
NO_STORE = (("cache-control", "no-store"),)
KINDS = {  # status → the `error` of the error shape
    **{400: "BadRequest", 401: "Unauthorized", 403: "WritesDisabled", 404: "NotFound"},
    **{405: "MethodNotAllowed", 408: "RequestTimeout", 409: "Conflict"},
    **{411: "LengthRequired", 413: "PayloadTooLarge", 414: "URITooLong"},
    **{421: "MisdirectedRequest", 431: "HeadersTooLarge", 500: "InternalError"},
    **{501: "NotImplemented", 502: "OneTabletError", 503: "DatabaseUnavailable"},
}


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = NO_STORE


class ApiError(Exception):
    """An error reply: the status, a readable message, and any headers it needs."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        kind: str = "",
    ):
        super().__init__(message)
        self.status, self.message, self.headers, self.kind = status, message, headers, kind


def error_reply(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (), kind: str = ""
) -> Reply:
    body = {"error": kind or KINDS.get(status, "Error"), "message": message}
    return Reply(status, json.dumps(body).encode(), JSON_TYPE, (*NO_STORE, *headers))


def json_reply(doc: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(doc).encode())  # ASCII: a stray surrogate stays escaped


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as it arrived whole: the target as sent (path and query, not decoded)."""

    method: str
    target: str
    headers: CIMultiDictProxy[str]
    raw_headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


Handler = Callable[[Incoming], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening address and what it serves. `setting` names the setting `listen`
    came from, for the errors about it."""

    listen: str
    handler: Handler
    setting: str
    allowed_hosts: Iterable[str] = ()
    deadline_s: float = 10.0


class Guard:
    """The connections of one listener: their deadlines, and the cap."""

    def __init__(self, deadline_s: float, allowed: frozenset[str]) -> None:
        self.deadline_s = deadline_s
        self.allowed = allowed
        # connection → when it must have its next request in (None: one is being answered)
        self.waiting: dict[GuardedHandler, float | None] = {}

    def admit(self, new: GuardedHandler) -> bool:
        """Room for `new`: at the cap, the connection waiting longest goes."""
        if len(self.waiting) >= MAX_CONNECTIONS:
            idle = [(t, c) for c, t in self.waiting.items() if t is not None]
            if not idle:
                return False
            min(idle, key=lambda pair: pair[0])[1].cut()
        return True


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection handler, with the deadline, the cap and JSON errors."""

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.partial = False  # bytes of a request came since it was last made ready
        self.timer: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(self):
            self.refused = True
            transport.close()
            return
        super().connection_made(transport)
        self.ready()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.refused:
            return
        self.guard.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.partial = True
        super().data_received(data)

    def ready(self) -> None:
        """Ready for the next request: it must arrive whole by the deadline."""
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        due = loop.time() + self.guard.deadline_s
        self.guard.waiting[self] = due
        self.partial = False
        self.timer = loop.call_at(due, self.cut)

    def answering(self) -> float:
        """A request's headers are in: the time left for its body."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        due = self.guard.waiting.get(self)
        self.guard.waiting[self] = None
        return max(0.0, (due or 0.0) - asyncio.get_running_loop().time())

    def cut(self) -> None:
        """The deadline passed (or the cap needs the room) before a request came whole."""
        self.timer = None
        self.guard.waiting.pop(self, None)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.partial:  # nothing of a reply was written: the request is not whole
            body = json.dumps(
                {"error": "RequestTimeout", "message": "the request did not arrive in time"}
            ).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            transport.write(head.encode() + body)
        self.force_close()
        transport.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors (a request it could not parse) in the error shape."""
        if status == 400 and isinstance(exc, LineTooLong):
            status, message = 431, "a header or the request line is too long"
        elif status == 400 and "too many headers" in (message or "").lower():
            status = 431
        reply = error_reply(status, message or "malformed request")
        response = to_response(reply)
        response.force_close()
        return response


def to_response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))
    response.content_type = reply.content_type.partition(";")[0]
    if "charset=" in reply.content_type:
        response.charset = reply.content_type.partition("charset=")[2]
    response.headers["x-content-type-options"] = "nosniff"
    return response


def _entry(listener: Listener, guard: Guard) -> Callable[[web.BaseRequest], Awaitable[Any]]:
    """The one aiohttp handler of a listener: Host, then the body, then `handler`."""

    async def entry(request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        left = connection.answering() if isinstance(connection, GuardedHandler) else 0.0
        try:
            reply = await _answer(request, listener, guard, left)
        except ApiError as e:
            reply = error_reply(e.status, e.message, e.headers, e.kind)
        except Exception:
            log.exception("http.error method=%s path=%r", request.method, request.raw_path[:200])
            reply = error_reply(500, "courierd failed to answer this request (see its log)")
        response = to_response(reply)
        if reply.status in (408, 411, 413, 421):
            response.force_close()  # whatever of a body is left is not read
        if isinstance(connection, GuardedHandler):
            connection.ready()  # the next request's deadline (and this reply's) starts now
        return response

    return entry


async def _answer(request: web.BaseRequest, listener: Listener, guard: Guard, left: float) -> Reply:
    host = request.headers.get("host")
    if host is not None and host_of(host) not in guard.allowed:
        raise ApiError(
            421,
            "this server does not answer to that Host name; add it to "
            f"{listener.setting.rpartition('.')[0]}.allowed_hosts if it is meant to",
        )
    if request.headers.get("transfer-encoding") is not None:
        raise ApiError(411, "send the body with a Content-Length (chunked bodies are refused)")
    size = request.content_length or 0
    if size > MAX_BODY:
        raise ApiError(413, f"the body is {size} bytes; at most {MAX_BODY} are accepted")
    body = b""
    if size:
        try:
            async with asyncio.timeout(left):
                body = await request.content.readexactly(size)
        except TimeoutError:
            raise ApiError(408, "the request did not arrive in time") from None
        except asyncio.IncompleteReadError:
            raise ApiError(
                400, f"the body ended before its Content-Length ({size} bytes)"
            ) from None
    raw = tuple(request.raw_headers)
    incoming = Incoming(request.method, request.raw_path, request.headers, raw, body)
    return await listener.handler(incoming)


class HttpServer:
    """Serves `listeners` on an event loop of its own thread: `start()`, `stop()`.
    `sockets` (from `bind`) may be given, one list per listener; else they are bound."""

    def __init__(
        self, listeners: list[Listener], sockets: list[list[socket.socket]] | None = None
    ) -> None:
        self.listeners = listeners
        self.sockets = sockets or [bind(x.listen, x.setting) for x in listeners]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)
        self._web: list[web.Server] = []
        self._servers: list[asyncio.Server] = []

    @property
    def port(self) -> int:
        """The first listener's port (tests bind port 0)."""
        return int(self.sockets[0][0].getsockname()[1])

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        for listener, socks in zip(self.listeners, self.sockets, strict=True):
            log.info("http.listening listen=%s port=%d", listener.listen, socks[0].getsockname()[1])

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener, socks in zip(self.listeners, self.sockets, strict=True):
            names = allowed_names(listener.listen, listener.allowed_hosts)
            guard = Guard(listener.deadline_s, names)
            server = web.Server(_entry(listener, guard), handler_cancellation=True)
            self._web.append(server)

            def factory(server: web.Server = server, guard: Guard = guard) -> GuardedHandler:
                return GuardedHandler(
                    server,
                    guard,
                    loop=loop,
                    access_log=None,
                    keepalive_timeout=3600,  # the guard's deadline closes idle ones first
                    lingering_time=0,
                )

            for sock in socks:
                self._servers.append(await loop.create_server(factory, sock=sock))

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        for socks in self.sockets:
            for sock in socks:
                sock.close()
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()  # its self-pipe and executor (else left to the garbage collector)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for web_server in self._web:
            await web_server.shutdown(2.0)
