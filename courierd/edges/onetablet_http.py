"""The one OneTablet HTTP client policy: every call to OneTablet (pushes, the 401
probes, `order submit`, `order cancel`) is a `OneTabletHttp.post`, built here only.

The policy (CONTRACT.md 6.1), the same whichever HTTP library runs underneath:

- redirects are never followed: a 3xx comes back as the answer, with its `Location`
  (`domain/policy.py` fails it, like a 4xx);
- the key goes only to `base_url`'s origin (scheme, host, port): a request for any other
  origin is refused before anything is sent;
- proxies are decided once, from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (`proxy_for`),
  and passed to the library explicitly (its own reading of the environment is off);
- TLS: one context, the system's trust store (`ssl.create_default_context`, which
  also honours `SSL_CERT_FILE`/`SSL_CERT_DIR`);
- one deadline for the whole request (connect, send, headers, body). Libraries time
  each phase, so a reply trickling in a byte a second would never be cut;
- a reply's body is read up to `MAX_REPLY_BYTES` and the rest is dropped with the
  connection: its status decides the outcome, and a body larger than any real reply
  must not cost the process its memory.

Underneath (`CLIENTS`, `onetablet.client`): by default "httptools", courierd's own lean
HTTP/1.1 client (`http1.py`: an asyncio protocol on httptools' parser, a keep-alive pool
of its own, proxies included), which costs less than half of aiohttp's CPU per call
(README "Performance"). aiohttp stays selectable, as the fallback; httpx, on its own
transport or on httpx-aiohttp's, for the bench and the tests (it cost 2.5x aiohttp's
CPU per push, even over aiohttp). The policy tests run on every one of them.
The client lives on an asyncio loop; `LoopThread` gives the order commands one.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar
from urllib.parse import urlsplit

from courierd import __version__
from courierd.config import OneTabletSettings
from courierd.domain.model import value
from courierd.edges.http1 import Http1Error, Pool, Reply, checked_fields, unsafe_target

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

# What may run underneath; the first is the default, the config's (`onetablet.client`),
# so that a client made without `client=` (most tests) runs what production runs.
DEFAULT_CLIENT: str = OneTabletSettings.model_fields["client"].default
CLIENTS = (
    DEFAULT_CLIENT,
    *(c for c in ("httptools", "aiohttp", "httpx", "httpx-aiohttp") if c != DEFAULT_CLIENT),
)
MAX_REPLY_BYTES = 1 << 20  # OneTablet's replies are a few hundred bytes


@value
class Answer:
    """What came back on the wire, whichever library fetched it."""

    status: int
    reason: str
    content: bytes
    retry_after: str | None = None
    location: str | None = None  # a 3xx's target: reported, never followed


class NoAnswer(Exception):
    """The request got no answer: `reason` None means the deadline passed."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "deadline passed")
        self.reason = reason


class ForeignOrigin(ValueError):
    """A request for another origin than OneTablet's: refused, the key stays here."""


Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def proxy_for(base_url: str) -> str | None:
    """The proxy for OneTablet's origin, from the environment, decided once:
    `HTTPS_PROXY` (or `HTTP_PROXY` for an http:// base URL) unless `NO_PROXY` names
    the host. Lower-case names win, as curl and the standard library read them."""
    proxies = urllib.request.getproxies_environment()
    scheme, host, port = origin_of(base_url)
    proxy = proxies.get(scheme)
    if not proxy:
        return None
    if urllib.request.proxy_bypass(f"{host}:{port}"):  # NO_PROXY (from the environment on Linux)
        return None
    return proxy


class _Library(Protocol):
    errors: tuple[type[Exception], ...]  # what the library raises for a failed exchange

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Answer: ...

    async def close(self) -> None: ...


