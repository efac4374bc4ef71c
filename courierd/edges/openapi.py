"""The dispatch API's operations, and its OpenAPI 3.1 document generated from them.

Each `Operation` names the models that validate its query string and body and the one
that describes its reply (apimodels.py); api.py routes and validates by the same table,
and pydantic writes the JSON Schemas (2020-12, the dialect of OpenAPI 3.1). Only two
things are added by hand, both rules of courierd's strict JSON that no type says: an
order id has no '/', and an integer has at most 40 digits.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

from courierd.domain.fields import MAX_ID, MAX_NUMBER_DIGITS
from courierd.domain.order_schema import OrderDocument
from courierd.edges import apimodels as m

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str  # with {order_id} for the one path parameter there is
    operation_id: str
    summary: str
    access: str  # "read", "write" or "open"
    reply: Any  # the reply's TypedDict
    query: type[BaseModel] = m.NoQuery
    body: type[BaseModel] | None = None
    body_required: bool = False
    errors: tuple[str, ...] = ()  # beyond 400, 401, 404, 503

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.path).replace(r"\{order_id\}", "([^/]+)"))


ONE = "/v1/orders/{order_id}"
WRITE_ERRORS = ("403", "411", "413", "502")
OPERATIONS = (
    Operation("GET", "/v1/orders", "listOrders",
              "Orders, most recently updated first, a page at a time", "read",
              m.OrderList, m.OrderListQuery),
    Operation("POST", "/v1/orders", "submitOrder",
              "Submit an order to OneTablet (what `courierd order submit` does)", "write",
              m.SubmitReply, body=OrderDocument, body_required=True, errors=WRITE_ERRORS),
    Operation("GET", ONE, "showOrder", "One order, as `courierd order show` prints it", "read",
              m.OrderView),
    Operation("POST", ONE + "/cancel", "cancelOrder",
              "Cancel an order (what `courierd order cancel` does)", "write",
              m.CancelReply, body=m.CancelRequest, errors=(*WRITE_ERRORS, "409")),
    Operation("GET", ONE + "/track", "orderTrack",
              "What the page draws: the courier's fixes, the places, the statuses", "read",
              m.Track),
    Operation("GET", ONE + "/replay", "orderReplay",
              "Where each geofence status would have fired with other geofence settings "
              "(what `courierd replay --order ID --set KEY=VALUE` does), beside where it did",
              "read", m.OrderReplay, m.ReplayQuery),
    Operation("GET", "/v1/couriers", "listCouriers", "Couriers, most recently heard from first",
              "read", m.CourierList, m.LimitQuery),
    Operation("GET", "/v1/stores/suggestions", "storeSuggestions",
              "Each store's pickup point learned from its couriers' stays, beside the "
              "registered one (what `courierd stores suggest` does)", "read",
              m.StoreSuggestions, m.SuggestionsQuery),
    Operation("GET", "/v1/dashboard", "dashboard", "What the operator page's front view shows",
              "read", m.Dashboard),
)  # fmt: skip

ERRORS = {
    "400": "Bad input: malformed JSON, a wrong type, an unknown field or query parameter, "
    "a bad limit or cursor, a geofence override replay would refuse",
    "401": "No token, or the wrong one (`Authorization: Bearer <token>`)",
    "403": "Writes are off: courierd has no `http.token`",
    "404": "Unknown order, or no such endpoint",
    "409": "The order cannot be cancelled now (dropped off or expired, or another cancel holds it)",
    "411": "A body sent without Content-Length (chunked)",
    "413": "The body is over 64 KiB",
    "502": "OneTablet refused the request or could not be reached (its message)",
    "503": "The database is unavailable, or too many requests wait for it",
}


def _schemas() -> tuple[dict[tuple[str, str], Schema], dict[str, Schema]]:
    """Every model's schema (by (name, mode)), and the shared definitions."""
    inputs: list[tuple[tuple[str, str], Any, TypeAdapter[Any]]] = [
        (("Error", "serialization"), "serialization", TypeAdapter(m.Error)),
    ]
    for op in OPERATIONS:
        inputs.append(((op.operation_id, "reply"), "serialization", TypeAdapter(op.reply)))
        inputs.append(((op.operation_id, "query"), "validation", TypeAdapter(op.query)))
        if op.body is not None:
            inputs.append(((op.operation_id, "body"), "validation", TypeAdapter(op.body)))
    refs, defs = TypeAdapter.json_schemas(inputs, ref_template=REF)
    return {key: schema for (key, _), schema in refs.items()}, defs.get("$defs", {})


def _parameters(op: Operation, query: Schema, defs: dict[str, Schema]) -> list[Schema]:
    out: list[Schema] = []
    if "{order_id}" in op.path:
        out.append({
            "name": "order_id", "in": "path", "required": True,
            "description": "The order's id (percent-encoded)",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID,
                       "pattern": m.ID_PATTERN},
        })  # fmt: skip
    model = defs.get(query["$ref"].rpartition("/")[2], query) if "$ref" in query else query
    required = set(model.get("required", ()))
    for name, schema in model.get("properties", {}).items():
        schema = dict(schema)
        description = schema.pop("description", None)
        schema.pop("title", None)
        if "anyOf" in schema:  # `X | None` = optional: a query parameter is absent, not null
            schema = {**next(s for s in schema.pop("anyOf") if s != {"type": "null"}), **schema}
            schema.pop("default", None)
        param: Schema = {"name": name, "in": "query", "schema": schema}
        if description:
            param["description"] = description
        if name in required:
            param["required"] = True
        out.append(param)
    return out


def _operation(
    op: Operation, refs: dict[tuple[str, str], Schema], defs: dict[str, Schema]
) -> Schema:
    responses: Schema = {
        "200": {"description": "OK", "content": _json(refs[(op.operation_id, "reply")])}
    }
    for code in sorted({"400", "401", "404", "503", *op.errors}):
        responses[code] = {"$ref": f"#/components/responses/E{code}"}
    out: Schema = {"operationId": op.operation_id, "summary": op.summary}
    parameters = _parameters(op, refs[(op.operation_id, "query")], defs)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": _json(refs[(op.operation_id, "body")]),
        }
    out["responses"] = responses
    return out


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _tighten(defs: dict[str, Schema]) -> None:
    """courierd's strict JSON rules, which the order model's types cannot say."""
    order = defs["OrderDocument"]
    order["description"] = (
        "OneTablet's Order, sent as written; only `id` is required. Integer fields take "
        "integer literals (1250, not 1250.0), of at most 40 characters; no NaN."
    )
    order["properties"]["id"]["pattern"] = m.ID_PATTERN
    store_id = defs["Store"]["properties"]["merchant_supplied_id"]["anyOf"][0]
    store_id.update(maxLength=MAX_ID, pattern=m.TEXT_PATTERN)
    _bound_integers(defs)
    for name in [n for n in defs if n.endswith("Query")]:
        del defs[name]  # they are parameters, not schemas


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


@functools.cache
def _document() -> Schema:
    refs, defs = _schemas()
    paths: dict[str, Schema] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs, defs)
    _tighten(defs)
    error = {"content": _json({"$ref": REF.format(model="Error")})}
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
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs,
            "responses": {
                f"E{code}": {"description": text, **error} for code, text in ERRORS.items()
            },
        },
    }


def document() -> Schema:
    """The document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
