"""The dispatch API's models: what its requests may hold (they validate every query
string and cancel body) and what its replies hold. openapi.py generates the OpenAPI
document from these, so the document cannot drift from what is checked.

Replies are TypedDicts: the store's queries return plain dicts, and these say what is
in them (schemathesis checks a live daemon's replies against the document).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, create_model
from typing_extensions import TypedDict

from courierd.config import GeofenceSettings
from courierd.domain.fields import MAX_ID
from courierd.domain.model import CANCEL_REASONS, CANCELLED, EXPIRED, NEW, Status

STATES = (NEW, *(s.value for s in Status), CANCELLED, EXPIRED)
MAX_LIMIT, DEFAULT_LIMIT = 500, 50
MAX_DETAILS = 1000
ID_PATTERN = "^[^/\\u0000]+$"  # one path segment, no NUL (courierd's text rule)
TEXT_PATTERN = "^[^\\u0000]*$"
CLOSED = ConfigDict(extra="forbid")


def _digits(value: Any) -> Any:
    """A count as a query string writes it: digits only (no sign, no spaces), and few of
    them (a long one is refused before it is read; the field's own bounds then apply)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,6}", value):
        raise ValueError("must be an integer written in digits")
    return value


Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT), BeforeValidator(_digits)]
if TYPE_CHECKING:
    StateFilter = str
    Reason = str
else:  # from the model's own lists, so a new state is taken as it is added
    StateFilter = Literal[(*STATES, "active")]
    Reason = Literal[CANCEL_REASONS]


# -- requests -----------------------------------------------------------------------


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderListQuery(_Query):
    state: StateFilter | None = Field(
        None, description="Only orders in this state (`active`: not finished)"
    )
    courier_id: (
        Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID, pattern=TEXT_PATTERN)] | None
    ) = Field(None, description="Only this courier's orders")
    limit: Limit = Field(DEFAULT_LIMIT, description=f"How many (default {DEFAULT_LIMIT})")
    cursor: Annotated[StrictStr, Field(json_schema_extra={"format": "courierd-cursor"})] | None = (
        Field(None, description="The `next_cursor` of the previous page, as given")
    )


class LimitQuery(_Query):
    limit: Limit = Field(DEFAULT_LIMIT, description=f"How many (default {DEFAULT_LIMIT})")


class NoQuery(_Query):
    pass


def _overrides() -> type[_Query]:
    """`GET /v1/orders/{order_id}/replay`'s query: any `geofence.*` setting replay's
    `--set` takes, typed and bounded as the settings file has it (config.py). The values
    then go through `courierd replay`'s own check (commands/replay.py `rules_with`)."""
    fields: dict[str, Any] = {}
    for name, info in GeofenceSettings.model_fields.items():
        if name == "enabled":  # replay runs the rules: it cannot turn them off
            continue
        finite = [Field(allow_inf_nan=False)] if info.annotation is float else []
        extra = (*info.metadata, *finite)
        kind: Any = Annotated[(info.annotation, *extra)] if extra else info.annotation
        fields[name] = (
            kind | None,
            Field(
                None,
                alias=f"geofence.{name}",
                description=f"Replay with `geofence.{name}` set to this, as `courierd "
                f"replay --set` does (the setting's default is {info.default})",
            ),
        )
    model: type[_Query] = create_model("ReplayQuery", __base__=_Query, **fields)
    return model


ReplayQuery = _overrides()


class SuggestionsQuery(_Query):
    min_orders: Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_digits)] = Field(
        3, description="Stays at a store needed for a suggestion (default 3, as the command)"
    )


