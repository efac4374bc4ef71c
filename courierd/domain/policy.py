"""Retry policy and reply classification: pure functions of numbers and headers."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

# OneTablet's recommended schedule ("Retry Logic": 1 s, 5 s, 30 s), then capped.
RETRY_SCHEDULE: tuple[float, ...] = (1.0, 5.0, 30.0)
# A Retry-After beyond this is treated as this: a typo upstream must not park us for days.
MAX_RETRY_AFTER = 3600.0
# The order commands wait in the foreground: a person is watching, so wait less.
CLI_MAX_RETRY_AFTER = 60.0


class Verdict(enum.StrEnum):
    """What a reply means for the request that got it."""

    DELIVERED = "delivered"
    RETRY = "retry"
    UNAUTHORIZED = "unauthorized"
    FAILED = "failed"


def classify(status: int) -> Verdict:
    """2xx delivered; 408, 429 and 5xx retried; 401 pauses everything; other codes fail."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 401:
        return Verdict.UNAUTHORIZED
    if status in (408, 429) or status >= 500:
        return Verdict.RETRY
    return Verdict.FAILED


def retry_delay(
    failures: int,
    retry_after: float | None = None,
    schedule: Sequence[float] = RETRY_SCHEDULE,
    spread: float = 0.0,
) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1-based).

    `spread` (a fraction, e.g. a random one in ±0.1 from the caller) stretches or
    shrinks the scheduled wait, so orders that failed together do not all retry on the
    same beat after an outage. A longer Retry-After wins, up to MAX_RETRY_AFTER; it is
    spread too, but only ever lengthened: never sooner than OneTablet asked.
    """
    base = schedule[min(max(failures, 1), len(schedule)) - 1] * (1.0 + spread)
    if retry_after is None or retry_after <= base:
        return base
    return min(retry_after, MAX_RETRY_AFTER) * (1.0 + abs(spread))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now` (unix time): delta-seconds or an HTTP-date.

    Never more than MAX_RETRY_AFTER (a 400-digit value would otherwise be infinite), and
    an HTTP-date without a real zone (`-0000`) is UTC, as HTTP dates always are.
    """
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() is also true of '²' or '٣', which float() refuses.
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER) if len(value) < 12 else MAX_RETRY_AFTER
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
