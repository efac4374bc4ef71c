"""The dispatch API (`/v1/...`), its OpenAPI document and the operator page.

Served on `http.listen` by the HTTP process (daemon/web.py): health.py answers /healthz
and /metrics and hands every other request to `Api.handle`, on the event loop. Reads go
through a read-only store opened on the first request, on one thread of its own (a
SQLite connection belongs to the thread that opened it); at most READ_QUEUE wait for it,
more are a 503 at once. Writes do exactly what `courierd order submit|cancel` do
(services/orders.py, which open their own store), on a few threads of their own.

Auth: with `http.token` set, every /v1 endpoint needs `Authorization: Bearer <token>`
(the page's files and /openapi.json hold no data and are served to anyone). Without
one, the reads are open (courierd then only listens on loopback: `check_exposure`) and
the writes are off (403). Every error is `{"error": Kind, "message": text}`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from courierd.config import Settings, StoreSettings
from courierd.domain import fields
from courierd.domain.model import CANCEL_REASONS, CANCELLED, NEW, Status, iso
from courierd.edges.http import ApiError, Incoming, Reply, error_reply, json_reply
from courierd.errors import (
    InputError,
    OneTabletError,
    StoreError,
    StoreUnavailable,
    TelemetryError,
)
from courierd.services import orders
from courierd.store import Store, open_store
from courierd.store.queries import Queries

log = logging.getLogger(__name__)

T = TypeVar("T")
LiveStatus = Callable[[], dict[str, Any]]  # the daemon's health report, as /healthz gives it

READ_TIMEOUT_S = 30.0  # a read the database does not answer in time is a 503
READ_QUEUE = 16  # reads waiting for the store at most; more are a 503 at once
WRITERS = 4  # submits and cancels at once (each may wait on OneTablet's retries)
BUSY = (("retry-after", "1"),)
MAX_LIMIT, DEFAULT_LIMIT = 500, 50
ACTIVE_CAP, DEAD_LETTERS = 200, 20
TRACK_POINTS = 5000
MAX_DETAILS = 1000
STATES = (NEW, *(s.value for s in Status), CANCELLED)
PAGE = {  # path → (file in courierd/edges/page, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/page/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/page/app.css": ("app.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("cache-control", "no-cache"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)
JSON_TYPE = "application/json"
NO_STORE = (("cache-control", "no-store"),)


class Reads:
    """The API's read-only store: opened on first use, used from one thread only, with
    at most READ_QUEUE reads waiting for it."""

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="api-store")
        self._store: Store | None = None  # only ever touched on the pool's thread
        self._waiting = 0  # only ever touched on the event loop

    async def run(self, job: Callable[[Queries], T]) -> T:
        if self._waiting >= READ_QUEUE:
            raise ApiError(503, f"{READ_QUEUE} reads are waiting already; try again", BUSY, "Busy")
        self._waiting += 1
        try:
            future = asyncio.wrap_future(self._pool.submit(self._run, job))
            return await asyncio.wait_for(future, READ_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(503, f"the database did not answer in {READ_TIMEOUT_S:.0f} s") from None
        except StoreError as e:
            raise ApiError(503, str(e)) from None
        finally:
            self._waiting -= 1

    def _run(self, job: Callable[[Queries], T]) -> T:
        if self._store is None:
            self._store = open_store(self._settings, readonly=True)
        try:
            return job(self._store.queries)
        except StoreUnavailable:
            self._close()  # a lost connection: open a new one next time
            raise

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            try:
                store.close()
            except Exception:  # closing a broken connection may fail too
                log.debug("api.store_close_failed", exc_info=True)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already shut down
            self._pool.submit(self._close)
        self._pool.shutdown(wait=False)


Handler = Callable[["Request"], Awaitable[Reply]]
_ID = r"([^/]+)"  # an order id: one path segment, percent-decoded


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    access: str  # "read", "write" or "open"
    params: frozenset[str]  # the query parameters it takes


def _table(
    *rows: tuple[str, str, str, Handler, tuple[str, ...]],
) -> list[tuple[re.Pattern[str], dict[str, Route]]]:
    """Routes grouped by path pattern, in order: (method, pattern, access, handler, params)."""
    table: dict[str, dict[str, Route]] = {}
    for method, pattern, access, handler, params in rows:
        table.setdefault(pattern, {})[method] = Route(handler, access, frozenset(params))
    return [(re.compile(pattern), methods) for pattern, methods in table.items()]


@dataclass
class Request:
    method: str
    args: tuple[str, ...]  # path parameters (the order id)
    query: dict[str, str]
    body: bytes


class Api:
    """Routes, authenticates and answers requests, on the server's event loop."""

    def __init__(self, settings: Settings, live: LiveStatus | None = None) -> None:
        self.settings = settings
        self.live = live
        self.reads = Reads(settings.store)
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="api-write")
        self._writing = 0
        token = settings.http.token
        self._token = None if token is None else token.get_secret_value().encode()
        one = rf"/v1/orders/{_ID}"
        self.routes = _table(
            ("GET", "/v1/orders", "read", self._list, ("state", "courier_id", "limit", "cursor")),
            ("POST", "/v1/orders", "write", self._submit, ()),
            ("GET", one, "read", self._show, ()),
            ("POST", one + "/cancel", "write", self._cancel, ()),
            ("GET", one + "/track", "read", self._track, ()),
            ("GET", "/v1/couriers", "read", self._couriers, ("limit",)),
            ("GET", "/v1/dashboard", "read", self._dashboard, ()),
            ("GET", r"/openapi\.json", "open", self._openapi, ()),
        )

    def close(self) -> None:
        self.reads.close()
        self._writers.shutdown(wait=False)

    async def handle(self, request: Incoming) -> Reply:
        try:
            return await self._handle(request)
        except ApiError as e:
            return error_reply(e.status, e.message, e.headers, e.kind)
        except Exception:
            log.exception("api.error method=%s path=%r", request.method, request.target[:200])
            return error_reply(500, "courierd failed to answer this request (see its log)")

    async def _handle(self, request: Incoming) -> Reply:
        parts = urlsplit(request.target)
        headers, body = request.headers, request.body
        verb = "GET" if request.method == "HEAD" else request.method
        if parts.path in PAGE:
            if verb != "GET":
                raise _not_allowed({"GET": None})
            name, content_type = PAGE[parts.path]
            data = resources.files("courierd.edges.page").joinpath(name).read_bytes()
            return Reply(200, data, content_type, PAGE_HEADERS)
        for pattern, methods in self.routes:
            match = pattern.fullmatch(parts.path)
            if match is None:
                continue
            if verb not in methods:
                raise _not_allowed(methods)
            route = methods[verb]
            self._authorize(route.access, headers)
            args = tuple(_order_id(arg) for arg in match.groups())
            return await route.handler(Request(verb, args, _query(parts.query, route.params), body))
        raise ApiError(404, f"no such endpoint: {parts.path[:200]}")

    async def _write(self, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A submit or cancel, on a thread of its own (OneTablet may take a while)."""
        if self._writing >= 2 * WRITERS:
            raise ApiError(503, f"{self._writing} writes are under way; try again", BUSY, "Busy")
        self._writing += 1
        try:
            return await asyncio.wrap_future(self._writers.submit(job))
        finally:
            self._writing -= 1

    def _authorize(self, access: str, headers: Mapping[str, str]) -> None:
        if access == "open":
            return
        if self._token is None:
            if access == "write":
                raise ApiError(403, "writes are off: set http.token (COURIERD_HTTP__TOKEN)")
            return
        scheme, _, given = (headers.get("authorization") or "").strip().partition(" ")
        challenge = (("www-authenticate", 'Bearer realm="courierd"'),)
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "send the token as `Authorization: Bearer <token>`", challenge)
        if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), self._token):
            raise ApiError(401, "the token is wrong", challenge)

    # -- reads ----------------------------------------------------------------------

    async def _list(self, req: Request) -> Reply:
        state = req.query.get("state")
        if state is not None and state not in (*STATES, "active"):
            raise ApiError(400, f"state must be one of {', '.join((*STATES, 'active'))}")
        courier_id = req.query.get("courier_id")
        if courier_id is not None:
            _text(courier_id, "courier_id", fields.MAX_ID, empty=False)
        limit = _limit(req.query)
        after = None if "cursor" not in req.query else _decode_cursor(req.query["cursor"])
        page, last = await self.reads.run(
            lambda q: q.order_page(state=state, courier_id=courier_id, limit=limit, after=after)
        )
        return json_reply({"orders": page, "next_cursor": None if last is None else _cursor(last)})

    async def _show(self, req: Request) -> Reply:
        view = await self.reads.run(lambda q: q.order_view(req.args[0]))
        if view is None:
            raise ApiError(404, f"unknown order {req.args[0]!r}")
        return json_reply(view)

    async def _track(self, req: Request) -> Reply:
        g = self.settings.geofence
        track = await self.reads.run(
            lambda q: q.order_track(
                req.args[0],
                pickup_radius_m=g.radius_m,
                dropoff_radius_m=g.dropoff_radius_m,
                exit_factor=g.exit_factor,
                limit=TRACK_POINTS,
            )
        )
        if track is None:
            raise ApiError(404, f"unknown order {req.args[0]!r}")
        return json_reply(track)

    async def _couriers(self, req: Request) -> Reply:
        limit = _limit(req.query)
        return json_reply({"couriers": await self.reads.run(lambda q: q.couriers_overview(limit))})

    async def _dashboard(self, req: Request) -> Reply:
        now = time.time()
        doc = await self.reads.run(
            lambda q: q.dashboard(now, active_cap=ACTIVE_CAP, dead_letters=DEAD_LETTERS)
        )
        health = self.live() if self.live is not None else {"status": "unknown", "reasons": []}
        paused = health.get("onetablet") == "unauthorized"
        status = {"status": str(health["status"]), "reasons": [str(r) for r in health["reasons"]]}
        return json_reply({"at": iso(now), "health": status, "auth_paused": paused, **doc})

    async def _openapi(self, req: Request) -> Reply:
        from courierd.edges.openapi import document

        return Reply(200, json.dumps(document()).encode(), JSON_TYPE, ())

    # -- writes ---------------------------------------------------------------------

    async def _submit(self, req: Request) -> Reply:
        document = req.body
        try:
            result = await self._write(
                lambda: orders.submit(self.settings, document, "the request body")
            )
        except InputError as e:
            raise ApiError(400, str(e)) from None
        except OneTabletError as e:
            raise ApiError(502, f"OneTablet: {e}") from None
        log.info("api.submit order_id=%s status=%s", result["order_id"], result["status"])
        return json_reply(result)

    async def _cancel(self, req: Request) -> Reply:
        raw = req.body
        doc = _load(raw) if raw.strip() else {}
        unknown = sorted(set(doc) - {"reason", "details"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} (expected reason, details)")
        reason = doc.get("reason", "OTHER")
        if reason not in CANCEL_REASONS:
            raise ApiError(400, f"reason must be one of {', '.join(CANCEL_REASONS)}")
        details = doc.get("details")
        if details is not None:
            if not isinstance(details, str):
                raise ApiError(400, "details must be a string")
            _text(details, "details", MAX_DETAILS, empty=True)
        try:
            result = await self._write(
                lambda: orders.cancel(self.settings, req.args[0], reason, details)
            )
        except InputError as e:  # refused in this state (after dropoff, another cancel)
            raise ApiError(409, str(e)) from None
        except OneTabletError as e:
            raise ApiError(502, f"OneTablet: {e}") from None
        except StoreError as e:
            raise ApiError(503, str(e)) from None
        log.info("api.cancel order_id=%s status=%s", req.args[0], result["status"])
        return json_reply(result)


def _not_allowed(methods: dict[str, Any]) -> ApiError:
    allow = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ())}))
    return ApiError(405, f"method not allowed here; allowed: {allow}", (("allow", allow),))


def _order_id(segment: str) -> str:
    try:
        order_id = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the order id is not valid UTF-8") from None
    if "/" in order_id:
        raise ApiError(400, "an order id never contains '/'")
    return _text(order_id, "order id", fields.MAX_ID, empty=False)


def _text(value: str, name: str, limit: int, *, empty: bool) -> str:
    if not value and not empty:
        raise ApiError(400, f"{name} must not be empty")
    try:
        return fields.check_text(value, name, limit)
    except TelemetryError as e:
        raise ApiError(400, e.detail) from None


def _query(query: str, allowed: frozenset[str]) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            query, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=20
        )
    except ValueError as e:  # malformed, too many fields, or not UTF-8
        raise ApiError(400, f"malformed query string: {str(e)[:100]}") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            known = f"; known: {', '.join(sorted(allowed))}" if allowed else ""
            raise ApiError(400, f"unknown query parameter {key[:40]!r}{known}")
        if key in out:
            raise ApiError(400, f"query parameter {key!r} given twice")
        out[key] = _text(value, key, 1024, empty=True)
    return out


def _limit(query: dict[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _cursor(last: tuple[str, str]) -> str:
    raw = json.dumps({"u": last[0], "o": last[1]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    bad = ApiError(400, "cursor is not one this API gave out (pass next_cursor back as is)")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        doc = fields.load_object(raw)
    except (ValueError, TelemetryError):
        raise bad from None
    if set(doc) != {"u", "o"} or not all(isinstance(v, str) for v in doc.values()):
        raise bad
    return _text(doc["u"], "cursor", 64, empty=False), _text(doc["o"], "cursor", 128, empty=False)


def _load(raw: bytes) -> dict[str, Any]:
    try:
        return fields.load_object(raw)
    except TelemetryError as e:
        raise ApiError(400, f"the body must be one JSON object: {e.detail}") from None
