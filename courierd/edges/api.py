"""The dispatch API (`/v1/...`: openapi.py's operations, validated by their models), its
OpenAPI document and the operator page.

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
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ValidationError

from courierd.commands.replay import rules_with, suggestion_json
from courierd.config import Settings, StoreSettings
from courierd.domain import fields
from courierd.domain.model import iso
from courierd.domain.replay import replay
from courierd.edges.apimodels import MAX_DETAILS, CancelRequest, OrderListQuery
from courierd.edges.http import JSON_TYPE, ApiError, Incoming, Reply, error_reply, json_reply
from courierd.edges.openapi import OPERATIONS, Operation, document
from courierd.errors import (
    InputError,
    OneTabletError,
    StoreError,
    StoreUnavailable,
    TelemetryError,
)
from courierd.services import orders
from courierd.store import Store, open_store
from courierd.store.cluster import DbClock
from courierd.store.queries import Queries
from courierd.store.replays import ReplayReads

log = logging.getLogger(__name__)

T = TypeVar("T")
LiveStatus = Callable[[], Awaitable[dict[str, Any]]]  # the health report /healthz gives

READ_TIMEOUT_S = 30.0  # a read the database does not answer in time is a 503
# `stores/suggestions` reads every stay at every store: one computation serves every
# caller for this long (stays change by the day), so open tabs cannot queue it up
# in front of the reads the page polls every 2 s.
SUGGESTIONS_FRESH_S = 300.0
READ_QUEUE = 16  # reads waiting for the store at most; more are a 503 at once
WRITERS = 4  # submits and cancels at once (each may wait on OneTablet's retries)
BUSY = (("retry-after", "1"),)
ACTIVE_CAP, DEAD_LETTERS = 200, 20
TRACK_POINTS = 5000
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


@dataclass(frozen=True, slots=True)
class Route:
    operation: Operation
    handler: Handler


@dataclass
class Request:
    method: str
    args: tuple[str, ...]  # path parameters (the order id)
    query: Any  # the operation's query model, validated
    body: bytes


class Api:
    """Routes, authenticates and answers requests, on the server's event loop."""

    def __init__(self, settings: Settings, live: LiveStatus | None = None) -> None:
        self.settings = settings
        self.live = live
        self.reads = Reads(settings.store)
        # min_orders -> (when started, the computation): shared while running and fresh
        self._suggested: dict[int, tuple[float, asyncio.Future[Any]]] = {}
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="api-write")
        self._writing = 0
        token = settings.http.token
        self._token = None if token is None else token.get_secret_value().encode()
        handlers: dict[str, Handler] = {
            "listOrders": self._list,
            "submitOrder": self._submit,
            "showOrder": self._show,
            "cancelOrder": self._cancel,
            "orderTrack": self._track,
            "orderReplay": self._replay,
            "storeSuggestions": self._suggestions,
            "listCouriers": self._couriers,
            "dashboard": self._dashboard,
        }
        # Grouped by path, in order: each path's methods (the OpenAPI document's table).
        self.routes: dict[str, dict[str, Route]] = {}
        for op in OPERATIONS:
            self.routes.setdefault(op.path, {})[op.method] = Route(op, handlers[op.operation_id])
        self.patterns = [
            (ops[next(iter(ops))].operation.pattern, ops) for ops in self.routes.values()
        ]

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
        if parts.path in PAGE or parts.path == "/openapi.json":
            if verb != "GET":
                raise _not_allowed({"GET": None})
            if parts.path == "/openapi.json":  # no data: served to anyone
                return Reply(200, json.dumps(document()).encode(), JSON_TYPE, ())
            name, content_type = PAGE[parts.path]
            data = resources.files("courierd.edges.page").joinpath(name).read_bytes()
            return Reply(200, data, content_type, PAGE_HEADERS)
        for pattern, methods in self.patterns:
            match = pattern.fullmatch(parts.path)
            if match is None:
                continue
            if verb not in methods:
                raise _not_allowed(methods)
            op = methods[verb].operation
            self._authorize(op.access, headers)
            args = tuple(_order_id(arg) for arg in match.groups())
            query = _valid(op.query, _query(parts.query))
            return await methods[verb].handler(Request(verb, args, query, body))
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
        query: OrderListQuery = req.query
        state, courier_id, limit = query.state, query.courier_id, query.limit
        after = None if query.cursor is None else _decode_cursor(query.cursor)
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

    async def _replay(self, req: Request) -> Reply:
        """`courierd replay --order ID --set ...` for one order, with where each status
        fired and would fire. The overrides are checked by the command's own rules_with."""
        order_id = req.args[0]
        overrides = req.query.model_dump(by_alias=True, exclude_none=True)
        pairs = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
        try:
            rules, screen = rules_with(self.settings.geofence, pairs, flag="")
        except InputError as e:
            raise ApiError(400, str(e)) from None

        def job(q: Queries) -> dict[str, Any] | None:
            reads = ReplayReads(q.db)
            if not reads.known(order_id):
                return None
            where = reads.decided_where(order_id)
            out: dict[str, Any] = {
                "order_id": order_id,
                "overrides": overrides,
                "fixes": 0,
                "missing_fixes": 0,
                "changed": False,
                "statuses": [],
            }
            for history in reads.histories(reads.order_ids([order_id])):
                result = replay(history, rules, screen=screen)
                out["fixes"], out["missing_fixes"] = len(history.fixes), history.missing
                out["changed"] = result.changed
                out["statuses"] = [
                    {
                        "status": st.status.value,
                        "was": st.was,
                        "would_be": st.would_be,
                        "shift_s": st.shift_s,
                        "changed": st.changed,
                        "was_at": _lat_lng(where.get(st.status.value)) if st.was else None,
                        "would_be_at": _lat_lng(st.where),
                    }
                    for st in result.statuses
                ]
            return out

        doc = await self.reads.run(job)
        if doc is None:
            raise ApiError(404, f"unknown order {order_id!r}")
        return json_reply(doc)

    async def _suggestions(self, req: Request) -> Reply:
        """`courierd stores suggest --json`, with each store's registered point."""
        min_orders = req.query.min_orders
        now = time.monotonic()
        started, job = self._suggested.get(min_orders, (now, None))
        stale = (
            job is not None
            and job.done()
            and (
                job.cancelled()
                or job.exception() is not None
                or now - started > SUGGESTIONS_FRESH_S
            )
        )
        if job is None or stale:
            if len(self._suggested) >= 16:  # one per min_orders asked: kept few
                self._suggested = {k: v for k, v in self._suggested.items() if not v[1].done()}
            job = asyncio.ensure_future(
                self.reads.run(lambda q: ReplayReads(q.db).suggestions(min_orders))
            )
            self._suggested[min_orders] = (now, job)
        found = await asyncio.shield(job)  # a caller gone does not cancel it for the rest
        stores = [
            {
                **suggestion_json(s),
                "registered": {"lat": p.lat, "lng": p.lng, "radius_m": p.radius_m},
            }
            for p, s in found
        ]
        return json_reply({"stores": stores})

    async def _couriers(self, req: Request) -> Reply:
        limit = req.query.limit
        return json_reply({"couriers": await self.reads.run(lambda q: q.couriers_overview(limit))})

    async def _dashboard(self, req: Request) -> Reply:
        def read(q: Queries) -> tuple[float, dict[str, Any]]:
            # The database's clock on a shared one: the ages shown are of times that
            # every instance stored by it (as `courierd outbox status` shows them).
            now = DbClock(q.db)()
            return now, q.dashboard(now, active_cap=ACTIVE_CAP, dead_letters=DEAD_LETTERS)

        now, doc = await self.reads.run(read)
        unknown = {"status": "unknown", "reasons": []}
        health = await self.live() if self.live is not None else unknown
        paused = health.get("onetablet") == "unauthorized"
        status = {"status": str(health["status"]), "reasons": [str(r) for r in health["reasons"]]}
        return json_reply({"at": iso(now), "health": status, "auth_paused": paused, **doc})

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
        asked: CancelRequest = _valid(CancelRequest, _load(raw) if raw.strip() else {})
        reason, details = asked.reason, asked.details
        if details is not None:
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


def _lat_lng(point: tuple[float, float] | None) -> dict[str, float] | None:
    return None if point is None else {"lat": point[0], "lng": point[1]}


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


def _query(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            query, keep_blank_values=True, strict_parsing=True, errors="strict", max_num_fields=20
        )
    except ValueError as e:  # malformed, too many fields, or not UTF-8
        raise ApiError(400, f"malformed query string: {str(e)[:100]}") from None
    out: dict[str, str] = {}
    for key, value in pairs:
        try:  # an error message may name it: no control characters, nothing to forge a log
            fields.check_id(key, "a query parameter's name", 100)
        except TelemetryError as e:
            raise ApiError(400, e.detail) from None
        if key in out:
            raise ApiError(400, f"query parameter {key[:40]!r} given twice")
        out[key] = _text(value, key[:40], 1024, empty=True)
    return out


M = TypeVar("M", bound=BaseModel)


def _valid(model: type[M], data: Any) -> M:
    """`data` checked by `model`, or a 400 naming the first thing wrong (never its value)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:60]
        what = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            known = ", ".join(f.alias or name for name, f in model.model_fields.items())
            what = f"unknown field or parameter (known: {known or 'none'})"
        raise ApiError(400, f"{where}: {what}" if where else what) from None


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
