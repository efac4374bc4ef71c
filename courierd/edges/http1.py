"""A lean HTTP/1.1 client to one origin: an asyncio protocol around httptools' response
parser (llhttp, the parser of Node.js, also under uvicorn) and a keep-alive pool.

It does only what `onetablet_http.py` needs (CONTRACT.md 6.1), at less than half of
aiohttp's CPU per request (0.36-0.45 of it; README "Performance"):

- one origin (scheme, host, port); requests carry their body with a content-length,
  and no redirect is ever followed (the reply is the answer);
- at most `limit` connections, open or opening; callers beyond wait in turn (first come,
  first served) for a connection or a free slot;
- a connection serves again only when its reply was read to the end, the reply allows
  it (`should_keep_alive`: HTTP/1.1 without `Connection: close`, or HTTP/1.0 with
  keep-alive) and the peer has not closed it. Anything else (a reply cut at the cap,
  a request cancelled by its caller's deadline, a parser error, a reply framed by the
  connection's end) closes it. An idle connection is closed after `idle_s` (15 s,
  aiohttp's keep-alive default), so that a server's own idle timeout rarely races a
  reuse;
- a kept-alive connection that the server closes before any byte of the reply (it
  timed the connection out as the request went): the request fails (`Http1Error`),
  as aiohttp fails a POST then (it re-sends only idempotent methods). The caller's
  caller retries (the outbox, with the Idempotency-Key that makes a re-send safe);
- a reply answers only the exchange it came in: what `exchange` reads starts afresh
  (status, headers, framing), so that a reply before (a 204, framed without a length)
  never answers a request the server then closed on. Bytes past the reply (the start
  of another that no request asked for, in the same read or later) close the
  connection: its framing is not to be trusted;
- the reply body is kept up to `cap` bytes: at the cap the reply is taken as it is
  (its status decides) and the connection closed, the rest never read. A reply with
  neither content-length nor chunked framing ends with its connection, when the peer
  closes it; a reset then is an error, not the end of the body;
- the reply's head (status line and headers, 1xx replies before it included) is
  bounded: over `MAX_HEAD_BYTES` (64 KiB) or `MAX_HEADERS` (128 headers) it is an
  error at once and the connection closed, nothing more buffered;
- the parser is llhttp's strict one: a bare LF for CRLF, a folded header (obs-fold) or
  a space before a header's colon is an error (no answer), where aiohttp's parser takes
  them. A OneTablet answering so would have every push retried until it expires:
  `onetablet.client = "aiohttp"` is the way out;
- 1xx informational replies are skipped; a 101 (protocol switch) is an error;
- a pool remembers the heads (status line to blank line) of whole replies its parser
  read, with what it read in them (`_KnownHead`): a later reply that is the same head
  and a body of its content-length, in one read, is that reply without the parser
  (same bytes, same reading: the parser's reading of a head depends on nothing else);
- requests are ASCII: a control character (CR, LF, NUL...) or one past ASCII in a
  request target or header (and spaces in the target) is refused (ValueError) before
  anything is sent, and so are a caller's framing headers (content-length,
  transfer-encoding, host, connection: the client writes its own);
- TLS with the caller's context (`server_hostname`: the origin's host);
- a proxy: an HTTP proxy carries http:// requests (absolute-form targets); https://
  goes through a CONNECT tunnel, then TLS to the origin inside it. A proxy URL's
  user-info goes as `Proxy-Authorization: Basic`.

Every wait is bounded by the caller: `request` cancelled at any point (`onetablet_http`'s
`_Deadlines` cancels its task), or `request_soon`'s exchange ended by `give_up` (the same
timer's, for a request without a task), leaves no connection half-used in the pool.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import unquote, urlsplit

import httptools

IDLE_S = 15.0  # aiohttp's keep-alive default
MAX_HEAD_BYTES = 1 << 16  # a reply's head (status line and headers, 1xx included)
MAX_HEADERS = 128  # header lines in one reply's head
KNOWN_HEADS = 32  # reply heads a pool remembers (`_KnownHead`); a server's Date changes each second
# Requests are ASCII: a control character, or one past ASCII (which each client
# encoded its own way, and the lean one as latin-1 when it could), is refused.
_BAD_IN_TARGET = re.compile(r"[^\x21-\x7e]")
_BAD_IN_FIELD = re.compile(r"[^\t\x20-\x7e]")  # horizontal tab is allowed
_FRAMING = frozenset({"content-length", "transfer-encoding", "host", "connection"})
_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")  # a header name is a token


class Http1Error(Exception):
    """The exchange failed: the peer's reply could not be parsed, or the connection
    ended before the reply did."""


@dataclass(slots=True)
class Reply:  # not frozen: a frozen dataclass's fields are set slowly, once per reply
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # as received, names as sent
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None


@dataclass(slots=True)
class _KnownHead:
    """What the parser read in a reply's head (its bytes from the status line to the
    blank line are the key), and the length of the body it framed: a later reply that
    is the same head and a body of that length, read whole in one piece between
    replies, is the same reply to the parser (its reading depends on nothing else), so
    it is taken as this without the parser's seven calls into Python per reply."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    length: int


