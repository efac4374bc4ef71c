"""A pydantic model of OneTablet's Order schema, used to check a document before sending.

Only `id` is required (OneTablet answers 400 "missing order id" without it); the other
fields of the API text are checked for type when present. Unknown fields are allowed:
the document is sent exactly as written, so this model only ever reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from courierd.domain import fields
from courierd.errors import InputError, TelemetryError


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class StoreBusiness(_Part):
    auto_release_enabled: StrictBool | None = None


class Store(_Part):
    merchant_supplied_id: StrictStr | None = None
    provider_type: StrictStr | None = None
    timezone: StrictStr | None = None
    store_business: StoreBusiness | None = None


class Consumer(_Part):
    id: StrictInt | StrictStr | None = None
    email: StrictStr | None = None
    first_name: StrictStr | None = None
    last_name: StrictStr | None = None
    phone: StrictStr | None = None


class Item(_Part):
    merchant_supplied_id: StrictStr | None = None
    name: StrictStr | None = None
    quantity: StrictInt | None = Field(None, ge=1)
    price: StrictInt | None = Field(None, ge=0)  # cents
    consumer_name: StrictStr | None = None
    special_instructions: StrictStr | None = None
    extras: list[object] | None = None


class Category(_Part):
    merchant_supplied_id: StrictStr | None = None
    name: StrictStr | None = None
    items: list[Item] | None = None


class DeliveryAddress(_Part):
    street: StrictStr | None = None
    city: StrictStr | None = None
    state: StrictStr | None = None
    zip_code: StrictStr | None = None
    lat: StrictStr | None = None  # the API text sends coordinates as strings
    lng: StrictStr | None = None
    address_instructions: StrictStr | None = None


class OrderDocument(_Part):
    id: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[^/]+$")
    store_order_cart_id: StrictStr | None = None
    delivery_short_code: StrictStr | None = None
    store: Store | None = None
    consumer: Consumer | None = None
    categories: list[Category] | None = None
    order_special_instructions: StrictStr | None = None
    subtotal: StrictInt | None = None
    tax: StrictInt | None = None
    merchant_tip_amount: StrictInt | None = None
    is_pickup: StrictBool | None = None
    estimated_pickup_time: StrictStr | None = None
    fulfillment_type: StrictStr | None = None
    delivery_address: DeliveryAddress | None = None
    delivery_fee: StrictInt | None = None
    experience: StrictStr | None = None
    commission_type: StrictStr | None = None
    is_tax_remitted_by_platform: StrictBool | None = None
    tax_amount_remitted_by_platform: StrictInt | None = None
    tax_transaction_id: StrictStr | None = None
    applied_discounts: list[object] | None = None


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """What courierd keeps of a submitted order: its id, store and delivery point."""

    order_id: str
    store_id: str | None
    address: tuple[float, float] | None  # delivery_address lat/lng, when they are numbers


def check_order(document: bytes, source: str) -> OrderFacts:
    """Validate an order document, or raise InputError naming the field.

    The JSON must be strict (what `fields.load_object` accepts: no NaN, no runaway
    nesting or digits); the document itself is sent to OneTablet exactly as written.
    """
    try:
        parsed = fields.load_object(document)
    except TelemetryError as e:
        if e.reason == "not_object":
            raise InputError(f"{source} must hold one JSON object (an order): {e.detail}") from None
        raise InputError(f"{source} is not valid JSON: {e.detail}") from None
    try:
        order = OrderDocument.model_validate(parsed)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "order"
        count = e.error_count()
        more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
        raise InputError(
            f"invalid order in {source}: field {field!r}: {first['msg']}{more}"
        ) from None
    try:
        order_id = fields.check_text(order.id, "id", fields.MAX_ID)
        store = order.store.merchant_supplied_id if order.store else None
        store_id = None if store is None else fields.check_text(store, "store", fields.MAX_ID)
    except TelemetryError as e:
        raise InputError(f"invalid order in {source}: {e.detail}") from None
    return OrderFacts(order_id, store_id, _point(order.delivery_address))


def _point(address: DeliveryAddress | None) -> tuple[float, float] | None:
    """The API text sends coordinates as strings; a point only if both are real ones."""
    if address is None or address.lat is None or address.lng is None:
        return None
    try:
        lat, lng = float(address.lat), float(address.lng)
    except ValueError:
        return None
    if not (math.isfinite(lat) and math.isfinite(lng)):
        return None
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        return None
    return lat, lng
