"""The batcher thread (daemon/batcher.py) against a stand-in ingest pipe and sessions:
nothing is acknowledged before its commit, and the last batch's acks are sent while the
ingest process commits the next one. And its Reader, which parses messages as they
arrive."""

from __future__ import annotations

import json
import pickle
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

import pytest

from courierd.daemon.batcher import Batcher, Reader
from courierd.domain.model import (
    BatchReport,
    DeadLetter,
    LocationFix,
    Status,
    StatusEvent,
    iso,
)
from courierd.edges.mqtt import Message, Room
from tests.harness import wait_until


class Log:
    """What happened, in order: ("send", topics), ("commit", topics), ("ack", mids)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.lock = threading.Lock()

    def add(self, kind: str, what: Iterable[Any]) -> None:
        with self.lock:
            self.events.append((kind, tuple(what)))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [what for k, what in self.events if k == kind]


class Pipe:
    """The ingest process: every batch is committed and answered at once."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def send(self, request: tuple[str, Any]) -> None:
        kind, value = request
        if kind == "batch":
            messages, _parsed, _fence = value
            topics = [topic for topic, _payload, _size in messages]
            self.log.add("send", topics)
            self.log.add("commit", topics)
            self.answers.put(("ok", BatchReport(len(messages))))
        else:
            self.answers.put(("ok", None))

    def send_bytes(self, request: memoryview) -> None:
        self.send(pickle.loads(request))

    def poll(self, timeout: float) -> bool:
        return not self.answers.empty()  # answered as sent

    def recv(self) -> tuple[str, Any]:
        return self.answers.get(timeout=5)


class CountedRoom(Room):
    """The real Room, counting how often room was made."""

    def __init__(self) -> None:
        super().__init__()
        self.made_times = 0

    def made(self) -> None:
        self.made_times += 1
        super().made()


class FakeSessions:
    def __init__(self, log: Log) -> None:
        self.log = log
        self.room = CountedRoom()

    def admit(self, batch: list[Message]) -> tuple[list[Message], None]:
        return batch, None

    def ack_many(self, messages: list[Message]) -> None:
        self.log.add("ack", (m.mid for m in messages))


def message(mid: int) -> Message:
    return Message(f"couriers/c{mid}/location", b"{}", mid, 1, 1, 2)


def run_batcher(
    inbox: queue.SimpleQueue[Message], log: Log, reports: list[BatchReport], wait_s: float = 0.0
) -> tuple[Batcher, threading.Event, threading.Thread]:
    batcher = Batcher(
        inbox,
        Pipe(log),  # type: ignore[arg-type]
        FakeSessions(log),  # type: ignore[arg-type]
        size=2,
        wait_s=wait_s,
        on_report=reports.append,
    )
    stop = threading.Event()
    thread = threading.Thread(target=batcher.run, args=(stop,), daemon=True)
    thread.start()
    return batcher, stop, thread


def acked(log: Log) -> list[int]:
    return [mid for mids in log.of("ack") for mid in mids]


def drained(n: int) -> tuple[Log, list[BatchReport]]:
    """Messages 1..n queued, then taken by a batcher until every one is acknowledged."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    log, reports = Log(), list[BatchReport]()
    for mid in range(1, n + 1):
        inbox.put(message(mid))
    _batcher, stop, thread = run_batcher(inbox, log, reports)
    try:
        wait_until(lambda: acked(log) == list(range(1, n + 1)), 5, "every message acknowledged")
    finally:
        stop.set()
        thread.join(5)
    return log, reports


def test_the_next_batch_is_sent_before_the_last_ones_acks() -> None:
    """With more waiting, batch 2 goes to the ingest process first, then batch 1's acks
    (one call for the batch): the ingest process does not wait for them. Fails on the
    batcher that acknowledged each message before sending the next batch."""
    log, reports = drained(4)
    kinds = [kind for kind, _ in log.events]
    assert kinds == ["send", "commit", "send", "commit", "ack", "ack"]
    assert log.of("ack") == [(1, 2), (3, 4)]
    assert [r.size for r in reports] == [2, 2]


def test_nothing_is_acknowledged_before_its_commit() -> None:
    log, _reports = drained(7)
    committed: set[str] = set()
    for kind, what in log.events:
        if kind == "commit":
            committed.update(what)
        elif kind == "ack":
            assert {f"couriers/c{mid}/location" for mid in what} <= committed


def test_with_nothing_more_waiting_the_last_batch_is_acknowledged_at_once() -> None:
    """No next batch to send: the committed one is acknowledged (and reported) without
    waiting for more traffic."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    log, reports = Log(), list[BatchReport]()
    batcher, stop, thread = run_batcher(inbox, log, reports)
    try:
        inbox.put(message(1))
        wait_until(lambda: acked(log) == [1], 2, "the lone message acknowledged")
        wait_until(lambda: len(reports) == 1, 2, "its batch reported")
        assert batcher.inflight() == 0
        assert batcher.sessions.room.made_times >= 1  # type: ignore[attr-defined]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_with_batch_ms_the_last_batch_is_acknowledged_before_waiting_for_more() -> None:
    """With ingest.batch_ms, taking the next batch may wait for more messages, which the
    broker may hold back until it has the last batch's acks (its window): those go out
    first. Fails on the batcher that kept them until the next batch was sent."""
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    log, reports = Log(), list[BatchReport]()
    for mid in (1, 2, 3):
        inbox.put(message(mid))
    _batcher, stop, thread = run_batcher(inbox, log, reports, wait_s=30.0)
    try:
        wait_until(lambda: acked(log) == [1, 2], 10, "batch 1 acknowledged while 3 waits")
        inbox.put(message(4))  # batch 2 complete: no need to wait out batch_ms
        wait_until(lambda: acked(log) == [1, 2, 3, 4], 10, "batch 2 acknowledged")
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