def checked_fields(headers: dict[str, str], *, framing: bool = False) -> str:
    """`headers` as header lines, or ValueError if a name or value would break the
    request (CR/LF or another control character, a character past ASCII, a name that
    is not a token), or if a name is one of the framing headers the client writes
    itself (content-length, transfer-encoding, host, connection; `framing`: the
    client's own)."""
    lines = []
    for name, value in headers.items():
        if (framing or name not in _GOOD_NAMES) and not _good_name(name, framing):
            raise ValueError(f"header {name[:40]!r} would break the request")
        if not _good_value(value):
            raise ValueError(f"header {name[:40]!r} would break the request")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


_GOOD_NAMES: set[str] = set()  # names a caller's header had and that passed (a few)


def _good_name(name: str, framing: bool) -> bool:
    """Whether `name` is a token and, unless `framing`, none of the client's own; a
    caller's good name is remembered (each request carries the same few names)."""
    if not name or _BAD_NAME.search(name):
        return False
    if not framing and name.lower() in _FRAMING:
        raise ValueError(f"header {name!r} is the client's own: it frames the request")
    if not framing and len(_GOOD_NAMES) < 256:
        _GOOD_NAMES.add(name)
    return True


def _good_value(value: str) -> bool:
    """Whether a header value is printable ASCII and tabs (`_BAD_IN_FIELD` finds
    nothing): by the string's own tests, a third of the regular expression's cost."""
    return value.isascii() and (value.isprintable() or _BAD_IN_FIELD.search(value) is None)


def unsafe_target(path: str) -> bool:
    """Whether a request target would break the request line (or be altered by a
    client): anything but printable ASCII, a space included (a target is escaped).
    (`_BAD_IN_TARGET` says the same, at twice the cost.)"""
    return not (path.isascii() and path.isprintable()) or " " in path


