"""What the order and operator commands do; `cli.py` parses and maps errors to exits.

Kept apart from `cli.py` so that the daemon's worker processes, which import the
command-line module again when they start (multiprocessing "spawn"), do not also load
httpx, sqlite-utils and the order schema they never use.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from courierd.config import Settings
from courierd.domain import lifecycle
from courierd.domain.model import iso
from courierd.domain.order_schema import check_order
from courierd.domain.telemetry import MAX_ID
from courierd.edges.onetablet import OneTabletClient, with_retries
from courierd.errors import InputError, OneTabletError
from courierd.store.sqlite import Store

log = logging.getLogger("courierd")

EXIT_OK, EXIT_UNKNOWN = 0, 1


def _client(settings: Settings) -> OneTabletClient:
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None
    return OneTabletClient(
        ot.base_url, ot.api_key.get_secret_value(), transport=ot.transport, timeout=ot.timeout_s
    )


def _retrying(settings: Settings) -> dict[str, Any]:
    def on_retry(error: OneTabletError, delay: float) -> None:
        log.warning("onetablet.retry in=%.1fs reason=%r", delay, str(error))

    return {"schedule": settings.onetablet.retry_schedule_s, "on_retry": on_retry}


def order_submit(settings: Settings, file: str) -> int:
    source = "stdin" if file == "-" else file
    try:
        document = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {source}: {e.strerror}") from None
    order_id = check_order(document, source)
    with _client(settings) as client:
        reply = with_retries(lambda: client.submit_order(document, order_id), **_retrying(settings))
    print(json.dumps({"order_id": order_id, "status": reply.status, "reply": reply.body}))
    return EXIT_OK


def order_cancel(settings: Settings, order_id: str, reason: str, details: str | None) -> int:
    if not order_id or len(order_id) > MAX_ID or "/" in order_id:
        raise InputError(f"order id {order_id[:40]!r} must be 1-128 characters without '/'")
    store = _store(settings)
    try:
        cancelled = lifecycle.cancel(store.get_order(order_id), order_id)  # refuses after dropoff
        with _client(settings) as client:
            reply = with_retries(
                lambda: client.cancel_order(order_id, reason, details), **_retrying(settings)
            )
        dropped = store.save_cancel(cancelled, iso(time.time()))
    finally:
        store.close()
    print(
        json.dumps(
            {
                "order_id": order_id,
                "cancelled": True,
                "dropped_pushes": dropped,
                "status": reply.status,
                "reply": reply.body,
            }
        )
    )
    return EXIT_OK


def order_show(settings: Settings, order_id: str) -> int:
    store = _store(settings)
    try:
        view = store.order_view(order_id)
    finally:
        store.close()
    if view is None:
        print(f"courierd: unknown order {order_id!r}", file=sys.stderr)
        return EXIT_UNKNOWN
    print(json.dumps(view, indent=2))
    return EXIT_OK


def _store(settings: Settings) -> Store:
    return Store(settings.store.path, synchronous=settings.store.synchronous)
