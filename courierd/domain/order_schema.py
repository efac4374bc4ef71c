"""A pydantic model of OneTablet's Order schema, used to check a document before sending.

Only `id` is required (OneTablet answers 400 "missing order id" without it); the other
fields of the API text are checked for type when present. Unknown fields are allowed:
the document is sent exactly as written, so this model only ever reads it.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from courierd.errors import InputError


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


def check_order(document: bytes, source: str) -> str:
    """Validate an order document; return its id, or raise InputError naming the field."""
    try:
        parsed = json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise InputError(f"{source} must hold one JSON object (an order), not a list or value")
    try:
        return OrderDocument.model_validate(parsed).id
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "order"
        count = e.error_count()
        more = f" (and {count - 1} more problem{'s' * (count > 2)})" if count > 1 else ""
        raise InputError(
            f"invalid order in {source}: field {field!r}: {first['msg']}{more}"
        ) from None