class _Connection(asyncio.Protocol):
    """One connection, one exchange at a time: `exchange` writes a request and waits
    for its reply."""

    def __init__(self, cap: int, known_heads: dict[bytes, _KnownHead] | None = None) -> None:
        self._cap = cap
        # The pool's heads already read (`_KnownHead`); None: every reply is parsed.
        self._known_heads = known_heads
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False  # the peer closed, or we did
        self.ended = False  # connection_lost came: the transport closes the socket now
        self.keep = False  # the last reply allows the connection to serve again
        self._reply: asyncio.Future[Reply] | None = None
        self._started = False  # a byte of the reply came
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._until_close = True  # neither content-length nor chunked: ends with the connection
        self._in_head = False  # this exchange's reply head is being read
        self._read = 0  # bytes read in this exchange
        self._heads_before = 0  # bytes of this exchange's 1xx heads
        self._tunnel: asyncio.Future[bytes] | None = None  # a CONNECT's reply head
        self._tunnel_head = bytearray()
        self.on_lost: Callable[[_Connection], None] | None = None  # the pool's, while idle
        # `Pool.request_soon`'s: what the exchange's end runs, given its reply's future.
        self._then: Callable[[asyncio.Future[Reply]], None] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel_data(data)
            return
        if self._reply is None or self._reply.done():
            self._fail(Http1Error("the server sent bytes no request asked for"))
            return
        first = not self._started  # this exchange's first bytes: the parser is between replies
        if first and self._known_heads is not None:
            end = data.find(b"\r\n\r\n") + 4
            known = self._known_heads.get(data[:end]) if end > 3 else None
            if known is not None and len(data) - end == known.length:
                self._started, self._read, self._in_head = True, len(data), False
                self._status, self._until_close, self.keep = known.status, False, True
                reply = self._reply
                reply.set_result(Reply(known.status, known.reason, list(known.headers), data[end:]))
                then = self._then
                if then is not None:  # at once: the reply is whole, nothing more is read
                    self._then = None
                    try:
                        then(reply)
                    except Exception as e:  # as the loop reports a done callback's (the other way)
                        reply.get_loop().call_exception_handler(
                            {"message": "Exception in a reply's callback", "exception": e}
                        )
                return
        self._then_later()
        self._started = True
        self._read += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(Http1Error("the server switched protocols"))
            return
        except httptools.HttpParserCallbackError as e:  # one of ours, raised in a callback
            cause = e.__context__
            self._fail(cause if isinstance(cause, Http1Error) else Http1Error(str(e)))
            return
        except httptools.HttpParserError as e:
            self._fail(Http1Error(f"unreadable reply: {e}"))
            return
        # A head still unfinished: all read so far was heads, what the parser holds of
        # them (a header's value, the reason, until they end) is bounded by it.
        if self._in_head and self._read > MAX_HEAD_BYTES:
            self._fail(Http1Error(f"the reply's head is over {MAX_HEAD_BYTES} bytes"))
        elif first and self.keep and not self.lost and self._heads_before == 0:
            self._remember(data)

    def _remember(self, data: bytes) -> None:
        """`data` was one whole reply, read by the parser, its connection kept: its head
        is remembered if its body was framed by a content-length (not chunked)."""
        known = self._known_heads
        length = len(self._body)
        end = len(data) - length
        if known is None or data.find(b"\r\n\r\n") + 4 != end or self._until_close:
            return
        if any(name.lower() == b"transfer-encoding" for name, _ in self._headers):
            return
        if len(known) >= KNOWN_HEADS:
            known.clear()
        reason = self._reason.decode("latin-1")
        known[data[:end]] = _KnownHead(self._status, reason, tuple(self._headers), length)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._then_later()
        self.lost = True
        self.keep = False
        if self.on_lost is not None:
            self.on_lost(self)
        if self._tunnel is not None and not self._tunnel.done():
            self._tunnel.set_exception(Http1Error("the proxy closed the connection"))
        reply = self._reply
        if reply is None or reply.done():
            return
        # Everything below was set during this exchange (`exchange` reset it): a reply
        # of an earlier exchange never answers this one.
        if not self._started:
            reply.set_exception(Http1Error("the server closed the connection before answering"))
        elif exc is not None:  # a reset is no end of a body, whatever the framing
            reply.set_exception(Http1Error(f"the connection was reset mid-reply ({exc})"))
        elif self._status >= 200 and self._until_close:  # its body ended with the connection
            reply.set_result(self._made())
        else:
            reply.set_exception(Http1Error("the server closed the connection mid-reply"))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._reply is None or self._reply.done():
            # A second reply after the one asked for (in the same read): the framing of
            # this connection cannot be trusted, it never serves again.
            raise Http1Error("the server sent a reply no request asked for")
        self._in_head = True
        self._status, self._reason = 0, b""
        self._headers, self._body = [], bytearray()
        self._until_close = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(self._headers) > MAX_HEADERS:
            raise Http1Error(f"the reply has over {MAX_HEADERS} headers")
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            self._until_close = False

    def _head_size(self) -> int:
        """The bytes of the head just read (near enough: its lines, not their ends)."""
        return len(self._reason) + sum(len(n) + len(v) + 4 for n, v in self._headers)

    def on_headers_complete(self) -> None:
        self._in_head = False
        # A head read whole in one read: measured only when this exchange has read more
        # than the bound (a head can be over it only then).
        if self._read > MAX_HEAD_BYTES and self._heads_before + self._head_size() > MAX_HEAD_BYTES:
            raise Http1Error(f"the reply's head is over {MAX_HEAD_BYTES} bytes")
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._reply is None or self._reply.done():
            return  # past the cap: being dropped
        self._body += body
        if len(self._body) >= self._cap:
            del self._body[self._cap :]
            self._reply.set_result(self._made())
            self._close()  # the rest is never read

    def on_message_complete(self) -> None:
        if self._status == 101:
            self._fail(Http1Error("the server switched protocols"))
            return
        if 100 <= self._status < 200:
            self._in_head = True  # informational: the reply's head follows, counted with it
            self._heads_before += self._head_size()
            return
        reply = self._reply
        if reply is None or reply.done():
            self._fail(Http1Error("the server sent a reply no request asked for"))
            return
        self.keep = self._parser.should_keep_alive()
        reply.set_result(self._made())

    # the exchange

    def _made(self) -> Reply:
        return Reply(self._status, self._reason.decode("latin-1"), self._headers, bytes(self._body))

    def exchange(self, request: bytes) -> asyncio.Future[Reply]:
        """Writes `request`; the reply comes in the future returned (awaited by the
        caller: a coroutine of its own here was one more frame to resume per reply)."""
        assert self.transport is not None
        # Nothing of an earlier reply counts for this one (a 204's status and framing
        # would otherwise answer a request the server closed on).
        # (The reason, headers and body are reset as a reply begins.)
        self.keep, self._started, self._status, self._until_close = False, False, 0, True
        self._in_head, self._read, self._heads_before = True, 0, 0
        self._reply = reply = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return reply

    def _then_later(self) -> None:
        """The exchange ends otherwise than by a known head (the parser reads the reply,
        or it fails, or is given up): its `then` runs as its future's done callback, in
        a later pass of the loop, never inside the parser's callbacks."""
        then = self._then
        if then is not None and self._reply is not None:
            self._then = None
            self._reply.add_done_callback(then)

    def give_up(self) -> None:
        """The caller's deadline passed: the exchange ends (cancelled), as a task
        cancelled while it awaited it would end it."""
        self._then_later()
        if self._reply is not None:
            self._reply.cancel()

    def _fail(self, error: Exception) -> None:
        self._then_later()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(error)
        self._close()

    def _close(self) -> None:
        self.keep = False
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    # a CONNECT tunnel

    async def tunnel(self, request: bytes) -> bytes:
        """Sends a CONNECT and returns its reply's head (up to the blank line)."""
        assert self.transport is not None
        self._tunnel = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        try:
            return await self._tunnel
        finally:
            self._tunnel = None

    def _tunnel_data(self, data: bytes) -> None:
        assert self._tunnel is not None
        self._tunnel_head += data
        end = self._tunnel_head.find(b"\r\n\r\n")
        if end >= 0 and not self._tunnel.done():
            if end + 4 != len(self._tunnel_head):  # the origin speaks only after TLS starts
                self._tunnel.set_exception(Http1Error("the proxy sent bytes past its reply"))
            else:
                self._tunnel.set_result(bytes(self._tunnel_head))
        elif len(self._tunnel_head) > 16384 and not self._tunnel.done():
            self._tunnel.set_exception(Http1Error("the proxy's reply is too long"))


