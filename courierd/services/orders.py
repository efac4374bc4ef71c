"""What `courierd order submit|cancel|show` and the dispatch API's writes do; `cli.py` and
`edges/api.py` parse the request and map errors to exits or replies.

Each action returns the JSON document the command prints, so that other front doors
(the dispatch API) do exactly the same thing. Kept apart from `cli.py` so that the
daemon's worker processes, which import the command-line module again when they start
(multiprocessing "spawn"), do not also load the OneTablet client and the order schema.
"""

from __future__ import annotations

import logging
from typing import Any

from courierd.config import Settings
from courierd.domain.fields import MAX_ID
from courierd.domain.order_schema import check_order
from courierd.domain.policy import CLI_MAX_RETRY_AFTER
from courierd.edges.onetablet import OneTabletClient, with_retries
from courierd.errors import InputError, OneTabletError, StoreError
from courierd.store import Store, open_store

log = logging.getLogger("courierd")


def client(settings: Settings) -> OneTabletClient:
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None
    return OneTabletClient(
        ot.base_url,
        ot.api_key.get_secret_value(),
        transport=ot.transport,
        timeout=ot.timeout_s,
        client=ot.client,
    )


def _retrying(settings: Settings) -> dict[str, Any]:
    def on_retry(error: OneTabletError, delay: float) -> None:
        log.warning("onetablet.retry in=%.1fs reason=%r", delay, str(error))

    return {"schedule": settings.onetablet.retry_schedule_s, "on_retry": on_retry}


def cancel_hold_s(settings: Settings) -> float:
    """How long a cancel may hold an order's pushes: every attempt timing out, every
    wait at its longest, and a minute to spare. A dead command's hold ends by itself."""
    ot = settings.onetablet
    waits = sum(max(w, CLI_MAX_RETRY_AFTER) for w in ot.retry_schedule_s)
    return ot.timeout_s * (len(ot.retry_schedule_s) + 1) + waits + 60.0


def submit(settings: Settings, document: bytes, source: str) -> dict[str, Any]:
    """Validate the order, `POST /orders` it as written (with retries), then keep its
    store id and delivery point locally for the geofences (CONTRACT.md 7)."""
    facts = check_order(document, source)
    with client(settings) as ot:
        reply = with_retries(
            lambda: ot.submit_order(document, facts.order_id), **_retrying(settings)
        )
    try:
        with open_store(settings.store) as store:
            store.registry.record_order(facts, store.clock())
    except StoreError as e:  # OneTablet has the order: that must not read as a failure
        log.warning("order.places_not_recorded order_id=%s error=%s", facts.order_id, e)
    return {"order_id": facts.order_id, "status": reply.status, "reply": reply.body}


def cancel(
    settings: Settings, order_id: str, reason: str, details: str | None, store: Store | None = None
) -> dict[str, Any]:
    """Hold the order's pushes, ask OneTablet to cancel, then cancel locally or let go.

    The check (refused after dropoff) and the hold are one write transaction, so a
    dropoff cannot slip in between; while OneTablet is being asked, the order's pushes
    wait. If OneTablet accepts, the order is cancelled and its unsent pushes dropped;
    if not, the hold is released and the pushes flow as before.
    """
    if not order_id or len(order_id) > MAX_ID or "/" in order_id:
        raise InputError(f"order id {order_id[:40]!r} must be 1-128 characters without '/'")
    own = store is None
    store = store or open_store(settings.store)
    try:
        # On the store's clock: another instance's host releases the hold when expired.
        store.outbox.hold_for_cancel(order_id, store.clock(), cancel_hold_s(settings))
        try:
            with client(settings) as ot:
                reply = with_retries(
                    lambda: ot.cancel_order(order_id, reason, details), **_retrying(settings)
                )
        except BaseException:
            store.outbox.release_hold(order_id)
            raise
        dropped = store.outbox.finish_cancel(order_id, store.clock())
    finally:
        if own:
            store.close()
    return {
        "order_id": order_id,
        "cancelled": True,
        "dropped_pushes": dropped,
        "status": reply.status,
        "reply": reply.body,
    }


def show(settings: Settings, order_id: str) -> dict[str, Any] | None:
    with open_store(settings.store) as store:
        return store.queries.order_view(order_id)
