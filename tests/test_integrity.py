"""Data integrity (CONTRACT.md 12) in the pure core and the ingest path: ids that could
forge log lines, late assignments, colliding event ids, fix-time timers."""

from __future__ import annotations

import json
import logging
import random
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courierd.daemon.ingest import commit_messages
from courierd.domain.lifecycle import CHAIN, active_sql
from courierd.domain.model import DeadLetter, Status, StatusEvent, iso
from courierd.domain.telemetry import parse
from courierd.logs import JsonFormatter, TextFormatter, lean_records, setup_logging
from courierd.store import Store
from tests.test_tracking import T0, a_delivery, assign, drive, fix, statuses_pushed

NOW = 1_705_341_900.0  # 2024-01-15T18:05:00Z

# Characters that end or rewrite a log line: C0, DEL, C1, U+2028, U+2029.
CONTROLS = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x1F),
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),
    st.sampled_from(["\u2028", "\u2029"]),
)
SAFE = st.text(st.characters(codec="utf-8", categories=["L", "N"]), max_size=10)


@st.composite
def control_ids(draw: st.DrawFn) -> str:
    """An otherwise fine id with a control character somewhere in it."""
    return draw(SAFE) + draw(CONTROLS) + draw(SAFE)


@st.composite
def messages_with_a_bad_id(draw: st.DrawFn) -> tuple[str, bytes]:
    """(topic, payload): a valid status or assignment except one id holds a control."""
    bad = draw(control_ids())
    where = draw(st.sampled_from(["order_id", "event_id", "topic", "a_order", "a_courier"]))
    if where.startswith("a_"):
        doc = {"order_id": "o-1", "courier_id": "c-1"}
        doc["order_id" if where == "a_order" else "courier_id"] = bad
        return "dispatch/assignments", json.dumps(doc).encode()
    event = {"event_id": "e-1", "order_id": "o-1", "status": "dasher_confirmed"}
    courier = "c-1"
    if where == "topic":
        courier = bad
    else:
        event[where] = bad
    return f"couriers/{courier}/status", json.dumps(event).encode()


@given(messages_with_a_bad_id())
def test_an_id_with_a_control_character_is_a_bad_id(message: tuple[str, bytes]) -> None:
    """Order, event and courier ids (topic or assignment) with a control are bad_id."""
    result = parse(*message, now=NOW)
    assert isinstance(result, DeadLetter) and result.reason == "bad_id", result


@given(control_ids())
def test_an_owntracks_user_with_a_control_character_is_a_bad_id(user: str) -> None:
    """The OwnTracks courier id (from the topic) is held to the same rule."""
    fix = b'{"_type": "location", "tst": 1705341890, "lat": 40.7, "lon": -74.0}'
    result = parse(f"owntracks/{user}/phone", fix, now=NOW)
    assert isinstance(result, DeadLetter) and result.reason == "bad_id", result


@given(messages=st.lists(messages_with_a_bad_id(), min_size=1, max_size=5))
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_bad_ids_are_dead_letters_and_nothing_is_pushed(
    store: Store, messages: list[tuple[str, bytes]]
) -> None:
    """Through the real ingest commit: each is a bad_id dead letter, no order, no push."""
    before = store.db.value("SELECT count(*) FROM dead_letters WHERE reason = 'bad_id'")
    report = commit_messages(store, [(t, p, len(p)) for t, p in messages], NOW)
    assert report.rejected == {"bad_id": len(messages)}
    after = store.db.value("SELECT count(*) FROM dead_letters WHERE reason = 'bad_id'")
    assert after - before == len(messages)
    assert store.db.value("SELECT count(*) FROM outbox") == 0
    assert store.db.value("SELECT count(*) FROM orders WHERE state <> 'new'") == 0


def _record(value: str) -> logging.LogRecord:
    return logging.LogRecord("courierd", logging.INFO, "x", 1, "ingest.batch id=%s", (value,), None)


@given(st.text(max_size=40), CONTROLS, st.text(max_size=40))
def test_the_log_formats_keep_one_event_on_one_line(head: str, control: str, tail: str) -> None:
    """Whatever a logged value holds, text and JSON logs write one line with no control."""
    value = head + control + "INFO forged line" + tail
    text = TextFormatter("%(levelname)s %(message)s").format(_record(value))
    line = JsonFormatter().format(_record(value))
    for out in (text, line):
        assert out.splitlines() == [out]  # str.splitlines knows every line separator
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
        out.encode("utf-8")  # lone surrogates escaped too
    assert json.loads(line)["msg"] == f"ingest.batch id={value}"