class OneTabletHttp:
    """One connection pool to OneTablet's origin under the policy above. Create it, use
    it and close it on one asyncio loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        deadline_s: float,
        max_connections: int,
        client: str = CLIENTS[0],
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.origin = origin_of(self.base_url)
        self.deadline_s = deadline_s
        self.proxy = proxy_for(self.base_url)
        headers = {"x-api-key": api_key, "content-type": "application/json"}
        tls = ssl.create_default_context()
        if client == "aiohttp":
            self._library: _Library = _Aiohttp(headers, tls, self.proxy, max_connections)
        elif client == "httptools":
            self._library = _Lean(self.base_url, headers, tls, self.proxy, max_connections)
        elif client in ("httpx", "httpx-aiohttp"):
            self._library = _Httpx(headers, tls, self.proxy, max_connections, client)
        else:
            raise ValueError(f"unknown HTTP client {client!r}; one of {', '.join(CLIENTS)}")
        self._failures: tuple[type[Exception], ...] = (*self._library.errors, OSError, ValueError)
        self._deadlines = _Deadlines(deadline_s)
        if isinstance(self._library, _Lean):
            self._deadlines.give_up = self._library.give_up
        # `post_soon`'s calls in flight: each reply's deadline and whom to tell.
        self._replies: dict[asyncio.Future[Any], tuple[_Call, Callable[[Answered], None]]] = {}

    @classmethod
    def open_on(cls, thread: LoopThread, base_url: str, api_key: str, **options: Any) -> Self:
        """The client, made on `thread`'s loop (where aiohttp wants it made); the thread
        is stopped if it cannot be made (a bad option)."""

        async def make() -> Self:
            return cls(base_url, api_key, **options)

        try:
            return thread.run(make())
        except BaseException:
            thread.stop()
            raise

    async def post(self, path: str, content: bytes, headers: dict[str, str]) -> Answer:
        """POST `path` (already escaped) under `base_url`, within the deadline."""
        # Only a path that starts with "/" is taken, and that is enough: base_url's
        # authority ends where base_url does or sooner, so what follows it cannot move the
        # origin (tests/test_onetablet_policy.py checks this against `origin_of` for any
        # path). Parsing every URL again to compare was 5 % of the push process's CPU.
        if not path.startswith("/"):
            raise ForeignOrigin(f"{path[:80]!r} does not lead to OneTablet's origin")
        url = self.base_url + path
        if unsafe_target(path):  # aiohttp sent it altered, httpx raised InvalidURL
            raise NoAnswer(f"{path[:80]!r} would break the request line")
        for name, text in headers.items():
            if not (name.isascii() and text.isascii()):
                # Each client encoded them its own way (the lean one as latin-1 when it
                # could, aiohttp as UTF-8) or refused them (httpx): refused alike.
                raise NoAnswer(f"header {name[:40]!r} is not ASCII")
        call = self._deadlines.start()
        try:
            return await self._library.post(url, content, headers)
        except asyncio.CancelledError:
            if call.timed_out():
                raise NoAnswer(None) from None
            raise
        except TimeoutError:  # the system's own (a connect timing out): no answer in time
            raise NoAnswer(None) from None
        except self._failures as e:
            raise NoAnswer(str(e) or type(e).__name__) from None
        finally:
            self._deadlines.finish(call)

    def post_soon(
        self, path: str, content: bytes, headers: dict[str, str], then: Callable[[Answered], None]
    ) -> bool:
        """`post` without a task, where it can go at once (courierd's own client, a
        connection idle, the request well-formed): sent now, and `then` gets the
        `Answer` or the `NoAnswer` (or, a bug, another exception) once it ends (as its
        reply is read; never before this returns), under the same deadline. False, and
        nothing sent, otherwise: `post` then (which also reports what was wrong with the
        request)."""
        library = self._library
        if not isinstance(library, _Lean) or not path.startswith("/") or unsafe_target(path):
            return False
        for name, text in headers.items():
            if not (name.isascii() and text.isascii()):
                return False
        try:
            reply = library.post_soon(self.base_url + path, content, headers, self._answered)
        except self._failures:  # (a closed client, a header that would break the request)
            return False
        if reply is None:
            return False
        self._replies[reply] = (self._deadlines.start_reply(reply), then)
        return True

    def _answered(self, reply: asyncio.Future[Any]) -> None:
        """`post_soon`'s end: its answer, or what `post` would have raised, to `then`."""
        entry = self._replies.pop(reply, None)
        if entry is None:  # `post_soon` failed after sending: the push went by a task then
            return
        call, then = entry
        got: Answered
        try:
            self._deadlines.finish(call)
            if reply.cancelled():  # only its deadline cancels it
                got = NoAnswer(None)
            else:
                e = reply.exception()
                if e is None:
                    got = _Lean.answer(reply.result())
                elif isinstance(e, TimeoutError):
                    got = NoAnswer(None)
                elif isinstance(e, self._failures):
                    got = NoAnswer(str(e) or type(e).__name__)
                else:
                    got = e
        except Exception as bug:  # a bug must not lose the call: `then` is told, as `post` raises
            got = bug
        then(got)

    async def close(self) -> None:
        await self._library.close()


