"""No input can stop ingest (CONTRACT.md 4.14): hostile payloads through parsing and a
real batch commit, and the safety net that isolates a message that breaks a commit."""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courierd.daemon.ingest import _commit_isolating, commit_messages
from courierd.domain.model import DeadLetter, Status, StatusEvent
from courierd.domain.telemetry import parse
from courierd.store import Store
from tests.hostile import any_topic, hostile_messages

NOW = 1_705_341_900.0  # 2024-01-15T18:05:00Z


@given(st.one_of(hostile_messages(), st.tuples(any_topic, st.binary(max_size=300))))
@settings(max_examples=400, deadline=None)
def test_parse_never_raises_and_keeps_only_storable_values(message: tuple[str, bytes]) -> None:
    """Whatever the bytes: a value or a dead letter, and every string in a value encodes."""
    topic, payload = message
    result = parse(topic, payload, now=NOW)
    if not isinstance(result, DeadLetter):
        for value in vars_of(result):
            if isinstance(value, str):
                value.encode("utf-8")
                assert "\x00" not in value
        for name in ("order_id", "courier_id", "event_id"):
            ident = getattr(result, name, "")
            assert not any(c in ident for c in CONTROLS), (name, ident)  # bad_id


CONTROLS = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def vars_of(value: object) -> list[object]:
    out: list[object] = []
    for name in getattr(value, "__slots__", ()):
        item = getattr(value, name)
        out += vars_of(item) if hasattr(item, "__slots__") else [item]
        if isinstance(item, dict):
            out += [*item.keys(), *item.values()]
    return out


@given(messages=st.lists(hostile_messages(), min_size=1, max_size=8))
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_hostile_batches_commit_and_ingest_goes_on(
    store: Store, messages: list[tuple[str, bytes]]
) -> None:
    """A batch of hostile messages commits on either backend (each a value or a dead
    letter), and a valid event committed afterwards is pushed as usual."""
    raw = [(topic, payload, len(payload)) for topic, payload in messages]
    before = store.db.value("SELECT count(*) FROM dead_letters")
    report = commit_messages(store, raw, NOW)
    assert report.size == len(messages)
    letters = store.db.value("SELECT count(*) FROM dead_letters") - before
    assert letters == sum(report.rejected.values())
    order = f"o-{uuid.uuid4()}"
    event = f'{{"event_id":"{order}","order_id":"{order}","status":"dropoff"}}'.encode()
    ok = commit_messages(store, [("couriers/c-9/status", event, len(event))], NOW)
    assert ok.transitions == 5 and ok.pushes == 5


def test_a_message_that_breaks_the_commit_is_isolated(store: Store) -> None:
    """If a value slips past parsing and breaks the batch's commit (here: a lone surrogate,
    as a parser bug would let through), that one message becomes an `unprocessable` dead
    letter and the rest of the batch commits."""
    good = StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)
    bad = StatusEvent("e\ud800", "o2", "c1", Status.DASHER_CONFIRMED)
    also_good = StatusEvent("e3", "o3", "c1", Status.DASHER_CONFIRMED)
    raw = [
        ("couriers/c1/status", b"good", 4),
        ("couriers/c1/status", b"bad", 3),
        ("couriers/c1/status", b"good too", 8),
    ]
    fx = _commit_isolating(store, raw, [good, bad, also_good], NOW)
    assert sorted(p.order_id for p in fx.pushes) == ["o1", "o3"]
    assert store.db.rows("SELECT reason, payload FROM dead_letters") == [("unprocessable", b"bad")]
    detail = store.db.value("SELECT detail FROM dead_letters")
    assert "UnicodeEncodeError" in detail
    assert store.outbox.get_order("o2") is None


def test_an_oversized_payload_keeps_its_start_and_size(store: Store) -> None:
    """A dead letter keeps the first 4 KiB of the payload and the original size."""
    payload = b'{"pad": "' + b"x" * 200_000 + b'"}'
    commit_messages(store, [("couriers/c1/status", payload[:4096], len(payload))], NOW)
    assert store.db.rows("SELECT reason, length(payload), size FROM dead_letters") == [
        ("too_large", 4096, len(payload))
    ]