def test_lean_log_records_write_the_same_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingest process makes its records without the caller's place, thread and
    process (`lean_records`): each format still writes the very same line."""
    for switch in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, getattr(logging, switch))  # put back after
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    kept: list[logging.LogRecord] = []
    logger = logging.getLogger("courierd.daemon.ingest")
    caplog.set_level(logging.INFO, logger=logger.name)
    monkeypatch.setattr(logger, "handle", kept.append)
    for lean in (False, True):
        if lean:
            lean_records()
        logger.info("ingest.transition order_id=%s status=%s inferred=%s", "o\n1", "dropoff", 0)
    full, lean_one = kept
    assert full.lineno > 0 and lean_one.lineno == 0  # no walk up the stack for it
    lean_one.created, lean_one.msecs = full.created, full.msecs
    for fmt in ("text", "json"):
        setup_logging("INFO", fmt)
        formatter = root.handlers[0].formatter
        assert formatter is not None
        assert formatter.format(lean_one) == formatter.format(full)


@given(st.text(max_size=40), CONTROLS, st.text(max_size=40))
def test_a_traceback_cannot_forge_a_line_or_lose_the_record(
    head: str, control: str, tail: str
) -> None:
    """An exception's message is outside text too: in the text log every traceback line
    is indented and escaped, so none starts like a line of courierd's own."""
    value = head + control + "\n2024-01-15T18:05:00.000Z INFO forged line\ud800" + tail
    try:
        raise ValueError(value)
    except ValueError:
        record = _record("x")
        record.exc_info = sys.exc_info()
    text = TextFormatter("%(levelname)s %(message)s").format(record)
    first, *rest = text.split("\n")
    assert first == "INFO ingest.batch id=x" and rest
    assert all(line.startswith("  ") for line in rest)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text.replace("\n", ""))
    assert len(text.splitlines()) == len(rest) + 1  # no other line separator left
    text.encode("utf-8")  # the lone surrogate escaped


# -- assignments out of order ------------------------------------------------------------


def _assignment(order: str, courier: str, ts: str | None) -> bytes:
    doc = {"order_id": order, "courier_id": courier}
    if ts is not None:
        doc["ts"] = ts
    return json.dumps(doc).encode()


def _bound_courier(store: Store, order: str) -> str | None:
    courier: str | None = store.db.value(
        "SELECT courier_id FROM orders WHERE order_id = ?", (order,)
    )
    return courier