# What `post_soon`'s caller gets: the answer, no answer, or (a bug) what went wrong.
Answered = Answer | BaseException


class _Call:
    """One call under its deadline: the task it runs in (or the reply it waits for,
    `post_soon`'s), when it must end by (the loop's clock), whether the deadline
    cancelled it, and whether it is over."""

    __slots__ = ("at", "cancelling", "expired", "over", "reply", "task")

    def __init__(
        self,
        task: asyncio.Task[Any] | None,
        at: float,
        reply: asyncio.Future[Any] | None = None,
    ) -> None:
        self.task = task
        self.reply = reply
        self.at = at
        self.cancelling = 0 if task is None else task.cancelling()
        self.expired = False
        self.over = False

    def timed_out(self) -> bool:
        """Whether the CancelledError that ended the call is the deadline's own
        (`asyncio.timeout`'s rule: not if someone else cancelled the task as well)."""
        if not self.expired:
            return False
        self.expired = False  # uncancelled once, here
        assert self.task is not None
        return self.task.uncancel() <= self.cancelling

    def cancel(self, give_up: Callable[[asyncio.Future[Any]], None]) -> None:
        """The deadline passed: the task is cancelled (or the reply given up)."""
        self.expired = True
        if self.task is not None:
            self.task.cancel()
        elif self.reply is not None:
            give_up(self.reply)


def _cancel(reply: asyncio.Future[Any]) -> None:
    reply.cancel()


