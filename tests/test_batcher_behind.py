"""The batch sent behind the one committing (daemon/batcher.py), through the real path: a
real Mosquitto, real MQTT sessions (Sessions, its edges) filling the inbox, the batcher
thread, and the real ingest process at the other end of a real Pipe, committing to SQLite.

While the ingest process commits a batch (held there: SIGSTOP, or a database locked by
another connection), the full batch waiting in the inbox is taken and sent behind it; it
counts as received and not acknowledged and in the window, and it is committed only after
the batch before it (a retried one too: the ingest process skips it until the retry).
Each test fails on the batcher before, which left the next batch in the inbox until the
last one was committed.

Every message is a payload that is not JSON: each becomes a dead letter, whose ids tell
the order in which the messages were committed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Literal

import pytest

from courierd.config import IngestSettings, MqttSettings, Settings, StoreSettings
from courierd.daemon.batcher import Batcher
from courierd.daemon.ipc import ingest_process
from courierd.daemon.sessions import SHARED_KINDS, Sessions
from courierd.domain.model import BatchReport
from courierd.domain.telemetry import SUBSCRIPTIONS
from courierd.edges.mqtt import Message
from tests.harness import Broker, Publisher, wait_until

pytestmark = pytest.mark.integration
BATCH = 5  # the window (Receive Maximum) is twice this: one batch commits, one waits


def topic(n: int) -> str:
    return f"couriers/c{n:02d}/location"


@dataclass
class Line:
    """The MQTT process's intake, its batcher not yet started (`start`)."""

    db: Path
    inbox: queue.SimpleQueue[Message]
    sessions: Sessions
    pipe: Connection
    ingest: BaseProcess
    port: int
    batcher: Batcher = field(init=False)
    reports: list[BatchReport] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.batcher = Batcher(
            self.inbox,
            self.pipe,
            self.sessions,
            size=BATCH,
            wait_s=0.0,
            on_report=self.reports.append,
        )

    def start(self) -> None:
        self.thread = threading.Thread(target=self.batcher.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def publish(self, numbers: range, payload: bytes = b"not json") -> None:
        """QoS 1 messages, each acknowledged by the broker."""
        publisher = Publisher(self.port, "courier-app")
        try:
            for n in numbers:
                publisher.publish(topic(n), payload)
        finally:
            publisher.close()

    def window_waiting(self) -> None:
        """Until the inbox holds the window (the broker holds the rest)."""
        wait_until(lambda: self.inbox.qsize() == 2 * BATCH, 15, "the window in the inbox")

    def committed(self) -> list[str]:
        """The messages committed, in the order of their commits."""
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            return [t for (t,) in db.execute("SELECT topic FROM dead_letters ORDER BY id")]

    def sent_behind_the_one_committing(self) -> None:
        """Until the batch waiting is in hand beside the one committing."""
        wait_until(
            lambda: self.batcher.in_hand == 2 * BATCH,
            10,
            "the waiting batch taken and sent behind the one committing",
        )

    def two_batches_in_hand(self, messages: int) -> None:
        """With the ingest process stopped: `messages` published, the window waiting, the
        batcher started, until it has sent the first batch and the one behind it."""
        self.pause_ingest()
        self.publish(range(messages))
        self.window_waiting()
        self.start()
        self.sent_behind_the_one_committing()
        assert self.inbox.qsize() == 0

    def pause_ingest(self) -> None:
        assert self.ingest.pid is not None
        os.kill(self.ingest.pid, signal.SIGSTOP)

    def resume_ingest(self) -> None:
        assert self.ingest.pid is not None
        os.kill(self.ingest.pid, signal.SIGCONT)


@contextlib.contextmanager
def intake(
    tmp_path: Path,
    *,
    shared: bool = False,
    busy_timeout_s: float = 10.0,
    protocol: Literal["5", "3.1.1"] = "5",
) -> Iterator[Line]:
    """A broker, the ingest process (ready), and the MQTT sessions subscribed: alone
    (slot 0), or a cluster's slot 0 at epoch 1 (`shared`)."""
    broker = Broker(tmp_path / "broker").start()
    db = tmp_path / "courierd.db"
    settings = Settings(
        mqtt=MqttSettings(url=broker.url, client_id="courierd-prefetch", protocol=protocol),
        store=StoreSettings(path=db, busy_timeout_s=busy_timeout_s),
        ingest=IngestSettings(batch_size=BATCH),
    )
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    wake_reader, wake_writer = ctx.Pipe(duplex=False)
    ingest = ctx.Process(
        target=ingest_process, args=(settings, theirs, wake_writer, "test"), daemon=True
    )
    ingest.start()
    theirs.close()
    wake_writer.close()
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    sessions = Sessions(
        settings.mqtt,
        inbox,
        receive_max=settings.ingest.receive_maximum,
        subscriptions=SHARED_KINDS if shared else SUBSCRIPTIONS,
        unsubscriptions=(),
        shared=shared,
    )
    line = Line(db, inbox, sessions, ours, ingest, broker.port)
    try:
        assert ours.poll(30), "the ingest process did not start"
        assert ours.recv()[0] == "ready"
        sessions.hold({0: 1 if shared else 0})
        wait_until(sessions.subscribed, 15, "the session subscribed")
        yield line
    finally:
        line.stop.set()
        line.resume_ingest()
        if line.thread is not None:
            line.thread.join(15)
        sessions.stop()
        with contextlib.suppress(OSError):
            ours.send(("stop", None))
        ingest.join(15)
        if ingest.is_alive():
            ingest.kill()
            ingest.join(5)
        for end in (ours, wake_reader):
            end.close()
        broker.stop()
        # The process spawning started multiprocessing's resource tracker, which would
        # outlive the test (conftest's guard): ended as the interpreter's exit would.
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def test_while_a_batch_commits_the_full_batch_waiting_is_sent_behind_it_and_counted(
    tmp_path: Path,
) -> None:
    """The first batch is with the (stopped) ingest process, the second waits in full: it
    is taken and sent behind it, and still counts as received and not acknowledged
    (inflight, lag, behind). Once the first commits, all arrive, in order, and nothing is
    left in hand."""
    with intake(tmp_path) as line:
        line.two_batches_in_hand(3 * BATCH)  # the third waits in the broker (its window)
        b = line.batcher
        assert b.inflight() == 2 * BATCH  # counted: received, unacknowledged
        oldest = b.oldest_pending
        assert oldest is not None and b.lag_s(oldest + 1.0) == pytest.approx(1.0)
        assert b.behind_s(b.caught_up_at + 1.0) == pytest.approx(1.0)
        assert line.committed() == []
        line.resume_ingest()
        every = [topic(n) for n in range(3 * BATCH)]
        wait_until(lambda: line.committed() == every, 15, "every message committed, in order")
        wait_until(lambda: b.inflight() == 0, 10, "everything acknowledged")
        assert (b.in_hand, b.oldest_pending) == (0, None)
        assert sum(r.size for r in line.reports) == 3 * BATCH


def test_a_batch_sent_behind_waits_in_the_receive_stage_not_the_commit_stage(
    tmp_path: Path,
) -> None:
    """/metrics' latency stages: a batch sent behind another waits for it before its own
    commit begins. That wait is "receive" (the batch's `waited_s`), as it was before
    batches were sent behind; its "commit" (`commit_s`) begins once the one ahead is
    committed. Here the ingest process is stopped for at least half a second."""
    with intake(tmp_path) as line:
        line.two_batches_in_hand(2 * BATCH)
        stopped_at = time.monotonic()
        wait_until(lambda: time.monotonic() - stopped_at > 0.5, 5, "half a second stopped")
        line.resume_ingest()
        wait_until(lambda: len(line.reports) == 2, 15, "both batches reported")
        ahead, behind = line.reports
        assert ahead.commit_s > 0.5  # (sent, then the ingest process was stopped)
        assert behind.waited_s > 0.5
        assert behind.commit_s < behind.waited_s


def test_the_batch_sent_behind_still_counts_in_the_window(tmp_path: Path) -> None:
    """Over MQTT 3.1.1 the broker sends up to its max_inflight_messages (2000 here), and
    courierd holds its window itself: paho's thread stops reading once a window's worth
    waits for a batch. The batch sent behind is one of those: with it, only a batch more
    waits in the inbox, so that courierd holds the window and the batch being committed,
    as without prefetch, not a batch more (README "The window")."""
    with intake(tmp_path, protocol="3.1.1") as line:
        line.two_batches_in_hand(2 * BATCH)
        room = line.sessions.room
        assert room.waiting == 0  # (the inbox never held more than the window)
        line.publish(range(2 * BATCH, 5 * BATCH))
        wait_until(lambda: room.waiting == 1, 10, "paho's thread waiting for room")
        assert line.inbox.qsize() == BATCH  # and the batch sent behind: the window
        assert line.batcher.inflight() == 3 * BATCH  # the window, and the batch committing
        line.resume_ingest()
        every = [topic(n) for n in range(5 * BATCH)]
        wait_until(lambda: line.committed() == every, 15, "every message committed, in order")


def test_a_batch_retried_on_an_unavailable_database_is_committed_before_the_one_behind_it(
    tmp_path: Path,
) -> None:
    """Another connection holds SQLite's write lock: the first batch's commit fails
    ("unavailable") and is retried with backoff; the next batch, sent behind it, is
    skipped. When the lock goes, the first batch is committed first, then the one behind
    it."""
    with intake(tmp_path, busy_timeout_s=0.1) as line:
        line.publish(range(3 * BATCH))
        line.window_waiting()
        lock = sqlite3.connect(line.db, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            line.start()
            line.sent_behind_the_one_committing()
            assert line.inbox.qsize() == 0
            wait_until(
                lambda: line.batcher.database_problem is not None, 10, "the database unavailable"
            )
            assert line.batcher.in_hand == 2 * BATCH  # still: waiting for the retried one
        finally:
            lock.close()
        every = [topic(n) for n in range(3 * BATCH)]
        wait_until(lambda: line.committed() == every, 15, "every message committed, in order")
        wait_until(lambda: line.batcher.database_problem is None, 10, "the database back")


def test_a_batch_sent_behind_is_committed_under_its_fence_and_later_ones_are_admitted_again(
    tmp_path: Path,
) -> None:
    """A cluster: while the first batch commits and the second is sent behind it, slot 0
    is handed over (here: taken again at a new epoch, with a new connection). Both batches
    sent are committed under the epoch they were admitted at (the database's fence is what
    refuses a batch whose slots were taken over: not here, where only this process moved
    on); their acknowledgements have no connection to go on, so the broker gives them to
    the session's new holder, which commits them again (idempotent). The third batch,
    taken after the hand-over, is admitted at the new epoch and committed once."""
    with intake(tmp_path, shared=True) as line:
        line.two_batches_in_hand(3 * BATCH)
        line.sessions.hold({0: 2})  # (its messages are redelivered once there is room)
        line.resume_ingest()
        expected = Counter({topic(n): 2 if n < 2 * BATCH else 1 for n in range(3 * BATCH)})
        wait_until(
            lambda: Counter(line.committed()) == expected,
            20,
            "the two batches sent committed twice, the third once",
        )
        wait_until(lambda: line.batcher.inflight() == 0, 10, "everything acknowledged")
        assert Counter(line.committed()) == expected


def test_the_ingest_process_skips_batches_behind_a_failed_one_until_told_to_resume(
    tmp_path: Path,
) -> None:
    """The protocol itself, on the real ingest process: a batch fails (another connection
    holds SQLite's write lock); the batch sent behind it is skipped, unwritten, even though
    the lock is gone by the time it is read; after ("resume", None) both are committed,
    in order. Without the skip, the batch behind would be committed before the failed one
    is sent again."""
    with intake(tmp_path, busy_timeout_s=0.1) as line:
        pipe = line.pipe

        def batch(numbers: range) -> tuple[str, object]:
            raw = [(topic(n), b"not json", 8) for n in numbers]
            return ("batch", (raw, [None] * len(raw), None))

        lock = sqlite3.connect(line.db, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            pipe.send(batch(range(0, BATCH)))
            assert pipe.poll(15), "no answer for the first batch"
            assert pipe.recv()[0] == "unavailable"
        finally:
            lock.close()
        pipe.send(batch(range(BATCH, 2 * BATCH)))  # sent behind the failed one
        assert pipe.poll(15), "no answer for the batch behind"
        assert pipe.recv()[0] == "skipped"
        assert line.committed() == []
        pipe.send(("resume", None))
        for numbers in (range(0, BATCH), range(BATCH, 2 * BATCH)):
            pipe.send(batch(numbers))
            assert pipe.poll(15), "no answer after resuming"
            assert pipe.recv()[0] == "ok"
        assert line.committed() == [topic(n) for n in range(2 * BATCH)]


def test_a_batch_larger_than_the_pipes_buffer_is_counted_while_its_send_waits(
    tmp_path: Path,
) -> None:
    """A batch can be larger than the pipe's buffer (1000 statuses are about 240 KB, the
    socketpair's buffer about 208 KB): the send of the batch behind then waits until the
    ingest process reads it, after the batch ahead commits. Meanwhile both count as in
    hand, and the one behind in the window: here a small batch, then batches of five
    payloads of 60 KB, with the ingest process stopped."""
    with intake(tmp_path) as line:
        line.pause_ingest()
        line.publish(range(BATCH))
        line.publish(range(BATCH, 3 * BATCH), b"x" * 60_000)
        line.window_waiting()
        line.start()
        line.sent_behind_the_one_committing()
        b = line.batcher
        assert (b.inbox.qsize(), b.inflight()) == (0, 2 * BATCH)
        assert line.sessions.room.held == BATCH
        line.resume_ingest()
        every = [topic(n) for n in range(3 * BATCH)]
        wait_until(lambda: line.committed() == every, 20, "every message committed, in order")
        wait_until(lambda: b.inflight() == 0, 10, "everything acknowledged")
        assert line.sessions.room.held == 0
