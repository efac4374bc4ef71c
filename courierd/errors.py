"""One exception tree for courierd.

    CourierdError
    ├── ConfigError          startup only → exit 2
    ├── InputError           bad CLI input (order file, arguments) → exit 2, nothing sent
    ├── TelemetryError       bad topic/payload → dead letter, ack, go on
    ├── StoreError           cannot open or migrate the database → exit 1
    │   ├── StoreUnavailable disk full, locked, connection lost → nothing written; retry
    │   └── FencedOut        these MQTT slots are another instance's now → drop, no ack
    └── OneTabletError
        ├── Unavailable      timeout, connection, 5xx, 408, 429 (retry_after) → retry
        ├── Unauthorized     401 → global pause, health red
        └── Rejected         other 4xx → parked as failed, shown to operators

Events the lifecycle refuses (cancelled order, wrong courier) are not exceptions: the
pure core returns them as an outcome, because they are ordinary, expected results.
"""

from __future__ import annotations


class CourierdError(Exception):
    """Base of every error courierd raises on purpose."""


class ConfigError(CourierdError):
    """A setting is missing or invalid; the message names the key and its variable."""


class InputError(CourierdError):
    """A command's input is invalid; nothing was sent."""


class TelemetryError(CourierdError):
    """An MQTT message cannot be used. `reason` is a stable code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StoreError(CourierdError):
    """The database cannot be used (cannot be opened, newer schema, held by a daemon)."""


class StoreUnavailable(StoreError):
    """The database failed this time (full, locked, I/O, connection lost): nothing was
    written, and the same work can be tried again later."""


class FencedOut(StoreError):
    """The batch came through MQTT sessions this instance no longer holds (another one
    took them over while it was paused): nothing written, and it must not be acked."""


class OneTabletError(CourierdError):
    """A call to OneTablet did not succeed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unavailable(OneTabletError):
    """Worth retrying later: timeout, connection error, 5xx, 408, 429."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class Unauthorized(OneTabletError):
    """OneTablet refused the API key (401): every push pauses until it works again."""


class Rejected(OneTabletError):
    """OneTablet refused this request (a 4xx other than 401/408/429): do not retry."""
