"""The batcher thread of the MQTT process: take a batch, have it committed, then ack it.

Durable, then acknowledged (CONTRACT.md 4.7): messages are PUBACKed only after the
ingest process answers that their batch is committed. When the database is the
problem (disk full, locked), the same batch is offered again with backoff, nothing is
acknowledged meanwhile (so the broker stops sending once Receive Maximum is reached),
and health says why; when the database works again, intake resumes by itself.
While idle, it asks the ingest process for a real write every PROBE_EVERY_S, so that
health knows the database takes writes even when no traffic proves it.

A committed batch's acknowledgements (and its metrics) wait until the next batch is on
its way to the ingest process, or until nothing else is waiting: the ingest process
then commits the next batch while this thread acknowledges the last one, instead of
waiting for it. Nothing is acknowledged before its commit; and it is acknowledged
before this thread waits for new messages or stops.

While the ingest process commits a batch, a full batch waiting in the inbox is taken
and prepared (admitted, its request pickled): the moment the commit is reported, it goes
out, instead of the ingest process waiting while this thread takes, admits and pickles
it. Nothing changes for the guarantees: the prepared batch is sent only after the one
before it is committed (a retried batch is sent again first), it is admitted again just
before it is sent (its sessions may have been handed over meanwhile: then what is left
of it is prepared again), it counts as received and not acknowledged (`in_hand`,
`inflight`, `lag_s`, `behind_s`) and in the window (`Room.held`: courierd holds no more
messages than without it), and on stop it is dropped unacknowledged, redelivered later.

Messages are parsed as they arrive (`Reader`, on paho's thread), not in the ingest
process: that one process is where every message waits its turn, and parsing there was
about a quarter of its work, while the MQTT process has time to spare. The batch that
arrives while the one before it commits is parsed meanwhile, and the ingest process
gets the parsed values with the raw messages (kept for dead letters).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from courierd.daemon.sessions import Sessions
from courierd.domain.model import BatchReport, Input
from courierd.domain.owntracks import CourierIdFrom
from courierd.domain.telemetry import parse
from courierd.edges.mqtt import Message

log = logging.getLogger(__name__)

PROBE_EVERY_S = 5.0
BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# While a batch commits, how often the inbox is looked at for a full batch to prepare;
# the reply itself is read the moment it arrives (Connection.poll returns then).
PREFETCH_POLL_S = 0.005


def take_batch(
    inbox: queue.SimpleQueue[Message], *, size: int, wait_s: float, timeout: float
) -> list[Message]:
    """The first message (waiting up to `timeout`), then whatever follows within `wait_s`."""
    try:
        batch = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + wait_s
    while len(batch) < size:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(inbox.get(timeout=left))
            except queue.Empty:
                break
    return batch


# This host's clock moved this far from the monotonic one: it stepped (DbClock's
# DB_CLOCK_STEP_S, not imported: the MQTT process does not load the store's modules).
CLOCK_STEP_S = 0.5


class Reader:
    """Parses a message as it arrives (an MqttEdge's `interpret`), as the ingest process
    would: "now", for the ts too far in the future, is courierd's clock, the database's
    on a shared one (DbClock), so the ingest process tells its distance from this host's
    clock (`set_clock`) when it starts and with every batch it commits. Until it has (a
    cluster's sessions may connect first), and from a step of this host's clock until it
    tells again, None: the ingest process parses those, by its own clock. It also parses
    again what was refused here as too far ahead, so that it alone decides a refusal."""

    def __init__(self, owntracks: CourierIdFrom | None) -> None:
        self.owntracks = owntracks
        self._offset: float | None = None
        self._apart = 0.0  # this host's clock minus the monotonic one, when told

    def set_clock(self, offset: float | None) -> None:
        """courierd's clock minus this host's, as the ingest process just read it (None:
        it could not)."""
        self._apart = time.time() - time.monotonic()
        self._offset = offset

    def __call__(self, topic: str, payload: bytes, size: int) -> Input | None:
        offset = self._offset
        if offset is None:
            return None
        now = time.time()
        if abs(now - time.monotonic() - self._apart) > CLOCK_STEP_S:
            return None  # stepped since the offset was read: it may be off by the step
        return parse(topic, payload, now=now + offset, size=size, owntracks=self.owntracks)


def pickled(request: tuple[str, Any]) -> memoryview:
    """The request as `Connection.send` would pickle it (for `send_bytes`)."""
    return ForkingPickler.dumps(request)


@dataclass
class Taken:
    """A batch taken from the inbox and admitted: its messages and its request, ready."""

    messages: list[Message]
    request: memoryview
    received: float  # when its oldest message was received (monotonic)

    @classmethod
    def of(cls, messages: list[Message], fence: dict[int, int] | None) -> Taken:
        raw = [(m.topic, m.payload, m.size) for m in messages]
        request = pickled(("batch", (raw, [m.parsed for m in messages], fence)))
        return cls(messages, request, min(m.received for m in messages))


FENCED = object()  # the batch's slots are another instance's now: drop it, unacknowledged


class IngestFailed(Exception):
    """The ingest process died or reported a bug: fatal for the daemon."""


class Batcher:
    """`run(stop)` on its own thread; `heartbeat` and `database_problem` feed health."""

    def __init__(
        self,
        inbox: queue.SimpleQueue[Message],
        pipe: Connection,
        sessions: Sessions,
        *,
        size: int,
        wait_s: float,
        on_report: Callable[[BatchReport], None],
    ) -> None:
        self.inbox = inbox
        self.pipe = pipe
        self.sessions = sessions
        self.size = size
        self.wait_s = wait_s
        self.on_report = on_report
        self.heartbeat = time.monotonic()
        self.database_problem: str | None = None
        self._last_write = time.monotonic()
        # How far behind ingest is (README "When courierd is behind"), read by health and
        # /metrics on other threads; plain attributes, each written only by this thread.
        self.caught_up_at = time.monotonic()  # last time the inbox held less than a batch
        self.oldest_pending: float | None = None  # received (monotonic), of what is in hand
        self.in_hand = 0  # messages of the batch being committed and of the one prepared
        # The batch being committed, and the next one, prepared meanwhile (see the module
        # text); written and read by this thread only (`_hold` tells the others).
        self._current: Taken | None = None
        self._prepared: Taken | None = None
        # The last batch committed, not yet acknowledged (see the module text), and its
        # report; written and read by this thread only (`inflight` reads its length).
        self._unacked: list[Message] = []
        self._unreported: BatchReport | None = None

    def behind_s(self, now: float) -> float:
        """How long ingest has not caught up: since a batch last took everything waiting
        (the batch being committed, or prepared, counts as not yet caught up)."""
        return max(0.0, now - self.caught_up_at)

    def lag_s(self, now: float) -> float:
        """How long the oldest message received and not yet committed has waited here."""
        oldest = self.oldest_pending
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def inflight(self) -> int:
        """Messages received and not yet acknowledged (queued here, being committed, or
        prepared)."""
        return self.inbox.qsize() + self.in_hand + len(self._unacked)

    def _hold(self) -> None:
        """Tell the other threads what is in hand: the batch being committed and the one
        prepared."""
        held = [b for b in (self._current, self._prepared) if b is not None]
        self.oldest_pending = min((b.received for b in held), default=None)
        self.in_hand = sum(len(b.messages) for b in held)

    def run(self, stop: threading.Event) -> None:
        """Until `stop`; raises IngestFailed if the ingest process fails."""
        try:
            self._run(stop)
        except BaseException:
            # Committed: acknowledged, whatever ends the loop; but a failure to
            # acknowledge must not hide the one that ended it.
            try:
                self._settle()
            except Exception:
                log.exception("batcher.ack_failed while stopping on another error")
            raise
        self._settle()

    def _settle(self) -> None:
        """Acknowledge the last batch committed and report it (see the module text)."""
        batch, report = self._unacked, self._unreported
        self._unacked, self._unreported = [], None
        if batch:
            self.sessions.ack_many(batch)
        if report is not None:
            self.on_report(report)

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            batch = self._next(stop)
            if batch is None:
                continue
            self._current = batch
            self._hold()
            handed_over = time.monotonic()
            try:
                report = self._until_committed(batch.request, stop, prefetch=True)
                if report is None:
                    return  # stopping with the batch uncommitted: it is redelivered later
                if report is FENCED:
                    continue  # our slots were taken over: the new holder gets these again
                report.waited_s = max(0.0, handed_over - batch.received)
                report.commit_s = time.monotonic() - handed_over
                self._unacked, self._unreported = batch.messages, report
            finally:
                self._current = None
                self._hold()

    def _next(self, stop: threading.Event) -> Taken | None:
        """The batch to commit next: the one prepared, admitted again, or one taken from
        the inbox now; None if there is none (or none of it is ours)."""
        prepared = self._prepared
        if prepared is not None:
            self._prepared = None
            self.sessions.room.hold(0)  # out of the window now (room made): see _prepare
            kept, fence = self.sessions.admit(prepared.messages)
            if len(kept) == len(prepared.messages):
                return prepared
            # Sessions handed over since it was prepared: what is left, under its fence.
            self._hold()
            return Taken.of(kept, fence) if kept else None
        # Acknowledge now if taking a batch may wait: for messages (none waiting), or
        # for more of them (batch_ms, less than a batch waiting), which the broker may
        # hold back until it has these acknowledgements (its window). Only this thread
        # takes from the inbox: what it holds can only grow until the take.
        waiting = self.inbox.qsize()
        if self._unacked and (not waiting or (self.wait_s > 0 and waiting < self.size)):
            self._settle()
        batch = take_batch(self.inbox, size=self.size, wait_s=self.wait_s, timeout=0.2)
        if batch:
            self.sessions.room.made()  # paho's thread may wait for room in the inbox
        if len(batch) < self.size:  # nothing more was waiting: caught up
            self.caught_up_at = time.monotonic()
        if not batch:
            if time.monotonic() - self._last_write >= PROBE_EVERY_S:
                self._until_committed(pickled(("probe", None)), stop, prefetch=False)
            return None
        kept, fence = self.sessions.admit(batch)
        return Taken.of(kept, fence) if kept else None  # (none: handed over, see admit)

    def _prepare(self) -> None:
        """Take the full batch waiting and prepare it, while the last one commits."""
        # It still counts in the window, which paho's thread holds (MqttEdge._make_room),
        # until it is sent: courierd holds no more messages than without it. Counted
        # before it leaves the inbox, so no room is seen in between.
        self.sessions.room.hold(self.size)
        batch = [self.inbox.get_nowait() for _ in range(self.size)]  # waiting: see _exchange
        kept, fence = self.sessions.admit(batch)
        self.sessions.room.hold(len(kept))  # (the others are not ours: gone)
        if kept:
            self._prepared = Taken.of(kept, fence)
            self._hold()

    def _until_committed(
        self, request: memoryview, stop: threading.Event, *, prefetch: bool
    ) -> Any:
        """Send until the ingest process commits it; None if stopped first."""
        failures = 0
        while True:
            kind, value = self._exchange(request, prefetch)
            if kind == "ok":
                self._last_write = time.monotonic()
                if self.database_problem is not None:
                    log.warning("ingest.database_recovered after=%d attempts", failures)
                    self.database_problem = None
                return value if value is not None else True
            if kind == "fenced":
                log.warning("ingest.fenced reason=%s (not acknowledged)", value)
                return FENCED
            if kind != "unavailable":
                raise IngestFailed(str(value))
            self.database_problem = str(value)
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            log.error("ingest.retrying in=%.1fs attempt=%d reason=%s", delay, failures, value)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:  # keep the heartbeat: we are alive, waiting
                self.heartbeat = time.monotonic()
                if stop.wait(min(0.2, deadline - time.monotonic())):
                    return None

    def _exchange(self, request: memoryview, prefetch: bool) -> tuple[str, Any]:
        try:
            self.pipe.send_bytes(request)
        except OSError as e:
            raise self._ingest_gone(e) from None
        self._settle()  # the last batch's acks, while the ingest process works on this
        try:
            # Until the reply, and while none is prepared: a full batch waiting is
            # prepared (only this thread takes from the inbox: it stays there).
            while prefetch and self._prepared is None and not self.pipe.poll(PREFETCH_POLL_S):
                if self.inbox.qsize() >= self.size:
                    self._prepare()
            kind, value = self.pipe.recv()
        except (EOFError, OSError) as e:
            raise self._ingest_gone(e) from None
        return str(kind), value

    @staticmethod
    def _ingest_gone(error: BaseException) -> IngestFailed:
        # The pipe fails only when the process at its other end is gone.
        return IngestFailed(f"ingest process exited (its pipe: {error!r})")