# -- parsing as messages arrive (batcher.Reader) -------------------------------------------


def test_the_reader_judges_a_future_ts_by_courierds_clock_not_the_hosts() -> None:
    """On a shared database courierd's clock is the database's (DbClock): a fix an hour
    ahead of this host is on time if the database is an hour ahead too, and a fix on
    this host's time is in the future if the database is an hour behind. Until the
    ingest process has said where courierd's clock is, it leaves parsing to it."""
    reader = Reader("user")
    now = time.time()
    ahead = json.dumps({"ts": iso(now + 3600), "lat": 41.0, "lng": -73.0}).encode()
    on_time = json.dumps({"ts": iso(now), "lat": 41.0, "lng": -73.0}).encode()
    topic = "couriers/c1/location"
    assert reader(topic, ahead, len(ahead)) is None
    reader.set_clock(0.0)
    refused = reader(topic, ahead, len(ahead))
    assert isinstance(refused, DeadLetter) and refused.reason == "future_ts"
    reader.set_clock(3600.0)
    assert isinstance(reader(topic, ahead, len(ahead)), LocationFix)
    reader.set_clock(-3600.0)
    late = reader(topic, on_time, len(on_time))
    assert isinstance(late, DeadLetter) and late.reason == "future_ts"


def test_after_a_step_of_the_hosts_clock_the_reader_leaves_parsing_to_ingest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The offset was read against this host's clock before it stepped: off by the
    step, it must not judge a ts (the ingest process's DbClock sees the step and reads
    the database's clock again); told again, it parses."""
    reader = Reader("user")
    reader.set_clock(-3600.0)
    real = time.time
    on_time = json.dumps({"ts": iso(real() - 3600), "lat": 41.0, "lng": -73.0}).encode()
    topic = "couriers/c1/location"
    assert isinstance(reader(topic, on_time, len(on_time)), LocationFix)
    monkeypatch.setattr(time, "time", lambda: real() - 3600)  # NTP steps it back an hour
    assert reader(topic, on_time, len(on_time)) is None
    reader.set_clock(0.0)  # the ingest process's next report
    assert isinstance(reader(topic, on_time, len(on_time)), LocationFix)


def test_what_the_reader_made_reaches_the_ingest_process_whole() -> None:
    """Statuses and fixes cross the pipe pickled by their own `__reduce__`: every field
    arrives, the ones equality skips (`raw`) too."""
    sent: list[StatusEvent | LocationFix] = [
        StatusEvent(
            "e1",
            "o1",
            "c1",
            Status.ARRIVED_AT_STORE,
            "2026-12-07T10:00:00.000Z",
            {"full_name": "Ana", "vehicle": {"color": "red"}},
            b'{"raw": true}',
            "geofence",
            (41.5, -73.25),
        ),
        LocationFix("c1", "2026-12-07T10:00:00.000Z", 41.5, -73.25, 4.5, 7.25, -90.0),
    ]
    for value, back in zip(sent, pickle.loads(pickle.dumps(sent, 5)), strict=True):
        assert type(back) is type(value)
        assert len(value.__reduce__()[1]) == len(fields(value))  # a field added: send it
        assert [getattr(back, f.name) for f in fields(value)] == [
            getattr(value, f.name) for f in fields(value)
        ]
