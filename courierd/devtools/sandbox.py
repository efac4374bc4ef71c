"""A local stand-in for OneTablet on loopback: for tests, the benchmark and the demo.

It serves the three REST endpoints and `POST /webhooks`, checks `x-api-key`, validates
bodies the way the API text describes (400/401 with `{error, message}`), keeps a log
of every request, and can inject faults (a share of 500s, 429 with Retry-After,
latency, an outage window). `GET /` is a small read-only page of the calls per order;
`GET /requests[?since=N]` is the same log as JSON (from entry N on), and
`GET /requests/count` its length. courierd says where each delivery status came from
(the courier's app, its geofence, or filled in for a skipped one) in the header
`x-courierd-source`; the page labels each call with it and the log has it as `source`.
Tests may also install a `responder` that answers in place of the normal logic, to
script exact sequences of replies.

It is a small HTTP/1.1 server on asyncio streams, on an event loop of its own thread: a
request in flight (held by `latency_ms`, say) is a coroutine, not a thread. It reads and
writes header bytes as latin-1, as `http.server` did, so a responder can send any byte a
real server might (a redirect's Location, say). Only a responder runs on a thread, one
per call, since a test's responder may block until the test lets it go.

The usual request, a well-formed keep-alive POST that is answered at once (no latency, no
responder), is answered where its bytes arrive (`_Connection.data_received`), without
waking the connection's coroutine; anything else goes to that coroutine, which reads it
as before. The bench runs this process on courierd's cores, so its cost per push shows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import http
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from courierd.domain.model import CANCEL_REASONS, Status

WEBHOOK_TYPES = {"order.submit", "order.cancel", "order.delivery_status"}
SOURCES = ("app", "geofence", "fill")  # the values of x-courierd-source the page colours
_STATUSES = {s.value for s in Status}
_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}  # as http.server says them


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the sandbox received it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def order_id(self) -> str | None:
        parts = self.path.split("/")
        if len(parts) >= 3 and parts[1] == "orders":
            return unquote(parts[2])
        try:
            doc = self.json if self.body[:1] == b"{" else None
        except (ValueError, RecursionError):  # a refused body: not JSON, or too deep
            return None
        if isinstance(doc, dict):  # a refused body's id may be anything: a string only
            order_id = doc.get("order_id") or doc.get("id")
            return order_id if isinstance(order_id, str) else None
        return None

    @property
    def source(self) -> str | None:
        """Where courierd says a delivery status came from: app, geofence or fill."""
        return self.headers.get("x-courierd-source")


@dataclass(slots=True)
class Faults:
    """Fault injection; fields may be changed while the sandbox runs."""

    error_rate: float = 0.0  # share of requests answered 500
    throttle_rate: float = 0.0  # share answered 429 with Retry-After
    retry_after_s: int = 1
    latency_ms: float = 0.0
    outage: tuple[float, float] | None = None  # (start, end) seconds after start: 503
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


Reply = tuple[int, dict[str, str], Any]
Responder = Callable[[Request], Reply | None]

# courierd opens hundreds of connections at once; a small backlog would drop most of
# their SYNs, and the client would retry them a second later.
BACKLOG = 1024

# Malformed requests are answered and the connection closed, as http.server did: a head
# over the reader's limit (64 KiB) 414 or 431, more than MAX_HEADERS header lines 431.
# Bodies are read whole, so one over MAX_BODY_BYTES is refused (413) before it is read.
MAX_HEADERS = 100  # as http.server
MAX_BODY_BYTES = 1 << 20
LINGER_S, LINGER_BYTES = 2.0, 16 << 20  # what a refused request's rest may cost
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")
_LATER_VERSION = re.compile(r"HTTP/([2-9]|[1-9][0-9]+)\.[0-9]+")
_DIGITS = re.compile(r"[0-9]+")  # a content-length (RFC 9110 8.6: 1*DIGIT)


class Sandbox:
    """An HTTP server on an event loop of its own thread; `start()` it, read `url`, `stop()` it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "sandbox-key",
        faults: Faults | None = None,
    ) -> None:
        self.api_key = api_key
        self.faults = faults or Faults()
        self.responder: Responder | None = None
        self._requests: list[Request] = []
        self._cond = threading.Condition()
        self._waiting = 0  # threads in wait_for: only they need a request's notify
        self.quick_answers = 0  # POSTs answered where they arrived (see _Connection)
        self._started = time.monotonic()
        self._sock = socket.create_server((host, port), backlog=BACKLOG)  # OSError if taken
        self._address = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://{host!s}:{port}"

    def start(self) -> Sandbox:
        self._started = time.monotonic()
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection; replies still in flight are dropped."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
        self._sock.close()

    async def _open(self) -> None:
        # create_server listens again, with its own backlog (100) unless told.
        self._server = await self._loop.create_server(
            lambda: _Connection(self), sock=self._sock, backlog=BACKLOG
        )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:  # the connections, and replies waiting on latency or a responder
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(
        self, reader: _Reader, writer: asyncio.StreamWriter, protocol: _Connection
    ) -> None:
        """One client's requests, one after the other (HTTP/1.1 keep-alive), until it closes;
        between them, its protocol answers what it can at once (see _Connection)."""
        try:
            while True:
                # Every reply so far is written: the connection may answer the next
                # request itself, unless part of it is already here, waiting in the reader.
                protocol.idle = reader.empty()
                try:
                    request = await _read_request(reader)
                except _Refused as refused:  # malformed: answered as http.server did, closed
                    await _refuse(reader, writer, refused.status, refused.message)
                    break
                if request is None:
                    break
                method, target, version, headers, body = request
                if method not in ("GET", "POST"):  # as http.server: 501, then the connection closes
                    await _refuse(reader, writer, 501, f"Unsupported method ({method!r})")
                    break
                # The target as sent: percent-encoded, with its query.
                if method == "POST":
                    reply = await self._answer(method, target, headers, body)
                else:  # off the loop: a long log's page would hold up every POST meanwhile
                    reply = await asyncio.to_thread(self._get, target)
                writer.write(_wire(reply))
                await writer.drain()
                connection = headers.get("connection", "").lower()
                if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left before its reply, or stop() ended the connection
        finally:
            protocol.idle = False
            writer.close()

    def _get(self, target: str) -> Reply:
        path, _, query = target.partition("?")
        if path == "/requests":
            since = int(query[6:]) if query.startswith("since=") and query[6:].isdigit() else 0
            return 200, {}, self.log(since)
        if path == "/requests/count":
            return 200, {}, {"count": len(self.requests())}
        if path == "/":
            return 200, {"content-type": "text/html; charset=utf-8"}, self.page()
        return _error(404, "Not Found", target)

    def requests(self) -> list[Request]:
        with self._cond:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float = 10.0) -> bool:
        """Block until `predicate(requests)` holds or the timeout passes; returns which."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while not predicate(self._requests):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self._waiting -= 1

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """Decide the reply to one request (faults, auth, validation), and log it: what
        the server does with a POST, without the HTTP (on the server's loop: start first)."""
        if not self._thread.is_alive():  # else it would wait for a loop that never runs
            raise RuntimeError("the sandbox is not running: start() it first")
        reply = asyncio.run_coroutine_threadsafe(
            self._answer(method, path, headers, body), self._loop
        ).result()
        return (200, {}, {"ok": True}) if reply is _OK else reply  # not the shared one

    async def _answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        at = time.time()
        responder = self.responder
        reply = None
        if responder:
            reply = await _in_thread(responder, Request(method, path, headers, body, 0, at))
        if reply is None:
            if self.faults.latency_ms:
                await asyncio.sleep(self.faults.latency_ms / 1000)
            reply = self._faulted() or self._normal(method, path, headers, body)
        self._log(Request(method, path, headers, body, reply[0], at))
        return reply

    def answers_at_once(self) -> bool:
        """Whether a POST is answered as it arrives: no responder to ask, no latency."""
        return self.responder is None and not self.faults.latency_ms

    def _answer_at_once(self, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """A POST's reply on the wire when `answers_at_once()`: `_answer` without a coroutine."""
        at = time.time()
        reply = self._faulted() or self._normal("POST", path, headers, body)
        # On the wire before it is logged: a request whose answer raises goes to the
        # connection's coroutine (`_Connection._answer_at_once`), which logs it itself.
        wire = _wire(reply)
        self._log(Request("POST", path, headers, body, reply[0], at))
        self.quick_answers += 1
        return wire

    def _log(self, request: Request) -> None:
        with self._cond:
            self._requests.append(request)
            if self._waiting:
                self._cond.notify_all()

    def _faulted(self) -> Reply | None:
        f = self.faults
        if f.outage and f.outage[0] <= time.monotonic() - self._started < f.outage[1]:
            return _error(503, "Service Unavailable", "outage (sandbox fault injection)")
        roll = f.rng.random()
        if roll < f.error_rate:
            return _error(500, "Internal Server Error", "injected failure")
        if roll < f.error_rate + f.throttle_rate:
            status, headers, body = _error(429, "Too Many Requests", "slow down")
            return status, {**headers, "Retry-After": str(f.retry_after_s)}, body
        return None

    def _normal(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if method != "POST":
            return _error(405, "Method Not Allowed", "only POST is served")
        if headers.get("x-api-key") != self.api_key:
            return _error(401, "Unauthorized", "invalid or missing x-api-key")
        try:
            doc = _json(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep to read
            return _error(400, "Bad Request", "body is not JSON")
        if not isinstance(doc, dict):
            return _error(400, "Bad Request", "body must be a JSON object")
        parts = path.split("/")
        if path == "/webhooks":
            kind = (
                (doc.get("event") or {}).get("type") if isinstance(doc.get("event"), dict) else None
            )
            if not isinstance(kind, str) or kind not in WEBHOOK_TYPES:  # a list is unhashable
                return _error(400, "Bad Request", "event.type must name an operation")
            problem = _check(kind, doc)
        elif path == "/orders":
            problem = _check("order.submit", doc)
        elif len(parts) == 4 and parts[1] == "orders" and parts[3] == "cancel":
            problem = _check("order.cancel", doc)
        elif len(parts) == 4 and parts[1] == "orders" and parts[3] == "delivery-status":
            problem = _check("order.delivery_status", doc)
        else:
            return _error(404, "Not Found", f"no endpoint {path}")
        if problem:
            return _error(400, "Bad Request", problem)
        return _OK

    def log(self, since: int = 0) -> list[dict[str, Any]]:
        """The request log from entry `since` on, as `GET /requests` serves it."""
        return [
            {
                "method": r.method,
                "path": r.path,
                "status": r.status,
                "at": r.at,
                "order_id": r.order_id,
                "body": r.body.decode(errors="replace"),
                "idempotency_key": r.headers.get("idempotency-key"),
                "source": r.source,
            }
            for r in self.requests()[since:]
        ]

    def page(self) -> str:
        """The request-log dashboard: calls grouped by order, each labelled with its source."""
        by_order: dict[str, list[Request]] = {}
        for r in self.requests():
            by_order.setdefault(r.order_id or "-", []).append(r)
        rows = []
        for order_id, calls in sorted(by_order.items()):
            cells = "".join(
                f"<li>{time.strftime('%H:%M:%S', time.localtime(c.at))} {_label(c.source)}"
                f"{html.escape(c.path)} &rarr; {c.status} "
                f"<code>{html.escape(c.body.decode(errors='replace')[:200])}</code></li>"
                for c in calls
            )
            rows.append(f"<tr><td>{html.escape(order_id)}</td><td><ul>{cells}</ul></td></tr>")
        return (
            "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=2>"
            "<title>OneTablet sandbox</title><style>.src{font:bold 11px sans-serif;"
            "padding:1px 5px;border-radius:3px;background:#ddd}.src-app{background:#d4f0d4}"
            ".src-geofence{background:#cfe2ff}.src-fill{background:#eee;color:#777}</style>"
            "<h1>OneTablet sandbox: requests by order</h1>"
            "<p>Delivery statuses are labelled with their source: <span class='src src-app'>app"
            "</span> the courier's app sent it, <span class='src src-geofence'>geofence</span> "
            "courierd inferred it from location fixes, <span class='src src-fill'>fill</span> "
            "filled in for a status that was skipped.</p>"
            f"<table border=1><tr><th>order</th><th>calls</th></tr>{''.join(rows)}</table>"
        )


_DECODER = json.JSONDecoder()


def _json(body: bytes) -> Any:
    """json.loads(body), the usual body (a UTF-8 object, nothing around it) in one step:
    json.loads spends about two thirds of its time on a small body finding its encoding
    and the whitespace around it."""
    # json.detect_encoding takes a body starting "{" for UTF-8 unless a 0 byte follows,
    # which no JSON read from here whole has (a UTF-16 or -32 one goes to json.loads).
    if body[:1] == b"{":
        try:
            text = body.decode("utf-8", "surrogatepass")  # as json.loads decodes it
            doc, end = _DECODER.raw_decode(text)
        except ValueError:
            pass  # json.loads raises its own error below
        else:
            if end == len(text):
                return doc
    return json.loads(body)


def _label(source: str | None) -> str:
    """A small coloured label for a call's x-courierd-source (nothing when it has none)."""
    if source is None:
        return ""
    kind = source if source in SOURCES else "other"
    return f"<span class='src src-{kind}'>{html.escape(source)}</span> "


def _check(kind: str, doc: dict[str, Any]) -> str | None:
    """What OneTablet would refuse in a body, or None."""
    if kind == "order.submit":
        if not isinstance(doc.get("id"), str) or not doc["id"]:
            return "missing order id"
    elif kind == "order.cancel":
        reason = doc.get("cancel_reason", "OTHER")
        if reason not in CANCEL_REASONS:
            return f"cancel_reason must be one of {sorted(CANCEL_REASONS)}"
    elif kind == "order.delivery_status":
        status = doc.get("delivery_status")
        if not isinstance(status, str) or status not in _STATUSES:  # a list is unhashable
            return "delivery_status is missing or not a known status"
        info = doc.get("courier_info")
        if info is not None and not isinstance(info, dict):
            return "courier_info must be an object"
        if isinstance(info, dict) and any(v is None for v in info.values()):
            return "courier_info fields must not be null"
    return None


def _error(status: int, error: str, message: str) -> Reply:
    return status, {}, {"error": error, "message": message}


class _Refused(Exception):
    """A request the sandbox will not read: answered `status` (with `message`), then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


class _Reader(asyncio.StreamReader):
    def empty(self) -> bool:
        """Whether no byte is waiting to be read (the stream's buffer is not public)."""
        return not self._buffer  # type: ignore[attr-defined]


class _Connection(asyncio.StreamReaderProtocol):
    """One client's connection. While its coroutine (`Sandbox._connection`) waits for a
    request with nothing buffered (`idle`), the requests that arrive whole and can be
    answered at once (`_quick_request`, `Sandbox.answers_at_once`) are answered here, in
    order, without waking it; the first byte of any other request, and everything after
    it, goes to the coroutine's reader, to be read and answered (or refused) as before,
    until the coroutine is idle again. So replies keep their requests' order."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self.idle = False
        self._writing_paused = False
        self._out: asyncio.Transport | None = None
        self._reader = _Reader(loop=sandbox._loop)  # its limit (64 KiB) bounds a head
        super().__init__(self._reader, self._serve, loop=sandbox._loop)

    def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Coroutine[Any, Any, None]:
        return self._sandbox._connection(self._reader, writer, self)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            data = self._answer_at_once(data)
            if not data:
                return
            self.idle = False
        super().data_received(data)

    def _answer_at_once(self, data: bytes) -> bytes:
        """Answer the whole requests at the start of `data` that can be answered at once;
        the rest of `data`, from the first that cannot, is returned. A request whose
        answer raises (a bug: `_answer` raised in the coroutine before) is returned too,
        so the coroutine meets it as before instead of the transport aborting the
        connection with the replies before it unsent."""
        sandbox, out, start = self._sandbox, self._out, 0
        while (
            out is not None
            and start < len(data)
            and not self._writing_paused
            and not out.is_closing()  # as the coroutine stops at a failed drain()
            and sandbox.answers_at_once()
        ):
            request = _quick_request(data, start)
            if request is None:
                break
            path, headers, body, end = request
            try:
                reply = sandbox._answer_at_once(path, headers, body)
            except Exception:
                break
            out.write(reply)
            start = end
        return data[start:] if start else data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._out = transport if isinstance(transport, asyncio.Transport) else None
        super().connection_made(transport)

    def pause_writing(self) -> None:  # the client is not reading its replies: wait, as drain did
        self._writing_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        super().resume_writing()


QUICK_HEAD_BYTES = 8192  # a longer head goes to the coroutine, to be read as before


def _quick_request(data: bytes, start: int) -> tuple[str, dict[str, str], bytes, int] | None:
    """The well-formed keep-alive `POST ... HTTP/1.1` that starts at `data[start]`, whole:
    (target, headers, body, where the next request starts), the target and headers as
    `_read_request` reads them. None for anything else (not whole, another method or
    version, `connection: close`, any framing `_read_request` would refuse or look at
    twice): that goes to `_read_request`."""
    end = data.find(b"\r\n\r\n", start, start + QUICK_HEAD_BYTES)
    if end < 0:
        return None
    request_line, *lines = data[start:end].decode("latin-1").split("\r\n")
    words = request_line.split(" ")  # as _read_request splits it: exactly three words
    if len(words) != 3 or words[0] != "POST" or words[2] != "HTTP/1.1":
        return None
    target = words[1]
    if len(lines) > MAX_HEADERS:
        return None
    headers = {}
    length = None
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            return None
        key = name.strip().lower()
        if key == "content-length":
            if length is not None:  # a second line: _content_length compares them
                return None
            length = value.strip(" \t")
        headers[key] = value.strip()
    if "transfer-encoding" in headers or headers.get("connection", "").lower() == "close":
        return None
    size = 0
    if length is not None:
        if not (length.isdigit() and length.isascii() and len(length) <= 7):
            return None
        size = int(length)
        if size > MAX_BODY_BYTES:
            return None
    begin = end + 4
    if len(data) < begin + size:
        return None
    return target, headers, data[begin : begin + size], begin + size


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, str, dict[str, str], bytes] | None:
    """The next request on a connection: method, target, version, headers (names in lower
    case, decoded as latin-1) and body; None when the client closed. A malformed request
    raises _Refused with the status `http.server` answered it (400, 414, 431, 505), or
    411 (a body without a length: chunked is not read) or 413 (over MAX_BODY_BYTES)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:  # closed, maybe half-way through a head
        if e.partial.strip():
            raise _Refused(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError as e:  # the head is over the reader's limit (64 KiB)
        seen = await reader.read(e.consumed)
        if b"\r\n" not in seen:
            raise _Refused(414, "request line too long") from None
        raise _Refused(431, "request header fields too large") from None
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _Refused(400, f"bad request syntax ({request_line!r})") from None
    if version not in _VERSIONS:
        if _LATER_VERSION.fullmatch(version):
            raise _Refused(505, f"invalid HTTP version ({version})")
        raise _Refused(400, f"bad request version ({version!r})")
    if len(lines) > MAX_HEADERS:
        raise _Refused(431, "too many headers")
    headers = {}
    lengths = []  # the value of each content-length line
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:  # a folded line too (RFC 9112, 5.2)
            raise _Refused(400, f"bad header line ({line[:100]!r})")
        key = name.strip().lower()
        headers[key] = value.strip()
        if key == "content-length":
            lengths.append(value)
    if "transfer-encoding" in headers:  # chunked is not read; both at once is smuggling
        if "content-length" in headers:
            raise _Refused(400, "both content-length and transfer-encoding")
        raise _Refused(411, "a body needs content-length (chunked is not read)")
    size = _content_length(lengths) if lengths else 0
    if size > MAX_BODY_BYTES:
        raise _Refused(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:  # the client closed before the whole body
        return None
    return method, target, version, headers, body


def _content_length(values: list[str]) -> int:
    """The body's length, from the values of the request's content-length lines: ASCII
    digits and nothing else (int() took "+5" and "0_0", and an empty value was taken as
    0), and one value, which may come again ("42, 42" or a second line: RFC 9110 8.6).
    Lengths that disagree are refused, not the last one believed (RFC 9112 6.3): a
    server and a proxy each reading another is request smuggling. _Refused (400) else."""
    if len(values) == 1:  # the usual request: a single length, checked in a few steps
        length = values[0].strip(" \t")
        if length.isdigit() and length.isascii():  # (isdigit alone takes "²", "٣")
            return _length(length)
    found = {v.strip(" \t") for value in values for v in value.split(",")}
    for length in sorted(found):
        if not _DIGITS.fullmatch(length):
            raise _Refused(400, f"bad content-length ({length[:100]!r})")
    if len(found) > 1:
        raise _Refused(400, f"content-lengths disagree ({', '.join(sorted(found))[:100]})")
    return _length(found.pop())


def _length(digits: str) -> int:
    """The number the digits write, or past any length served (then refused, 413) when
    they are too many to read (int() refuses over 4,300)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else MAX_BODY_BYTES + 1


async def _refuse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, message: str
) -> None:
    """Answer `status` in JSON, saying the connection closes (the caller closes it). What
    the client still sends is read and dropped for a while first (a lingering close, as
    web servers do): closed with a request's rest unread, the connection is reset, and
    the client sees the reset instead of this answer."""
    error = {"error": _PHRASES.get(status, ""), "message": message}
    writer.write(_encode(status, {"connection": "close"}, error))
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    left = LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            while left > 0 and (chunk := await reader.read(min(1 << 16, left))):
                left -= len(chunk)


def _encode(status: int, headers: dict[str, str], body: Any) -> bytes:
    """A reply as bytes on the wire: JSON unless the headers say otherwise, headers in latin-1."""
    if isinstance(body, bytes):  # a responder's raw bytes (a proxy's page, say)
        data = body
    else:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, '')}"]
    if "content-type" not in {k.lower() for k in headers}:
        lines.append("content-type: application/json")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


# The usual reply, and its bytes: not to be changed (answer() hands out a copy).
_OK: Reply = (200, {}, {"ok": True})
_OK_BYTES = _encode(*_OK)


def _wire(reply: Reply) -> bytes:
    return _OK_BYTES if reply is _OK else _encode(*reply)


async def _in_thread(responder: Responder, request: Request) -> Reply | None:
    """A test's responder, on a daemon thread of its own: it may block (hold a reply until
    the test lets it go) without holding up other requests, stop() or the interpreter's exit."""
    done: concurrent.futures.Future[Reply | None] = concurrent.futures.Future()

    def run() -> None:
        if done.set_running_or_notify_cancel():  # not when stop() cancelled the request
            try:
                done.set_result(responder(request))
            except BaseException as e:  # raised in the request's handler
                done.set_exception(e)

    threading.Thread(target=run, name="sandbox-responder", daemon=True).start()
    return await asyncio.wrap_future(done)
