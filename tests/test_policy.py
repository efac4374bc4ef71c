"""Retry policy and reply classification."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from courierd.domain.policy import (
    MAX_RETRY_AFTER,
    Verdict,
    classify,
    parse_retry_after,
    retry_delay,
)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (400, Verdict.FAILED),
        (404, Verdict.FAILED),
        (409, Verdict.FAILED),
        (401, Verdict.UNAUTHORIZED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_classify(status: int, verdict: Verdict) -> None:
    """CONTRACT.md 4.9: 5xx, 408, 429 retried; 401 pauses; other 4xx parked."""
    assert classify(status) is verdict


def test_backoff_follows_schedule_then_caps() -> None:
    """1 s, 5 s, 30 s, then 30 s forever; a longer Retry-After wins, within a cap."""
    assert [retry_delay(n) for n in range(1, 6)] == [1, 5, 30, 30, 30]
    assert retry_delay(1, retry_after=12) == 12
    assert retry_delay(3, retry_after=2) == 30
    assert retry_delay(1, retry_after=10**9) == MAX_RETRY_AFTER


def test_spread_moves_the_schedule_but_never_shortens_retry_after() -> None:
    """A ±10 % spread spreads retries out; a Retry-After is spread too, but only longer."""
    assert retry_delay(3, spread=0.1) == pytest.approx(33.0)
    assert retry_delay(3, spread=-0.1) == pytest.approx(27.0)
    assert retry_delay(1, retry_after=5, spread=-0.1) == pytest.approx(5.5)
    assert retry_delay(1, retry_after=5, spread=0.1) == pytest.approx(5.5)
    assert retry_delay(1, retry_after=5, spread=0.0) == 5


def test_retry_after_seconds_and_http_date() -> None:
    """Retry-After is read as delta-seconds or as an HTTP-date; junk is ignored."""
    assert parse_retry_after("7", now=0) == 7
    assert parse_retry_after(formatdate(1_000_060, usegmt=True), now=1_000_000) == 60
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after(None, now=0) is None


def test_retry_after_extremes_and_zones() -> None:
    """Huge values are capped instead of infinite; an HTTP-date in -0000 is UTC."""
    assert parse_retry_after("9" * 400, now=0) == MAX_RETRY_AFTER
    assert parse_retry_after("86400", now=0) == MAX_RETRY_AFTER
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 -0000", now=0) == 60
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=0) == 60
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=0) == MAX_RETRY_AFTER


@given(st.text())
def test_any_retry_after_is_none_or_a_bounded_wait(value: str) -> None:
    """Whatever a server puts in Retry-After, it is a wait within bounds or ignored."""
    wait = parse_retry_after(value, now=1_000_000)
    assert wait is None or 0 <= wait <= MAX_RETRY_AFTER


@given(
    st.text(st.characters(categories=["Nd", "No"]), min_size=1).filter(lambda s: not s.isascii())
)
def test_non_ascii_digits_are_not_seconds(value: str) -> None:
    """'²' or '٣' (digits to str.isdigit, not to HTTP) is no Retry-After, not a crash."""
    assert parse_retry_after(value, now=0) is None