class _Deadlines:
    """Every call's deadline on one timer, where `asyncio.timeout` makes a timer (and a
    context manager) per call: 10 % of the push process's CPU per push. Every call
    gets the same `seconds`, so the calls end their time in the order they started:
    the timer waits for the oldest call still running, and cancels those past their
    deadline, as `asyncio.timeout` would (the call then raises `NoAnswer(None)`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._calls: deque[_Call] = deque()  # in the order they started
        # How a call without a task is given up (`OneTabletHttp.post_soon`'s library's).
        self.give_up: Callable[[asyncio.Future[Any]], None] = _cancel
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> _Call:
        task = asyncio.current_task()
        assert task is not None, "a call runs in a task"
        loop = task.get_loop()
        call = _Call(task, loop.time() + self.seconds)
        self._calls.append(call)
        if self._timer is None:
            self._timer = loop.call_at(call.at, self._expire, loop)
        return call

    def start_reply(self, reply: asyncio.Future[Any]) -> _Call:
        """A call without a task of its own: at its deadline `reply` is cancelled."""
        loop = reply.get_loop()
        call = _Call(None, loop.time() + self.seconds, reply)
        self._calls.append(call)
        if self._timer is None:
            self._timer = loop.call_at(call.at, self._expire, loop)
        return call

    def finish(self, call: _Call) -> None:
        call.over = True
        if call.expired and call.task is not None:
            # Cancelled by its deadline, ended some other way: as asyncio.timeout.
            call.expired = False
            call.task.uncancel()
        calls = self._calls
        while calls and calls[0].over:
            calls.popleft()

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        calls = self._calls
        while calls and (calls[0].over or calls[0].at <= now):
            call = calls.popleft()
            if not call.over:
                call.cancel(self.give_up)
        if calls:
            self._timer = loop.call_at(calls[0].at, self._expire, loop)


class _Aiohttp:
    """aiohttp, imported only when chosen: the push process need not load it."""

    def __init__(
        self, headers: dict[str, str], tls: ssl.SSLContext, proxy: str | None, limit: int
    ) -> None:
        import aiohttp
        from yarl import URL

        self.errors: tuple[type[Exception], ...] = (aiohttp.ClientError,)
        self._url = URL
        self._proxy = proxy
        # Not the session's default headers: aiohttp sends those to the proxy too, in the
        # CONNECT of an https:// tunnel (the API key in clear to the proxy).
        self._headers = headers
        self._session = aiohttp.ClientSession(
            # All calls go to one host: the limit is the connections OneTablet sees.
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ssl=tls),
            timeout=aiohttp.ClientTimeout(total=None),  # OneTabletHttp's deadline rules
            cookie_jar=aiohttp.DummyCookieJar(),  # OneTablet's cookies mean nothing here
            auto_decompress=False,
            trust_env=False,  # proxy_for decided
        )

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Answer:
        # `encoded`: the order id is already escaped in the path, exactly once.
        async with self._session.post(
            self._url(url, encoded=True),
            data=content,
            headers={**self._headers, **headers},
            allow_redirects=False,
            proxy=self._proxy,
        ) as r:
            length = r.content_length
            if length is not None and length < MAX_REPLY_BYTES:
                # OneTablet's replies say their length, and aiohttp reads exactly that
                # many bytes, so the cap holds; one read instead of an iterator of
                # chunks (part of the push process's CPU per push).
                body = await r.read()
            else:
                body = await _capped(r.content.iter_chunked(65536))
                if len(body) == MAX_REPLY_BYTES:
                    r.close()  # the rest is not read: the connection cannot serve again
            retry_after, location = r.headers.get("retry-after"), r.headers.get("location")
            return Answer(r.status, r.reason or "", body, retry_after, location)

    async def close(self) -> None:
        await self._session.close()


class _Lean:
    """`http1.Pool`: an asyncio protocol on httptools' parser, a keep-alive pool of its
    own (at most `limit` connections), nothing else."""

    errors: tuple[type[Exception], ...] = (Http1Error,)

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        tls: ssl.SSLContext,
        proxy: str | None,
        limit: int,
    ) -> None:
        parts = urlsplit(base_url)
        self._root = f"{parts.scheme}://{parts.netloc}"  # what comes before the path
        scheme, host, port = origin_of(base_url)
        self._fields = ""
        self._pool: Pool | ValueError
        # A key that would break a request, or a proxy that is not http://: each call is
        # refused (no answer) as aiohttp refused them, rather than the process failing.
        try:  # aiohttp named itself (and offered gzip, which was then never decoded)
            self._fields = checked_fields({**headers, "user-agent": f"courierd/{__version__}"})
            self._pool = Pool(
                scheme, host, port, limit=limit, tls=tls, cap=MAX_REPLY_BYTES, proxy=proxy
            )
        except ValueError as e:
            self._pool = e

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Answer:
        if not url.startswith(self._root):
            raise ForeignOrigin(f"{url[:80]!r} is not on OneTablet's origin")
        if isinstance(self._pool, ValueError):
            raise self._pool
        r = await self._pool.request(
            "POST", url[len(self._root) :] or "/", self._fields, content, headers
        )
        return self.answer(r)

    def post_soon(
        self,
        url: str,
        content: bytes,
        headers: dict[str, str],
        then: Callable[[asyncio.Future[Reply]], None],
    ) -> asyncio.Future[Reply] | None:
        """`post` without a task, if a connection is idle (`Pool.request_soon`); None
        (nothing sent) if not, or if `post` would refuse the request."""
        if not url.startswith(self._root) or isinstance(self._pool, ValueError):
            return None
        path = url[len(self._root) :] or "/"
        return self._pool.request_soon("POST", path, self._fields, content, headers, then)

    def give_up(self, reply: asyncio.Future[Reply]) -> None:
        """Ends `post_soon`'s exchange of `reply` (its deadline passed)."""
        if isinstance(self._pool, Pool):
            self._pool.give_up(reply)
        else:
            reply.cancel()

    @staticmethod
    def answer(r: Reply) -> Answer:
        if 200 <= r.status < 300:  # Retry-After and Location count only for the others
            return Answer(r.status, r.reason, r.body)
        return Answer(r.status, r.reason, r.body, r.header(b"retry-after"), r.header(b"location"))

    async def close(self) -> None:
        if isinstance(self._pool, Pool):
            await self._pool.close()


