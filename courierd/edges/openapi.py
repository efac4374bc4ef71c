"""The OpenAPI 3.1 document of the dispatch API, served at `/openapi.json`.

Written by hand beside api.py (the two change together; tests/test_api.py runs
schemathesis against a live daemon to keep them honest), except the order document's
schema, which is OneTablet's Order model as courierd checks it (domain/order_schema.py),
tightened where courierd's strict JSON and text rules say more than the model does.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from courierd.domain.fields import MAX_ID, MAX_NUMBER_DIGITS
from courierd.domain.model import CANCEL_REASONS, CANCELLED, EXPIRED, NEW, Status

Schema = dict[str, Any]

STATES = [NEW, *(s.value for s in Status), CANCELLED, EXPIRED]
ID_PATTERN = "^[^/\\u0000]+$"  # one path segment, no NUL (courierd's text rule)
TEXT_PATTERN = "^[^\\u0000]*$"

S: Schema = {"type": "string"}
S_NULL: Schema = {"type": ["string", "null"]}
NUM: Schema = {"type": "number"}
NUM_NULL: Schema = {"type": ["number", "null"]}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def or_null(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def obj(optional: tuple[str, ...] = (), closed: bool = True, **props: Schema) -> Schema:
    """An object with these properties, all required but `optional`."""
    return obj_of(props, optional, closed)


def obj_of(props: dict[str, Schema], optional: tuple[str, ...] = (), closed: bool = True) -> Schema:
    out: Schema = {
        "type": "object",
        "properties": props,
        "required": [k for k in props if k not in optional],
    }
    if closed:
        out["additionalProperties"] = False
    return out


ERRORS = {
    "400": "Bad input: malformed JSON, a wrong type, an unknown field or query parameter, "
    "a bad limit or cursor",
    "401": "No token, or the wrong one (`Authorization: Bearer <token>`)",
    "403": "Writes are off: courierd has no `http.token`",
    "404": "Unknown order, or no such endpoint",
    "409": "The order cannot be cancelled now (dropped off, or another cancel holds it)",
    "411": "A body sent without Content-Length (chunked)",
    "413": "The body is over 64 KiB",
    "502": "OneTablet refused the request or could not be reached (its message)",
    "503": "The database is unavailable",
}


def responses(ok: Schema, *codes: str, description: str = "OK") -> Schema:
    out: Schema = {"200": {"description": description, "content": _json(ok)}}
    for code in ("400", "401", "404", *codes, "503"):
        out[code] = {"$ref": f"#/components/responses/E{code}"}
    return out


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


ORDER_ID: Schema = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "description": "The order's id (percent-encoded)",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": ID_PATTERN},
}


def _limit(default: int) -> Schema:
    return {
        "name": "limit",
        "in": "query",
        "description": f"How many to return (default {default})",
        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": default},
    }


def _schemas() -> dict[str, Schema]:
    place = obj(lat=NUM, lng=NUM, radius_m=NUM_NULL)
    circle = obj(lat=NUM, lng=NUM, radius_m=NUM, exit_radius_m=NUM)
    eta = {"to": {"enum": ["pickup", "dropoff"]}, "distance_m": NUM, "seconds": NUM}
    summary = obj(
        order_id=S, state=S, courier_id=S_NULL, updated_at=S, status_at=S_NULL, cancelling=BOOL
    )
    fix = obj(ts=S, lat=NUM, lng=NUM, accuracy_m=NUM_NULL, speed_mps=NUM_NULL, heading=NUM_NULL)
    return {
        "Error": obj(error=S, message=S),
        "Place": place,
        "Circle": circle,
        "Eta": obj_of(eta),
        "OrderSummary": summary,
        "OrderList": obj(orders=array(ref("OrderSummary")), next_cursor=S_NULL),
        "OrderView": obj(
            closed=False,  # order show may gain fields; these are there
            order_id=S,
            state=S,
            courier_id=S_NULL,
            cancelled=BOOL,
            cancelling=BOOL,
            transitions=array(
                obj(
                    ("lat", "lng"),
                    status=S,
                    at=S,
                    inferred=BOOL,
                    source=S,
                    event_id=S_NULL,
                    lat=NUM,
                    lng=NUM,
                )
            ),
            pushes=array(
                obj(
                    status=S,
                    state=S,
                    delivered=BOOL,
                    attempts=INT,
                    last_error=S_NULL,
                    idempotency_key=S,
                )
            ),
            courier_last_seen=S_NULL,
            courier_offline=BOOL,
            eta=or_null(ref("Eta")),
            places=obj(pickup=or_null(ref("Place")), dropoff=or_null(ref("Place"))),
        ),
        "Fix": fix,
        "Courier": obj(
            courier_id=S,
            fix=or_null(ref("Fix")),
            last_seen=S_NULL,
            offline=BOOL,
            active_order_ids=array(S),
            eta=or_null(obj_of({"order_id": S, **eta})),
        ),
        "CourierList": obj(couriers=array(ref("Courier"))),
        "DeadLetter": obj(
            id=INT, received_at=S, topic=S, reason=S, detail=S_NULL, payload=S, size=INT
        ),
        "Dashboard": obj(
            at=S,
            health=obj(status=S, reasons=array(S)),
            auth_paused=BOOL,
            orders_by_state={"type": "object", "additionalProperties": INT},
            active_orders=array(ref("OrderSummary")),
            active_total=INT,
            active_truncated=BOOL,
            couriers_offline=array(obj(courier_id=S, last_seen=S_NULL, order_ids=array(S))),
            outbox=obj(
                pending=INT, oldest_pending_age_s=NUM_NULL, failed=INT, held=INT, dead_letters=INT
            ),
            dead_letters=array(ref("DeadLetter")),
        ),
        "Track": obj(
            order_id=S,
            state=S,
            courier_id=S_NULL,
            since=S,
            until=S_NULL,
            points=array(obj(ts=S, lat=NUM, lng=NUM, accuracy_m=NUM_NULL)),
            truncated=BOOL,
            pickup=or_null(ref("Circle")),
            dropoff=or_null(ref("Circle")),
            transitions=array(obj(status=S, source=S, at=S, lat=NUM_NULL, lng=NUM_NULL)),
        ),
        "CancelRequest": obj(
            ("reason", "details"),
            reason={"enum": list(CANCEL_REASONS), "default": "OTHER"},
            details={"type": "string", "maxLength": 1000, "pattern": TEXT_PATTERN},
        ),
        "SubmitReply": obj(order_id=S, status=INT, reply={}),
        "CancelReply": obj(order_id=S, cancelled=BOOL, dropped_pushes=INT, status=INT, reply={}),
        **_order_schemas(),
    }


def _order_schemas() -> dict[str, Schema]:
    """OneTablet's Order as courierd checks it, from the model itself."""
    from courierd.domain.order_schema import OrderDocument

    doc = OrderDocument.model_json_schema(ref_template="#/components/schemas/Order{model}")
    parts = {f"Order{name}": part for name, part in doc.pop("$defs", {}).items()}
    doc["description"] = (
        "OneTablet's Order, sent as written; only `id` is required. Integer fields take "
        "integer literals (1250, not 1250.0), of at most 40 characters; no NaN."
    )
    doc["properties"]["id"]["pattern"] = ID_PATTERN
    store_id = parts["OrderStore"]["properties"]["merchant_supplied_id"]["anyOf"][0]
    store_id.update(maxLength=MAX_ID, pattern=TEXT_PATTERN)
    out = {"Order": doc, **parts}
    _bound_integers(out)
    return out


