"""Retry policy and reply classification: pure functions of numbers and headers."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from email.utils import parsedate_to_datetime

# OneTablet's recommended schedule ("Retry Logic": 1 s, 5 s, 30 s), then capped.
RETRY_SCHEDULE: tuple[float, ...] = (1.0, 5.0, 30.0)
# A Retry-After beyond this is treated as this: a typo upstream must not park us for days.
MAX_RETRY_AFTER = 3600.0


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
    never shortened.
    """
    base = schedule[min(max(failures, 1), len(schedule)) - 1] * (1.0 + spread)
    if retry_after is None:
        return base
    return max(base, min(retry_after, MAX_RETRY_AFTER))


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now` (unix time): delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
