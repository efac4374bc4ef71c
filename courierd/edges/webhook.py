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

import hmac
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from email.message import Message

from courierd.config import Settings
from courierd.domain.restaurant import RestaurantEvent, parse_event
from courierd.edges.api import Reply, error_reply
from courierd.edges.http import JsonServer
from courierd.errors import StoreError, TelemetryError
from courierd.store import Store, open_store

log = logging.getLogger(__name__)

PATH = "/onetablet/events"
COMMIT_TIMEOUT_S = 30.0


class WebhookServer(JsonServer):
    """`start()`, `stop()`; events are applied to the configured store."""

    def __init__(self, settings: Settings) -> None:
        assert settings.webhook.secret is not None  # the settings refuse a listener without
        self._secret = settings.webhook.secret.get_secret_value().encode()
        self._settings = settings
        # One thread owns the store (SQLite connections belong to one thread).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="webhook-store")
        self._store: Store | None = None
        super().__init__(
            settings.webhook.listen, self._route, setting="webhook.listen", name="webhook"
        )

    def _route(self, command: str, path: str, headers: Message, body: Callable[[], bytes]) -> Reply:
        if path.partition("?")[0] != PATH:
            return error_reply(404, f"no such endpoint: {path[:200]}; events go to {PATH}")
        if command != "POST":
            return error_reply(405, "only POST here", (("allow", "POST"),))
        key = (headers.get("x-api-key") or "").encode("utf-8", "replace")
        if not hmac.compare_digest(key, self._secret):
            return error_reply(401, "missing or wrong x-api-key")
        try:
            event = parse_event(body())
        except TelemetryError as e:
            return error_reply(400, e.detail)
        future = self._pool.submit(self._apply, event)
        try:
            applied = future.result(timeout=COMMIT_TIMEOUT_S)
        except (StoreError, FutureTimeout) as e:
            log.error("webhook.not_recorded order_id=%s error=%s", event.order_id, e)
            return error_reply(503, f"not recorded, try again: {e}")
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
        return self._store.inbound.apply(event, time.time())

    def stop(self) -> None:
        super().stop()
        self._pool.submit(self._close).result(timeout=5)
        self._pool.shutdown(wait=False)

    def _close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