class Pool:
    """Keep-alive connections to one origin (scheme, host, port), at most `limit`."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        limit: int,
        tls: ssl.SSLContext | None,
        cap: int,
        proxy: str | None = None,
        idle_s: float = IDLE_S,
    ) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) origin: {scheme!r}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.scheme, self.host, self.port = scheme, host, port
        self._tls = tls if scheme == "https" else None
        self._cap, self._limit, self._idle_s = cap, limit, idle_s
        default = 443 if scheme == "https" else 80
        bracketed = f"[{host}]" if ":" in host else host
        authority = bracketed if port == default else f"{bracketed}:{port}"
        self._host_line = checked_fields({"host": authority}, framing=True)
        self._prefix = ""  # before the path in a request target: absolute-form via a proxy
        self._proxy: tuple[str, int] | None = None
        self._proxy_auth = ""
        if proxy is not None:
            parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"only http:// proxies are supported, not {proxy!r}")
            self._proxy = (parts.hostname, parts.port or 80)
            if parts.username is not None:
                user = unquote(parts.username) + ":" + unquote(parts.password or "")
                self._proxy_auth = checked_fields(
                    {"proxy-authorization": "Basic " + base64.b64encode(user.encode()).decode()}
                )
            if scheme == "http":
                self._prefix = f"http://{authority}"
        self._authority = f"{bracketed}:{port}"  # a CONNECT's target names the port
        self._opened = 0  # connections open or opening, idle or busy
        self._idle: deque[tuple[float, _Connection]] = deque()  # oldest first
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._all: set[_Connection] = set()
        self._closed = False
        self._known_heads: dict[bytes, _KnownHead] = {}  # the connections' (`_KnownHead`)

    async def request(
        self, method: str, path: str, fields: str, body: bytes, extra: dict[str, str]
    ) -> Reply:
        """`method` `path` (already escaped) with header lines `fields` (from
        `checked_fields`, checked once) and `extra` (checked here) and `body`."""
        request = self._request_bytes(method, path, fields, body, extra)
        # An idle connection without a coroutine (`_acquire`'s) made and run for it.
        conn = self._idle_connection() or await self._acquire()
        try:
            reply = await conn.exchange(request)
        except BaseException:
            self._discard(conn)
            raise
        self._done_with(conn)
        return reply

    def request_soon(
        self,
        method: str,
        path: str,
        fields: str,
        body: bytes,
        extra: dict[str, str],
        then: Callable[[asyncio.Future[Reply]], None],
    ) -> asyncio.Future[Reply] | None:
        """`request` without a task, when a connection is idle: the request is written
        on it now, and `then` gets the reply's future once it is done (as the reply is
        read, or in a later pass of the loop; never before this returns), after the
        connection went back to the pool or was closed. None, and nothing sent, when no
        connection is idle (then `request`). `give_up(future)` ends the exchange and
        closes its connection, as cancelling `request` does. (A task per request was its
        creation, its registration and two more passes of the loop.)"""
        request = self._request_bytes(method, path, fields, body, extra)
        conn = self._idle_connection()
        if conn is None:
            return None
        try:
            reply = conn.exchange(request)
        except BaseException:
            self._discard(conn)
            raise
        # Run by the connection at the exchange's end: at once for a reply of a known
        # head (a done callback was a handle and one more pass of the loop per push),
        # else as the future's done callback.
        conn._then = partial(self._exchanged, conn, then)
        return reply

    def give_up(self, reply: asyncio.Future[Reply]) -> None:
        """Ends `request_soon`'s exchange of `reply` (its caller's deadline passed)."""
        for conn in self._all:  # (a deadline passing is rare: a walk is no cost)
            if conn._reply is reply:
                conn.give_up()
                return
        reply.cancel()

    def _exchanged(
        self,
        conn: _Connection,
        then: Callable[[asyncio.Future[Reply]], None],
        reply: asyncio.Future[Reply],
    ) -> None:
        """`request_soon`'s reply came (or failed, or was cancelled): what `request`
        does after its exchange, then `then` (whatever happened to the connection)."""
        try:
            if reply.cancelled() or reply.exception() is not None:
                self._discard(conn)
            else:
                self._done_with(conn)
        finally:
            then(reply)

    def _request_bytes(
        self, method: str, path: str, fields: str, body: bytes, extra: dict[str, str]
    ) -> bytes:
        if unsafe_target(path) or not path.startswith("/"):
            raise ValueError(f"request target {path[:80]!r} would break the request")
        return (
            f"{method} {self._prefix}{path} HTTP/1.1\r\n{self._host_line}{fields}"
            f"{checked_fields(extra) if extra else ''}{self._proxy_auth if self._prefix else ''}"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body

    def _done_with(self, conn: _Connection) -> None:
        """An exchange ended with its reply: the connection serves again if it can."""
        if conn.keep and not conn.lost:
            self._release(conn)
        else:
            self._discard(conn)

    async def close(self) -> None:
        """Closes every connection (idle or busy: their requests fail) and refuses more."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Http1Error("the client is closed"))
        self._waiters.clear()
        self._idle.clear()
        failed: BaseException | None = None
        for conn in list(self._all):
            closed = False
            try:
                conn._fail(Http1Error("the client is closed"))
                closed = True
            except BaseException as e:
                failed = failed or e
            self._drop(conn, closed)
        self._opened = 0
        if failed is not None:
            raise failed

    # the pool

    def _idle_connection(self) -> _Connection | None:
        """An idle connection still open, if any (the most recent: the likeliest
        alive); Http1Error once the pool is closed."""
        if self._closed:
            raise Http1Error("the client is closed")
        idle = self._idle
        while idle:
            _, conn = idle.pop()
            conn.on_lost = None
            if not conn.lost:
                return conn
            self._discard(conn)
        return None

    async def _acquire(self) -> _Connection:
        conn = self._idle_connection()
        if conn is not None:
            return conn
        if self._opened < self._limit and not self._waiters:
            self._opened += 1
            return await self._open()
        waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            got = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over as this caller was cancelled
                if handed is None:
                    self._slot_freed()
                else:
                    self._release(handed)
            raise
        if got is None:  # a slot, counted for this caller already
            return await self._open()
        if got.lost:
            self._discard(got)
            return await self._acquire()
        return got

    async def _open(self) -> _Connection:
        """A new connection, its slot already counted (freed again if it fails)."""
        loop = asyncio.get_running_loop()
        try:
            if self._proxy is None:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._cap, self._known_heads),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls else None,
                )
            else:
                conn = await self._through_proxy(loop)
        except BaseException:
            self._slot_freed()
            raise
        if self._closed:
            conn._close()
            raise Http1Error("the client is closed")
        self._all.add(conn)
        return conn

    async def _through_proxy(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        assert self._proxy is not None
        transport, conn = await loop.create_connection(
            lambda: _Connection(self._cap, self._known_heads), *self._proxy
        )
        if self._tls is None:
            return conn
        try:
            request = (
                f"CONNECT {self._authority} HTTP/1.1\r\nhost: {self._authority}\r\n"
                f"{self._proxy_auth}\r\n"
            )
            head = await conn.tunnel(request.encode("latin-1"))
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1][:1] != "2":
                raise Http1Error(f"the proxy refused the tunnel: {status_line[:100]!r}")
            tls_transport = await loop.start_tls(
                transport, conn, self._tls, server_hostname=self.host
            )
        except BaseException:
            transport.abort()
            raise
        if tls_transport is None:
            raise Http1Error("TLS could not start in the tunnel")
        conn.transport = tls_transport
        return conn

    def _release(self, conn: _Connection) -> None:
        """A connection free to serve again: to the first waiter, or idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self._closed:
            self._discard(conn)
            return
        loop = asyncio.get_running_loop()
        self._idle.append((loop.time(), conn))
        conn.on_lost = self._lost_while_idle
        if self._sweeper is None:
            self._sweeper = loop.call_at(loop.time() + self._idle_s, self._sweep)

    def _lost_while_idle(self, conn: _Connection) -> None:
        """The peer closed an idle connection: out of the pool at once, its slot freed."""
        conn.on_lost = None
        for i, (_, idle) in enumerate(self._idle):
            if idle is conn:
                del self._idle[i]
                break
        self._discard(conn)

    @property
    def connections(self) -> int:
        """Connections open (idle or busy)."""
        return len(self._all)

    def _discard(self, conn: _Connection) -> None:
        conn.on_lost = None
        closed = False
        try:
            conn._close()
            closed = True
        finally:  # a close that fails part-way must not keep its slot from a waiter
            if conn in self._all:
                self._drop(conn, closed)
                self._slot_freed()

    def _drop(self, conn: _Connection, closed: bool) -> None:
        """Out of the pool's connections once closed; one whose abort raised (`closed`
        False) and that has not ended stays among them, where `close` aborts it again,
        until its `connection_lost` comes."""
        if closed or conn.ended:
            self._all.discard(conn)
        else:
            conn.on_lost = self._forget

    def _forget(self, conn: _Connection) -> None:
        """A connection whose close failed has ended at last (its slot freed already)."""
        conn.on_lost = None
        self._all.discard(conn)

    def _slot_freed(self) -> None:
        """A connection ended (or never opened): its slot to the first waiter, if any."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._opened = max(0, self._opened - 1)

    def _sweep(self) -> None:
        """Closes the connections idle for `idle_s` and over; again when the next is due."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = self._idle
        while idle and idle[0][0] + self._idle_s <= now:
            self._discard(idle.popleft()[1])
        if idle:
            self._sweeper = loop.call_at(idle[0][0] + self._idle_s, self._sweep)