class _Httpx:
    """httpx, imported only when chosen: the dispatch process need not load it."""

    def __init__(
        self,
        headers: dict[str, str],
        tls: ssl.SSLContext,
        proxy: str | None,
        limit: int,
        kind: str,
    ) -> None:
        import httpx

        self.errors: tuple[type[Exception], ...] = (httpx.HTTPError,)
        limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        transport: httpx.AsyncBaseTransport | None = None
        if kind == "httpx-aiohttp":
            import aiohttp
            from httpx_aiohttp import AiohttpTransport  # optional: the bench's, README

            # Some of aiohttp's own (a reply its parser refuses) pass through as they are.
            self.errors = (*self.errors, aiohttp.ClientError)
            transport = AiohttpTransport(
                verify=tls,
                limits=limits,
                proxy=httpx.Proxy(proxy) if proxy else None,
                trust_env=False,
            )
        self._http = httpx.AsyncClient(
            headers=headers,
            verify=tls,
            # A transport of our own carries the proxy itself (httpx would mount its own).
            proxy=proxy if transport is None else None,
            limits=limits,
            timeout=None,  # OneTabletHttp's deadline rules
            follow_redirects=False,
            trust_env=False,  # proxy_for decided
            transport=transport,
        )

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Answer:
        # Streamed, so that the cap holds; leaving the block early drops the connection.
        async with self._http.stream("POST", url, content=content, headers=headers) as r:
            body = await self._capped(r)
            return Answer(
                r.status_code,
                r.reason_phrase,
                body,
                r.headers.get("retry-after"),
                r.headers.get("location"),
            )

    async def _capped(self, r: httpx.Response) -> bytes:
        """The body's first `MAX_REPLY_BYTES` at most. At the cap the reply is closed (its
        connection dropped, not drained) and the iteration carried on to its end, which
        then comes at once (what was buffered, then the closed stream's error). httpx
        reads through a chain of async generators, one inside the other: only the
        outermost can be closed from here, and each one left suspended inside it is
        closed later by a task of the loop's, which a loop stopped soon after (as the
        order commands stop theirs) destroys while pending (httpx-aiohttp: always)."""
        body = bytearray()
        try:
            async for chunk in r.aiter_bytes():
                if len(body) < MAX_REPLY_BYTES:
                    body += chunk
                    if len(body) >= MAX_REPLY_BYTES:
                        await r.aclose()
        except self.errors:
            if not r.is_closed:  # a failed exchange, not the end of the one cut short
                raise
        return bytes(body[:MAX_REPLY_BYTES])

    async def close(self) -> None:
        await self._http.aclose()


async def _capped(chunks: AsyncIterator[bytes]) -> bytes:
    """The body's first `MAX_REPLY_BYTES` at most; the rest is never read."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) >= MAX_REPLY_BYTES:
            return bytes(body[:MAX_REPLY_BYTES])
    return bytes(body)


class LoopThread:
    """An asyncio loop running in a thread of its own; `run` from any other thread.

    `loop_factory` makes the loop (as `asyncio.Runner`'s does): a test's own kind of loop,
    without an event loop policy (deprecated since Python 3.14, removed in 3.16)."""

    def __init__(
        self,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.loop = loop_factory()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed (stopped): `coro` never runs
            coro.close()  # (not "never awaited" when the garbage collector finds it)
            raise
        return future.result(timeout)

    def stop(self) -> None:
        """Stops the loop and closes it (its self-pipe, a socket pair, and its executor):
        a loop only stopped left them to the garbage collector, which warned of each.
        A loop still running after 2 s (a callback that blocks) is left as it is."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():  # (a stop before run_forever began ends it at once)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(2.0)
        if not self._thread.is_alive():
            self.loop.close()