def _bound_integers(node: Any) -> None:
    """Integers in courierd's strict JSON have at most 40 characters."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.setdefault("minimum", -(10 ** (MAX_NUMBER_DIGITS - 1) - 1))
            node.setdefault("maximum", 10**MAX_NUMBER_DIGITS - 1)
        for value in node.values():
            _bound_integers(value)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value)


def _paths() -> dict[str, Schema]:
    return {
        "/v1/orders": {
            "get": {
                "operationId": "listOrders",
                "summary": "Orders, most recently updated first, a page at a time",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "description": "Only orders in this state (`active`: not finished)",
                        "schema": {"enum": [*STATES, "active"]},
                    },
                    {
                        "name": "courier_id",
                        "in": "query",
                        "description": "Only this courier's orders",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_ID,
                            "pattern": TEXT_PATTERN,
                        },
                    },
                    _limit(50),
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The `next_cursor` of the previous page, as given",
                        "schema": {"type": "string", "format": "courierd-cursor"},
                    },
                ],
                "responses": responses(ref("OrderList")),
            },
            "post": {
                "operationId": "submitOrder",
                "summary": "Submit an order to OneTablet (what `courierd order submit` does)",
                "requestBody": {"required": True, "content": _json(ref("Order"))},
                "responses": responses(
                    ref("SubmitReply"), "403", "411", "413", "502", description="OneTablet's reply"
                ),
            },
        },
        "/v1/orders/{order_id}": {
            "get": {
                "operationId": "showOrder",
                "summary": "One order, as `courierd order show` prints it",
                "parameters": [ORDER_ID],
                "responses": responses(ref("OrderView")),
            }
        },
        "/v1/orders/{order_id}/cancel": {
            "post": {
                "operationId": "cancelOrder",
                "summary": "Cancel an order (what `courierd order cancel` does)",
                "parameters": [ORDER_ID],
                "requestBody": {"required": False, "content": _json(ref("CancelRequest"))},
                "responses": responses(
                    ref("CancelReply"), "403", "409", "411", "413", "502", description="Cancelled"
                ),
            }
        },
        "/v1/orders/{order_id}/track": {
            "get": {
                "operationId": "orderTrack",
                "summary": "What the page draws: the courier's fixes, the places, the statuses",
                "parameters": [ORDER_ID],
                "responses": responses(ref("Track")),
            }
        },
        "/v1/couriers": {
            "get": {
                "operationId": "listCouriers",
                "summary": "Couriers, most recently heard from first",
                "parameters": [_limit(50)],
                "responses": responses(ref("CourierList")),
            }
        },
        "/v1/dashboard": {
            "get": {
                "operationId": "dashboard",
                "summary": "What the operator page's front view shows",
                "responses": responses(ref("Dashboard")),
            }
        },
    }


@functools.cache
def _document() -> Schema:
    error = {"content": _json(ref("Error"))}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "courierd dispatch API",
            "version": "1",
            "description": "Orders, couriers and the outbox of a running courierd. Every "
            'error is `{"error": Kind, "message": text}`. With `http.token` set, every '
            "operation needs `Authorization: Bearer <token>`; without one, reads are open "
            "(courierd then listens on loopback only) and writes answer 403.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
            "responses": {
                f"E{code}": {"description": text, **error} for code, text in ERRORS.items()
            },
        },
    }


def document() -> Schema:
    """The document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
