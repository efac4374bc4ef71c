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

While the ingest process commits a batch, a full batch waiting in the inbox is sent
behind it (taken, admitted, pickled): the ingest process reads it the moment it has
reported the one before, instead of waiting for this process to hear the report, be
scheduled, and take, admit and pickle the next (measured: about a sixth of its time on a
busy host). At most two batches are sent and not answered. Batches are committed in the
order taken: when one fails (the database unavailable, or fenced), the ingest process
skips the one behind it, unwritten, until told to resume; this thread then sends the
failed one again first (or drops it, fenced: the one behind is admitted again, as its
sessions may have been handed over too). The batch behind counts as received and not
acknowledged (`in_hand`, `inflight`, `lag_s`, `behind_s`) and in the window
(`Room.held`: courierd holds no more messages than the window and the batch being
committed); on stop, the batches sent are answered first, and what was not committed is
redelivered later.

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
from collections import deque
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
# While a batch commits, how often the inbox is looked at for a full batch to send behind;
# the reply itself is read the moment it arrives (Connection.poll returns then).
BEHIND_POLL_S = 0.005


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
    sent_at: float = 0.0  # when it was first handed to the ingest process (monotonic)

    @classmethod
    def of(cls, messages: list[Message], fence: dict[int, int] | None) -> Taken:
        raw = [(m.topic, m.payload, m.size) for m in messages]
        request = pickled(("batch", (raw, [m.parsed for m in messages], fence)))
        return cls(messages, request, min(m.received for m in messages))


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
        self.in_hand = 0  # messages of the batches sent and not yet answered
        # Batches sent to the ingest process and not yet answered, oldest first: the one
        # it commits and, if a full batch was waiting, the next (see the module text);
        # written and read by this thread only (`_hold` tells the others).
        self._sent: deque[Taken] = deque()
        self._failures = 0  # commits failed in a row (the database unavailable)
        self._committed_at = 0.0  # when the last batch was reported committed (monotonic)
        # After a failed batch, the ingest process skips the batches sent behind it until
        # told to resume; this thread tells it before the next batch it sends.
        self._resume = False
        # The last batch committed, not yet acknowledged (see the module text), and its
        # report; written and read by this thread only (`inflight` reads its length).
        self._unacked: list[Message] = []
        self._unreported: BatchReport | None = None

    def behind_s(self, now: float) -> float:
        """How long ingest has not caught up: since a batch last took everything waiting
        (the batches sent and not yet answered count as not yet caught up)."""
        return max(0.0, now - self.caught_up_at)

    def lag_s(self, now: float) -> float:
        """How long the oldest message received and not yet committed has waited here."""
        oldest = self.oldest_pending
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def inflight(self) -> int:
        """Messages received and not yet acknowledged (queued here, or sent and not yet
        answered, or committed and not yet acknowledged)."""
        return self.inbox.qsize() + self.in_hand + len(self._unacked)

    def _hold(self) -> None:
        """Tell the other threads what is in hand (the batches sent and not answered);
        the one queued behind the batch being committed still counts in the window
        (`Room.held`), so that courierd holds no more messages than the window and the
        batch being committed."""
        sent = self._sent
        self.oldest_pending = min((b.received for b in sent), default=None)
        self.in_hand = sum(len(b.messages) for b in sent)
        self.sessions.room.hold(self.in_hand - len(sent[0].messages) if sent else 0)

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
        # Once stopping, nothing more is sent, but the batches sent are answered first:
        # what they committed is acknowledged (the rest is redelivered later).
        while self._sent or not stop.is_set():
            self.heartbeat = time.monotonic()
            if not self._sent:
                batch = self._take(stop)
                if batch is None:
                    continue
                self._send(batch)
                self._settle()  # the last batch's acks, while the ingest process commits
            kind, value = self._reply(stop)
            if not self._answered(kind, value, stop):
                return  # stopped while waiting to retry: redelivered later

    def _take(self, stop: threading.Event) -> Taken | None:
        """A batch taken from the inbox now, admitted; None if there is none (or none of
        it is ours)."""
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
                self._probe(stop)
            return None
        # In hand from now (nothing else is: this is taken only then), not from its send:
        # admitting and pickling 1000 messages takes a few milliseconds.
        self.in_hand, self.oldest_pending = len(batch), min(m.received for m in batch)
        kept, fence = self.sessions.admit(batch)
        if not kept:  # (handed over, see admit)
            self._hold()
            return None
        return Taken.of(kept, fence)

    def _take_behind(self) -> None:
        """While a batch commits, the full batch waiting in the inbox is sent behind it."""
        # It still counts in the window, which paho's thread holds (MqttEdge._make_room),
        # until the batch ahead of it is answered: counted before it leaves the inbox, so
        # no room is seen in between.
        self.sessions.room.hold(self.size)
        batch = [self.inbox.get_nowait() for _ in range(self.size)]  # waiting: see _reply
        self.in_hand += len(batch)  # (the one ahead is older)
        kept, fence = self.sessions.admit(batch)
        if kept:
            self._send(Taken.of(kept, fence))
        else:
            self._hold()  # (none of it ours: gone)

    def _send(self, *batches: Taken) -> None:
        """Hand these to the ingest process, in order. Counted in hand first: a batch can
        be larger than the pipe's buffer, so sending one behind waits until the ingest
        process reads it, once the one ahead is committed."""
        self._sent.extend(batches)
        self._hold()
        try:
            self._resume_if_due()
            for batch in batches:
                # The first time only: a retry's commit_s includes its backoff.
                batch.sent_at = batch.sent_at or time.monotonic()
                self.pipe.send_bytes(batch.request)
        except OSError as e:
            raise self._ingest_gone(e) from None

    def _resume_if_due(self) -> None:
        """After a failed batch, before anything else is sent: the ingest process skips
        batches until told to resume (see the module text)."""
        if self._resume:
            self.pipe.send(("resume", None))
            self._resume = False

    def _reply(self, stop: threading.Event) -> tuple[str, Any]:
        """The ingest process's answer for the oldest batch sent. Until it comes, a full
        batch waiting in the inbox is sent behind that one (only this thread takes from
        the inbox: it stays there); the reply is read the moment it arrives."""
        try:
            while len(self._sent) == 1 and not self.pipe.poll(BEHIND_POLL_S):
                if self.inbox.qsize() >= self.size and not stop.is_set():
                    self._take_behind()
            kind, value = self.pipe.recv()
        except (EOFError, OSError) as e:
            raise self._ingest_gone(e) from None
        return str(kind), value

    def _answered(self, kind: str, value: Any, stop: threading.Event) -> bool:
        """Act on the answer for the oldest batch sent; False if stopped meanwhile."""
        head = self._sent[0]
        if kind == "ok":
            self._sent.popleft()
            self._hold()
            self._committed()
            report: BatchReport = value
            # Its commit began when it was sent, or, sent behind, when the one ahead was
            # committed: the wait before that is still "receive" on /metrics.
            now, began = time.monotonic(), max(head.sent_at, self._committed_at)
            report.waited_s = max(0.0, began - head.received)
            report.commit_s = now - began
            self._committed_at = now
            self._settle()  # (normally acknowledged already)
            self._unacked, self._unreported = head.messages, report
            if self._sent:  # the next one commits meanwhile: acknowledge this one now
                self._settle()
            return True
        if kind not in ("unavailable", "fenced"):
            raise IngestFailed(str(value))
        # Not committed: neither are the batches behind it, which the ingest process
        # skipped (they follow it, in order, or not at all).
        behind = list(self._sent)[1:]
        for _ in behind:
            skipped = self._reply(stop)[0]
            if skipped != "skipped":
                raise IngestFailed(f"ingest answered {skipped} for a batch behind a failed one")
        # Out of `_sent` until sent again (or dropped), but still counted meanwhile:
        # in_hand, the lag and Room.held are told again (`_hold`) only then.
        self._sent.clear()
        self._resume = True
        if kind == "fenced":
            log.warning("ingest.fenced reason=%s (not acknowledged)", value)
            # Dropped, unacknowledged: the slots' new holder gets these again. What is
            # behind is admitted again, as its sessions may have been handed over too.
            for b in behind:
                kept, fence = self.sessions.admit(b.messages)
                if kept and not stop.is_set():
                    self._send(Taken.of(kept, fence))
            self._hold()
            return True
        if not self._backoff(str(value), stop):
            self._hold()
            return False
        self._send(head, *behind)  # again, in the same order
        return True

    def _probe(self, stop: threading.Event) -> None:
        """A real write while idle (see the module text), retried as a batch would be."""
        request = pickled(("probe", None))
        while True:
            try:
                self._resume_if_due()
                self.pipe.send_bytes(request)
                kind, value = self.pipe.recv()
            except (EOFError, OSError) as e:
                raise self._ingest_gone(e) from None
            if kind == "ok":
                self._committed()
                return
            if kind != "unavailable":
                raise IngestFailed(str(value))
            if not self._backoff(str(value), stop):
                return

    def _committed(self) -> None:
        self._last_write = time.monotonic()
        if self.database_problem is not None:
            log.warning("ingest.database_recovered after=%d attempts", self._failures)
            self.database_problem = None
        self._failures = 0

    def _backoff(self, problem: str, stop: threading.Event) -> bool:
        """The database is unavailable: wait before trying again; False if stopped."""
        self.database_problem = problem
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1
        log.error("ingest.retrying in=%.1fs attempt=%d reason=%s", delay, self._failures, problem)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:  # keep the heartbeat: we are alive, waiting
            self.heartbeat = time.monotonic()
            if stop.wait(min(0.2, deadline - time.monotonic())):
                return False
        return True

    @staticmethod
    def _ingest_gone(error: BaseException) -> IngestFailed:
        # The pipe fails only when the process at its other end is gone.
        return IngestFailed(f"ingest process exited (its pipe: {error!r})")
