"""OneTablet → courierd events on `webhook.listen` (CONTRACT.md 11): `POST
/onetablet/events` with `x-api-key: <webhook.secret>`.

Replies: 200 `{"status": "ok"}` only once the event's effects are committed (a repeated
`event.id` too, with no second effect); 401 for a missing or wrong secret; 400
`{error, message}` for anything malformed (strict JSON, types, an unknown event type);
413 above 64 KiB; 503 when the database cannot take it (OneTablet will retry).
A listener of its own, apart from the dispatch API: OneTablet is another party, with
another secret, and it may need to be reachable from outside while the API is not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from courierd.config import Settings
from courierd.domain.restaurant import RestaurantEvent, parse_event
from courierd.edges.http import Incoming, Listener, Reply, error_reply
from courierd.errors import StoreError, TelemetryError
from courierd.store import Store, open_store

log = logging.getLogger(__name__)

PATH = "/onetablet/events"
COMMIT_TIMEOUT_S = 30.0
QUEUE = 32  # events waiting for the store at most; more are a 503 (OneTablet retries)


class Webhook:
    """Applies events to the configured store; `listener()` serves them, `close()`."""

    def __init__(self, settings: Settings) -> None:
        assert settings.webhook.secret is not None  # the settings refuse a listener without
        # Compared as bytes with the header's own bytes: a non-ASCII secret matches too.
        self._secret = settings.webhook.secret.get_secret_value().encode()
        self._settings = settings
        # One thread owns the store (SQLite connections belong to one thread).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="webhook-store")
        self._store: Store | None = None
        self._waiting = 0

    def listener(self, listen: str | None = None) -> Listener:
        return Listener(
            listen or self._settings.webhook.listen,
            self.route,
            setting="webhook.listen",
            allowed_hosts=self._settings.webhook.allowed_hosts,
            deadline_s=self._settings.http.request_timeout_s,
        )

    async def route(self, request: Incoming) -> Reply:
        path = request.target
        if path.partition("?")[0] != PATH:
            return error_reply(404, f"no such endpoint: {path[:200]}; events go to {PATH}")
        if request.method != "POST":
            return error_reply(405, "only POST here", (("allow", "POST"),))
        keys = [value for name, value in request.raw_headers if name.lower() == b"x-api-key"]
        if len(keys) != 1 or not hmac.compare_digest(keys[0].strip(), self._secret):
            return error_reply(401, "missing or wrong x-api-key")
        try:
            event = parse_event(request.body)
        except TelemetryError as e:
            return error_reply(400, e.detail)
        if self._waiting >= QUEUE:
            return error_reply(503, "too many events at once; try again", (("retry-after", "1"),))
        self._waiting += 1
        try:
            future = asyncio.wrap_future(self._pool.submit(self._apply, event))
            applied = await asyncio.wait_for(future, COMMIT_TIMEOUT_S)
        except (StoreError, TimeoutError) as e:
            log.error("webhook.not_recorded order_id=%s error=%r", event.order_id, e)
            return error_reply(503, f"not recorded, try again: {e}")
        finally:
            self._waiting -= 1
        log.info(
            "webhook.event type=%s order_id=%s event_id=%s repeated=%s",
            event.kind.value,
            event.order_id,
            event.event_id or "-",
            not applied,
        )
        return Reply(200, json.dumps({"status": "ok"}).encode())

    def _apply(self, event: RestaurantEvent) -> bool:
        if self._store is None:
            self._store = open_store(self._settings.store)
        return self._store.inbound.apply(event, self._store.clock())

    def close(self) -> None:
        try:
            self._pool.submit(self._close).result(timeout=5)
        except Exception:  # a stuck store: the process is ending anyway
            log.debug("webhook.close_failed", exc_info=True)
        self._pool.shutdown(wait=False)

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