@given(
    stamps=st.lists(st.integers(0, 10_000), min_size=1, max_size=6, unique=True),
    order=st.randoms(use_true_random=False),
    cuts=st.lists(st.integers(1, 6), max_size=3),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_permutation_of_assignments_binds_the_latest(
    store: Store, stamps: list[int], order: random.Random, cuts: list[int]
) -> None:
    """Through the real ingest commit, in any arrival order and any batching, the order
    ends up bound to the courier of the assignment with the latest ts."""
    order_id = f"o-{uuid.uuid4()}"
    sent = [(f"c-{s}", iso(NOW - 20_000 + s)) for s in stamps]
    arrival = list(sent)
    order.shuffle(arrival)
    payloads = [_assignment(order_id, c, ts) for c, ts in arrival]
    raw = [("dispatch/assignments", p, len(p)) for p in payloads]
    start = 0
    for cut in [*cuts, len(raw)]:
        if start < len(raw):
            commit_messages(store, raw[start : start + cut], NOW)
            start += cut
    commit_messages(store, raw[start:], NOW)
    assert _bound_courier(store, order_id) == max(sent, key=lambda a: a[1])[0]


def test_an_assignment_without_ts_never_replaces_one_with_ts(store: Store) -> None:
    """Without ts it is older than any with one; among those without, the last wins."""
    first = _assignment("o-1", "c-a", None)
    second = _assignment("o-1", "c-b", None)
    commit_messages(store, [("dispatch/assignments", p, len(p)) for p in (first, second)], NOW)
    assert _bound_courier(store, "o-1") == "c-b"
    stamped = _assignment("o-1", "c-c", iso(NOW - 3600))
    commit_messages(store, [("dispatch/assignments", stamped, len(stamped))], NOW)
    assert _bound_courier(store, "o-1") == "c-c"
    report = commit_messages(store, [("dispatch/assignments", first, len(first))], NOW)
    assert _bound_courier(store, "o-1") == "c-c"
    assert report.tracking == {"ignored_stale_assignment": 1}


def test_an_assignment_never_rebinds_a_finished_order(store: Store) -> None:
    """Dropped off, cancelled or expired: a late assignment is counted and ignored, so
    the finished order never comes back onto a courier (the watchdog, the page)."""
    store.writer.commit([StatusEvent("e1", "done", "c-a", Status.DROPOFF)], now=NOW)
    store.writer.commit([StatusEvent("e2", "gone", "c-a", Status.DASHER_CONFIRMED)], now=NOW)
    store.writer.commit([StatusEvent("e3", "idle", "c-a", Status.DASHER_CONFIRMED)], now=NOW)
    store.db.execute("UPDATE orders SET state = 'cancelled' WHERE order_id = 'gone'")
    assert store.expiry.step(NOW + 25 * HOUR) == ["idle"]
    late = [_assignment(o, "c-b", iso(NOW + 25 * HOUR)) for o in ("done", "gone", "idle")]
    report = commit_messages(
        store, [("dispatch/assignments", p, len(p)) for p in late], NOW + 25 * HOUR
    )
    assert [_bound_courier(store, o) for o in ("done", "gone", "idle")] == ["c-a"] * 3
    assert report.tracking == {"ignored_finished_assignment": 3}


def test_an_assignment_from_the_future_is_a_dead_letter() -> None:
    """A ts more than 5 minutes ahead would pin the order for good: future_ts."""
    result = parse("dispatch/assignments", _assignment("o", "c", iso(NOW + 3600)), now=NOW)
    assert isinstance(result, DeadLetter) and result.reason == "future_ts"


def test_an_assignment_refused_as_ahead_on_arrival_is_judged_again_at_commit(
    store: Store,
) -> None:
    """Parsed on arrival by a clock an hour behind (a step the MQTT process had not seen
    yet), an assignment is too far ahead; the ingest process, which alone decides a
    refusal, judges it again by courierd's clock at commit, and binds the order."""
    payload = _assignment("o-1", "c-a", iso(NOW))
    early = parse("dispatch/assignments", payload, now=NOW - 3600)
    assert isinstance(early, DeadLetter) and early.reason == "future_ts"
    message = ("dispatch/assignments", payload, len(payload))
    report = commit_messages(store, [message], NOW, parsed=[early])
    assert report.rejected == {} and report.kinds == {"assignment": 1}
    assert _bound_courier(store, "o-1") == "c-a"


# -- event ids are per order -------------------------------------------------------------

# A small pool, so that the two couriers' apps pick the same ids, inferred ones included.
EVENT_IDS = st.sampled_from(["1", "2", "3", "geo:{A}:arriving_at_store", "geo:{B}:dropoff"])
APP_EVENTS = st.lists(st.tuples(EVENT_IDS, st.sampled_from(list(CHAIN))), max_size=6)


def _alone(events: list[tuple[str, Status]]) -> list[str]:
    """What one order pushes from its own events: an id seen before for it is a duplicate,
    and the furthest status reached is pushed with every one before it, once each."""
    seen: set[str] = set()
    furthest = -1
    for event_id, status in events:
        if event_id not in seen:
            seen.add(event_id)
            furthest = max(furthest, CHAIN.index(status))
    return [s.value for s in CHAIN[: furthest + 1]]


@given(
    a=APP_EVENTS,
    b=APP_EVENTS,
    merge=st.lists(st.booleans(), min_size=12, max_size=12),
    cuts=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_two_couriers_event_ids_never_touch_each_others_orders(
    store: Store,
    a: list[tuple[str, Status]],
    b: list[tuple[str, Status]],
    merge: list[bool],
    cuts: list[int],
) -> None:
    """Through the real ingest commit, any interleaving and batching of two couriers'
    events, ids colliding on purpose: each order pushes what its own events alone make."""
    run = uuid.uuid4().hex[:8]
    orders = {"A": f"A-{run}", "B": f"B-{run}"}
    queues = {"A": list(a), "B": list(b)}
    raw = []
    for take_a in [*merge, *[True] * len(a), *[False] * len(b)]:
        who = "A" if take_a else "B"
        if queues[who]:
            event_id, status = queues[who].pop(0)
            doc = {
                "event_id": event_id.format(**orders),
                "order_id": orders[who],
                "status": status.value,
            }
            raw.append((f"couriers/c{who}-{run}/status", json.dumps(doc).encode()))
    start, i = 0, 0
    while start < len(raw):
        size = cuts[i % len(cuts)]
        commit_messages(store, [(t, p, len(p)) for t, p in raw[start : start + size]], NOW)
        start, i = start + size, i + 1
    for who, events in (("A", a), ("B", b)):
        pushed = store.db.rows(
            "SELECT status FROM outbox WHERE order_id = ? ORDER BY id", (orders[who],)
        )
        assert [s for (s,) in pushed] == _alone(events), who


def test_an_app_cannot_squat_the_ids_of_inferred_statuses(store: Store) -> None:
    """Another courier's app, and the order's own, speak the ids the geofence gives its
    statuses (`geo:{order}:{status}`): the fixes still infer and push every one."""
    squat = [f"geo:o1:{s.value}" for s in CHAIN[1:4]]
    store.writer.commit(
        [
            assign("o1", "c1"),
            *(StatusEvent(e, "o2", "c2", s) for e, s in zip(squat, CHAIN, strict=False)),
            StatusEvent(squat[0], "o1", "c1", Status.DASHER_CONFIRMED),
        ],
        now=T0,
    )
    drive(store, a_delivery())
    assert statuses_pushed(store, "o1") == [
        ("dasher_confirmed", "app"),
        ("arriving_at_store", "geofence"),
        ("arrived_at_store", "geofence"),
        ("dasher_out_for_delivery", "geofence"),
    ]


# -- geofence timers on fix time ---------------------------------------------------------


def test_departure_after_an_arrival_without_ts_runs_on_fix_time(store: Store) -> None:
    """The app says arrived_at_store without a ts, live; the courier's fixes come an hour
    late from its buffer: parked at the store, then away. The departure is inferred
    from the fixes' own times (the receive time of the arrival never enters)."""
    route = a_delivery()
    late = route[-1][0] + 3600  # every fix reaches courierd an hour after it was taken
    store.writer.commit(
        [assign("o1", "c1"), StatusEvent("e1", "o1", "c1", Status.ARRIVED_AT_STORE)], now=late
    )
    for t, at in route[15:]:  # from the first fix parked at the store (a_delivery's)
        store.writer.commit([fix(t, at)], now=late)
    assert statuses_pushed(store, "o1")[-1] == ("dasher_out_for_delivery", "geofence")


# -- abandoned orders expire -------------------------------------------------------------

HOUR = 3600.0


def test_an_order_idle_for_abandon_after_h_expires_and_leaves_the_active_set(
    store: Store,
) -> None:
    """Only the order with no transition and no accepted fix for 24 h expires: it is no
    longer active (orders, watchdog), `order show` says expired, nothing is pushed."""
    events = [
        StatusEvent("e1", "idle", "c-idle", Status.DASHER_CONFIRMED),
        StatusEvent("e2", "moving", "c-moving", Status.DASHER_CONFIRMED),
        StatusEvent("e3", "fixing", "c-fixing", Status.DASHER_CONFIRMED),
        StatusEvent("e4", "done", "c-done", Status.DROPOFF),
    ]
    store.writer.commit(events, now=T0)
    pushes = store.db.value("SELECT count(*) FROM outbox")
    later = T0 + 24 * HOUR + 60
    store.writer.commit([StatusEvent("e5", "moving", "c-moving", Status.DROPOFF)], now=later)
    store.writer.commit([fix(later - 30, (40.7, -74.0), "c-fixing")], now=later)
    pushes += 4  # moving's
    assert store.expiry.step(later) == ["idle"]
    assert store.expiry.step(later) == []
    view = store.queries.order_view("idle")
    assert view is not None and view["state"] == "expired"
    active, _ = store.queries.order_page(state="active", courier_id=None, limit=10, after=None)
    assert [o["order_id"] for o in active] == ["fixing"]
    assert store.db.value("SELECT count(*) FROM outbox") == pushes
    # The watchdog no longer counts it: its silent courier has no active order.
    assert "c-idle" not in store.notices.report_silent(later, 300.0)


def test_events_for_an_expired_order_are_dead_letters_and_retention_prunes_it(
    store: Store,
) -> None:
    """A later event for an expired order is rejected (`expired`) and pushes nothing;
    retention then deletes it like a finished order."""
    store.writer.commit([StatusEvent("e1", "o1", "c1", Status.DASHER_CONFIRMED)], now=T0)
    expired_at = T0 + 25 * HOUR
    assert store.expiry.step(expired_at) == ["o1"]
    fx = store.writer.commit(
        [StatusEvent("e2", "o1", "c1", Status.ARRIVED_AT_STORE)], now=expired_at + 1
    )
    assert fx.pushes == [] and [d.reason for d in fx.dead_letters] == ["expired"]
    store.db.execute("UPDATE outbox SET state = 'delivered'")  # OneTablet took its push
    assert store.retention.step(expired_at + 29 * 86400).orders == 0  # 30 days from expiry
    assert store.retention.step(expired_at + 31 * 86400).orders == 1
    assert store.queries.order_view("o1") is None


def test_looking_for_abandoned_orders_uses_its_partial_index(sqlite_store: Store) -> None:
    """The expiry round reads only idle active orders (an index), not every order kept."""
    plan = [
        r[3]
        for r in sqlite_store.db.rows(
            "EXPLAIN QUERY PLAN SELECT order_id FROM orders AS o WHERE "
            f"{active_sql()} AND updated_at < ?",
            ("2024-01-01",),
        )
    ]
    assert any("USING INDEX orders_idle" in step for step in plan), plan