class CancelRequest(BaseModel):
    """`POST /v1/orders/{order_id}/cancel`'s body (or none: reason OTHER)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: Reason = "OTHER"
    details: Annotated[str, Field(max_length=MAX_DETAILS, pattern=TEXT_PATTERN)] | None = None


# -- replies ------------------------------------------------------------------------


class Error(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    error: str
    message: str


class Place(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    lat: float
    lng: float
    radius_m: float | None


class Circle(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    lat: float
    lng: float
    radius_m: float
    exit_radius_m: float


class Eta(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    to: Literal["pickup", "dropoff"]
    distance_m: float
    seconds: float


class OrderSummary(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    order_id: str
    state: str
    courier_id: str | None
    updated_at: str
    status_at: str | None
    cancelling: bool


class OrderList(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    orders: list[OrderSummary]
    next_cursor: str | None


class Transition(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    status: str
    at: str
    inferred: bool
    source: str
    event_id: str | None
    lat: NotRequired[float]
    lng: NotRequired[float]


class Push(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    status: str
    state: str
    delivered: bool
    attempts: int
    last_error: str | None
    idempotency_key: str


class Places(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    pickup: Place | None
    dropoff: Place | None


class OrderView(TypedDict):
    """`courierd order show`'s document; it may gain fields, these are there."""

    order_id: str
    state: str
    courier_id: str | None
    cancelled: bool
    cancelling: bool
    transitions: list[Transition]
    pushes: list[Push]
    courier_last_seen: str | None
    courier_offline: bool
    eta: Eta | None
    places: Places


class Fix(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    ts: str
    lat: float
    lng: float
    accuracy_m: float | None
    speed_mps: float | None
    heading: float | None


class CourierEta(Eta):
    order_id: str


class Courier(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    courier_id: str
    fix: Fix | None
    last_seen: str | None
    offline: bool
    active_order_ids: list[str]
    eta: CourierEta | None


class CourierList(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    couriers: list[Courier]


class DeadLetter(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    id: int
    received_at: str
    topic: str
    reason: str
    detail: str | None
    payload: str
    size: int


class Health(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    status: str
    reasons: list[str]


class CourierOffline(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    courier_id: str
    last_seen: str | None
    order_ids: list[str]


class Outbox(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    pending: int
    oldest_pending_age_s: float | None
    failed: int
    held: int
    dead_letters: int


class Dashboard(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    at: str
    health: Health
    auth_paused: bool
    orders_by_state: dict[str, int]
    active_orders: list[OrderSummary]
    active_total: int
    active_truncated: bool
    couriers_offline: list[CourierOffline]
    outbox: Outbox
    dead_letters: list[DeadLetter]


class TrackPoint(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    ts: str
    lat: float
    lng: float
    accuracy_m: float | None


class TrackTransition(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    status: str
    source: str
    at: str
    lat: float | None
    lng: float | None


class Track(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    order_id: str
    state: str
    courier_id: str | None
    since: str
    until: str | None
    points: list[TrackPoint]
    truncated: bool
    pickup: Circle | None
    dropoff: Circle | None
    transitions: list[TrackTransition]


class LatLng(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    lat: float
    lng: float


class ReplayStatus(TypedDict):
    """One geofence status: decided live (`was`, where) and under the overrides
    (`would_be`, where); either null when it did not / would not fire."""

    __pydantic_config__ = CLOSED  # type: ignore[misc]
    status: str
    was: str | None
    would_be: str | None
    shift_s: float | None
    changed: bool
    was_at: LatLng | None
    would_be_at: LatLng | None


class OrderReplay(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    order_id: str
    overrides: dict[str, float | bool]
    fixes: int
    missing_fixes: int
    changed: bool
    statuses: list[ReplayStatus]


class StoreSuggestion(TypedDict):
    """`courierd stores suggest --json`'s store, with the registered point beside it."""

    __pydantic_config__ = CLOSED  # type: ignore[misc]
    merchant_supplied_id: str
    lat: float
    lng: float
    radius_m: float
    visits: int
    moved_m: float
    registered: Place


class StoreSuggestions(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    stores: list[StoreSuggestion]


class SubmitReply(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    order_id: str
    status: int
    reply: Any


class CancelReply(TypedDict):
    __pydantic_config__ = CLOSED  # type: ignore[misc]
    order_id: str
    cancelled: bool
    dropped_pushes: int
    status: int
    reply: Any
