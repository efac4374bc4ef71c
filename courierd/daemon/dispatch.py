"""The dispatch process: delivers the outbox to OneTablet, in order per order, parallel across.

One thread claims due pushes that head their order's queue (`Outbox.claim_due`), as
many as there are free places in flight (`onetablet.max_concurrency`), and hands them
to the pusher (`edges/pusher.py`: one asyncio loop, one `OneTabletHttp` pool). A
claimed push starts at once: nothing waits claimed but unsent, so a cancel or a 401
finds every push either in flight or still in the database. Replies come back to this
thread, which records them in batches (one commit for many replies) and decides what
happens next: 2xx delivered; retryable → next attempt after 1 s, 5 s, 30 s, ...
(Retry-After wins); 3xx (never followed) and other 4xx → parked as failed; 401 →
every push pauses, and one probe at a time is sent, with backoff, until the key works
again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

from courierd.config import Settings
from courierd.daemon.housekeeping import Housekeeper
from courierd.daemon.ipc import (
    NOTIFICATIONS,
    PUSHES,
    REPORT_S,
    Grant,
    orphaned,
    quick_thread_handovers,
    settle_gc,
    worker_setup,
)
from courierd.daemon.membership import SlotManager
from courierd.daemon.notifier import Notifier
from courierd.domain.model import DispatchStats, value
from courierd.domain.policy import RETRY_SCHEDULE, retry_delay
from courierd.edges.onetablet import Reply
from courierd.edges.publisher import MqttPublisher
from courierd.edges.pusher import Outcome, Push, Pusher
from courierd.errors import CourierdError, Rejected, StoreUnavailable, Unauthorized, Unavailable
from courierd.logs import lean_records
from courierd.store import Store, open_store
from courierd.store.cluster import DbClock
from courierd.store.outbox import Outbox, OutboxRow, PushResult
from courierd.store.schema import DELIVERED, FAILED, PENDING

log = logging.getLogger(__name__)

RETRY_SPREAD = 0.1  # retries land within ±10 % of their scheduled wait
CLOCK_STEP_S = 2.0  # a wall-clock jump beyond this (against the monotonic clock) is a step
CLAIM_BATCH_DIVISOR = 16  # claim once 1/16 of the places in flight are free


@value
class Attempt:
    """What one push attempt got back, from the pusher to the dispatcher thread."""

    row: OutboxRow
    outcome: str  # delivered, retry, failed, unauthorized; skipped (unsent: claim lapsed)
    error: str | None = None
    retry_after: float | None = None
    claimed_at: float = 0.0  # wall-clock times, for the latency stages on /metrics
    sent_at: float = 0.0
    replied_at: float = 0.0


def attempt_of(row: OutboxRow, outcome: Outcome | None) -> tuple[str, str | None, float | None]:
    """(outcome, error, retry_after) of what the pusher got for `row`."""
    if outcome is None:
        return "skipped", None, None
    if isinstance(outcome, Reply):
        return "delivered", None, None
    if isinstance(outcome, Unavailable):
        return "retry", str(outcome), outcome.retry_after
    if isinstance(outcome, Unauthorized):
        return "unauthorized", str(outcome), None
    if isinstance(outcome, Rejected):
        return "failed", str(outcome), None
    return "retry", f"unexpected error: {outcome!r}", None


class Dispatcher:
    """Owns the outbox delivery loop; `wake()` it when new pushes are committed.

    `clock` (wall time, stored in the database), `monotonic` and `rng` are arguments so
    tests drive the policy without waiting. When the wall clock steps (NTP, an
    operator), pending retries are moved by the same amount: a retry due in 30 s stays
    due in 30 s, instead of waiting out an hour the clock was set back.

    On a shared database the schedule is on the database's clock instead (`_now`: ours
    plus how far the database's is from it, read once a second), as the cluster's
    leases are: every instance then finds a retry due at the same moment, whatever its
    host's clock says, and a step of that clock moves nothing.
    """

    def __init__(
        self,
        outbox: Outbox,
        pusher: Pusher,
        *,
        concurrency: int = 256,
        schedule: Sequence[float] = RETRY_SCHEDULE,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        follow_clock_steps: bool = True,
    ) -> None:
        self.outbox = outbox
        # Alone, courierd moves the schedule with its clock's steps; in a cluster the
        # schedule is on the database's clock, which one host's step does not move.
        self.follow_clock_steps = follow_clock_steps
        self.pusher = pusher
        self.stats = DispatchStats()
        self._stats_lock = threading.Lock()
        self.concurrency = concurrency
        self.schedule = tuple(schedule)
        self.clock = clock
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.heartbeat = monotonic()
        self.paused_until: float | None = None  # set while OneTablet refuses our key
        self._auth_failures = 0
        self._clock_offset = clock() - monotonic()
        self._db_clock = DbClock(outbox.db, clock, monotonic)  # `clock`, or the database's
        self._inflight: dict[int, OutboxRow] = {}  # claimed and sent, no reply recorded
        self._results: queue.SimpleQueue[Attempt] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._next_stats = 0.0
        self._probe_id: int | None = None  # the one push sent while paused by a 401
        self._claimed_all = False
        self._next_renew = 0.0
        # Claim when this many places are free (or new pushes were committed, or nothing
        # is in flight): the claim query reads the pushes in flight too, so a claim per
        # reply would cost O(concurrency) per push.
        self.claim_batch = max(1, concurrency // CLAIM_BATCH_DIVISOR)
        self._new_work = True
        pusher.after_replies(self._replied)

    def _replied(self) -> None:
        """Replies were put in `_results` (on the pusher's thread, once for a burst).
        Set already: the dispatcher has not cleared it yet, and it takes the results
        only after clearing it, so these too; not set again, no lock and no notify."""
        if not self._wake.is_set():
            self._wake.set()

    def wake(self) -> None:
        """New pushes were committed: claim at once, however few places are free."""
        self._new_work = True
        self._wake.set()

    def run(self, stop: threading.Event, grace_s: float = 5.0) -> None:
        """Until `stop`; then wait up to `grace_s` for in-flight pushes and record them."""
        try:
            while not stop.is_set():
                try:
                    self.turn()
                except StoreUnavailable as e:  # disk full, locked: try again shortly
                    log.error("dispatch.database_unavailable error=%s", e)
                    self._claimed_all = False
                    stop.wait(1.0)
                    continue
                try:
                    idle_s = self._idle_wait()  # it may read the database (its clock)
                except StoreUnavailable as e:
                    log.error("dispatch.database_unavailable error=%s", e)
                    idle_s = 1.0
                self._wake.wait(idle_s)
        finally:
            self._drain(grace_s)

    def turn(self) -> bool:
        """One pass: record finished attempts, claim due pushes; True if slots are full."""
        # Clear before looking for work, not after waiting: a wake-up that lands
        # between the wait and a clear would be lost for up to a second.
        self._wake.clear()
        self.heartbeat = self.monotonic()
        self._follow_clock_step()
        self._record()
        self._renew()
        self._claimed_all = self._claim()
        self._refresh_stats()
        return self._claimed_all

    def _renew(self) -> None:
        """On a shared database, keep the claims of pushes still in flight (a dead
        instance's lapse within `lease_s`, and others take them over)."""
        now = self.monotonic()
        if now < self._next_renew or not self._inflight:
            return
        self._next_renew = now + self.outbox.lease_s / 3
        self.outbox.renew(list(self._inflight))

    def _idle_wait(self) -> float:
        return 1.0 if self._claimed_all else self._until_next_due()

    def _drain(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        # The database may be gone at the stop too: what is not recorded is sent again.
        with contextlib.suppress(StoreUnavailable):
            while self._inflight and time.monotonic() < deadline:
                self._wake.clear()
                self._record()
                self._wake.wait(0.05)
            self._record()
        if self._inflight:
            log.warning("dispatch.unfinished pushes=%d (sent again on start)", len(self._inflight))

    def _follow_clock_step(self) -> None:
        offset = self.clock() - self.monotonic()
        step = offset - self._clock_offset
        self._clock_offset = offset  # slow drift (NTP slewing) is followed quietly
        # (The database's clock, `_db_clock`, sees the step itself and reads it again.)
        if abs(step) < CLOCK_STEP_S or not self.follow_clock_steps:
            return
        moved = self.outbox.shift_schedule(step)
        if self.paused_until is not None:
            self.paused_until += step
        log.warning("dispatch.clock_step seconds=%+.1f pushes_rescheduled=%d", step, moved)

    def _now(self) -> float:
        """The outbox's time: the wall clock, or on a shared database the database's."""
        return self._db_clock()

    def _claim(self) -> bool:
        """Send due pushes in the free places; True if more may be waiting for one."""
        now = self._now()
        slots = self.concurrency - len(self._inflight)
        if self.paused_until is None and not self._new_work and 0 < slots < self.claim_batch:
            return True  # a few replies more first (each wakes us)
        self._new_work = False
        if self.paused_until is not None:
            # Paused: one probe at a time, once its backoff has passed.
            slots = 1 if now >= self.paused_until and not self._inflight else 0
        if slots <= 0:
            return self.paused_until is None
        claiming_at = self.monotonic()  # before the claim: its deadline errs early
        rows = self.outbox.claim_due(now, slots, busy=list(self._inflight))
        if not rows:
            return False
        if self.paused_until is not None:
            self._probe_id = rows[0].id
        # A claim on a shared database holds for lease_s: a push still unsent by then
        # (this process was stopped in between) may be another instance's, so it is not.
        # The deadline is monotonic, so a wall-clock step cannot stretch it.
        until = claiming_at + self.outbox.lease_s if self.outbox.db.concurrent else float("inf")
        claimed_at = time.time()
        pushes = []
        for row in rows:
            self._inflight[row.id] = row
            pushes.append(
                Push(
                    row.order_id,
                    row.body,
                    row.idempotency_key,
                    row.source,
                    self._reply_handler(row, claimed_at),
                    until,
                )
            )
        self.pusher.send(pushes)
        return len(rows) == slots

    def _reply_handler(
        self, row: OutboxRow, claimed_at: float
    ) -> Callable[[Outcome | None, float], None]:
        """What the pusher calls (on its thread) with the outcome of `row`."""

        results = self._results

        def done(outcome: Outcome | None, sent_at: float) -> None:
            # The pusher wakes the dispatcher once it has told every reply of its
            # loop's pass (`Pusher.after_replies`).
            kind, error, retry_after = attempt_of(row, outcome)
            results.put(Attempt(row, kind, error, retry_after, claimed_at, sent_at, time.time()))

        return done

    def _record(self) -> None:
        """Turn finished attempts into outbox updates, all in one commit."""
        if self._results.empty():
            return
        # Read before the results leave their queue: on a shared database the clock is
        # the database's, and a read that fails must leave them there for the next turn
        # (taken and then dropped, their pushes would stay in flight for good).
        now = self._now()  # created_at is on this clock too (the committer's `DbClock`)
        offset = self._db_clock.offset  # the claimed_at.. stamps are on `time.time`
        attempts: list[Attempt] = []
        while True:
            try:
                attempts.append(self._results.get_nowait())
            except queue.Empty:
                break
        sent = [a for a in attempts if a.outcome != "skipped"]
        try:
            self.outbox.unclaim([a.row.id for a in attempts if a.outcome == "skipped"])
            self.outbox.record_results([self._result(a, now) for a in sent])
        finally:
            # Recorded or not, these are no longer in flight. If the database refused the
            # results, the pushes are still pending there and are claimed (and sent, with
            # the same key) again: at-least-once, never lost.
            for a in attempts:
                del self._inflight[a.row.id]
                if a.row.id == self._probe_id:
                    self._probe_id = None
        recorded_at = time.time()
        with self._stats_lock:
            stats = self.stats
            stats.outcomes.update([a.outcome for a in sent])
            delivered = [a for a in sent if a.outcome == "delivered"]
            if delivered:  # what `stats.add_stages` does, its lists looked up once
                stages, latencies = stats.stages, stats.latencies
                claim, send = stages.setdefault("claim", []), stages.setdefault("send", [])
                reply, record = stages.setdefault("reply", []), stages.setdefault("record", [])
                for a in delivered:  # each at least 0.0 (`max`'s call cost more)
                    created_at = a.row.created_at
                    s = now - created_at
                    latencies.append(s if s > 0.0 else 0.0)
                    s = a.claimed_at + offset - created_at
                    claim.append(s if s > 0.0 else 0.0)
                    s = a.sent_at - a.claimed_at
                    send.append(s if s > 0.0 else 0.0)
                    s = a.replied_at - a.sent_at
                    reply.append(s if s > 0.0 else 0.0)
                    s = recorded_at - a.replied_at
                    record.append(s if s > 0.0 else 0.0)
        for a in sent:
            if a.outcome == "failed":
                log.warning(
                    "dispatch.parked order_id=%s status=%s error=%r",
                    a.row.order_id,
                    a.row.status,
                    a.error,
                )

    def _result(self, a: Attempt, now: float) -> PushResult:
        probe = a.row.id == self._probe_id
        if a.outcome == "delivered":
            if self.paused_until is not None:
                log.info("dispatch.auth_recovered after=%d failures", self._auth_failures)
            self.paused_until, self._auth_failures = None, 0
            self.stats.auth_paused = False
            return PushResult(a.row.id, DELIVERED, now)
        if a.outcome == "unauthorized":
            # One step of backoff per probe: the replies of pushes that were already in
            # flight when the first 401 came back wait for the same probe.
            if self.paused_until is None or probe:
                self._auth_failures += 1
                self.paused_until = now + retry_delay(self._auth_failures, None, self.schedule)
                log.error(
                    "dispatch.auth_paused probe_in=%.0fs error=%r", self.paused_until - now, a.error
                )
            self.stats.auth_paused = True
            return PushResult(a.row.id, PENDING, now, self.paused_until, a.error)
        if probe and self.paused_until is not None:
            # The probe got no answer on the key (5xx, timeout, another 4xx): still
            # paused; the next probe waits the current backoff, not zero.
            self.paused_until = now + retry_delay(self._auth_failures, None, self.schedule)
        if a.outcome == "failed":
            return PushResult(a.row.id, FAILED, now, None, a.error)
        spread = self.rng.uniform(-RETRY_SPREAD, RETRY_SPREAD)
        delay = retry_delay(a.row.attempts + 1, a.retry_after, self.schedule, spread)
        return PushResult(a.row.id, PENDING, now, now + delay, a.error)

    def _until_next_due(self) -> float:
        """Seconds until a push that is not due yet becomes due (at most 1 s).

        Pushes due now but not claimed wait behind an in-flight or parked push of
        their order; a result or a commit wakes the loop for them.
        """
        now = self._now()
        if self.paused_until is not None:
            return max(0.01, min(1.0, self.paused_until - now))
        due = self.outbox.next_due_after(now)
        return 1.0 if due is None else max(0.001, min(1.0, due - now))

    def _refresh_stats(self) -> None:
        """Outbox gauges, at most once a second (they are counts over an index)."""
        now = self.monotonic()
        if now < self._next_stats:
            return
        self._next_stats = now + 1.0
        pending, oldest, failed = self.outbox.stats()
        with self._stats_lock:
            self.stats.pending, self.stats.failed = pending, failed
            self.stats.oldest_pending_age_s = (
                0.0 if oldest is None else max(0.0, self._now() - oldest)
            )

    def report(self) -> DispatchStats:
        """Deltas since the last report, plus the current gauges (thread-safe)."""
        with self._stats_lock:
            return self.stats.take(self.monotonic() - self.heartbeat)


def dispatch_main(
    settings: Settings,
    reports: Connection,
    control: Connection,
    wake: Connection,
    instance: str,
) -> None:
    """Entry point of the dispatch process: deliver the outbox until told to stop."""
    worker_setup(settings, "courierd-push")
    lean_records()  # a log line per push (`onetablet.call`, at INFO)
    quick_thread_handovers()
    ot = settings.require_onetablet()
    assert ot.base_url is not None and ot.api_key is not None

    def connect() -> Store:
        return open_store(
            settings.store,
            instance=instance,
            slots=settings.cluster.slots,
            lease_s=settings.cluster.lease_s,
        )

    try:
        # Deliveries are marked durably (FULL, one fsync per batch of results): after a
        # power cut only the pushes in flight are sent again, as CONTRACT.md 4.10 says.
        store, housekeeping_store, notifier_store = connect(), connect(), connect()
        cluster_store = connect() if store.db.concurrent else None
    except CourierdError as e:
        reports.send(("fatal", str(e)))
        return
    pusher = Pusher(
        ot.base_url,
        ot.api_key.get_secret_value(),
        transport=ot.transport,
        timeout=ot.timeout_s,
        max_connections=ot.max_connections_per_host,
        client=ot.client,
    )
    dispatcher = Dispatcher(
        store.outbox,
        pusher,
        # A push in flight holds a connection (HTTP/1.1): never claim more than either.
        concurrency=min(ot.max_concurrency, ot.max_connections_per_host),
        schedule=ot.retry_schedule_s,
        follow_clock_steps=not store.db.concurrent,
    )
    # One publisher per instance: a cluster's instances must not share a client id.
    suffix = "out" if cluster_store is None else f"out-{instance.rsplit(':', 1)[-1]}"
    publisher = MqttPublisher(settings.mqtt, f"{settings.mqtt.client_id}-{suffix}")
    notifier = Notifier(notifier_store, publisher)
    housekeeper = Housekeeper(
        housekeeping_store,
        offline_after_s=settings.watchdog.offline_after_s,
        on_alert=notifier.wake,
    )
    stop = threading.Event()
    send_lock = threading.Lock()

    def report(kind: str, value: object) -> None:
        with send_lock:
            try:
                reports.send((kind, value))
            except OSError:
                orphaned()

    def run_dispatcher() -> None:
        try:
            dispatcher.run(stop, grace_s=settings.daemon.stop_timeout_s / 3)
        except BaseException as e:
            log.exception("dispatch.failed")
            report("fatal", f"dispatcher: {e}")

    def run_reporter() -> None:
        while not stop.wait(REPORT_S):
            stats = dispatcher.report()
            stats.couriers_offline = housekeeper.couriers_offline
            stats.watchdog_alerts = housekeeper.take_reported()
            stats.broker_counts = dict(publisher.broker_counts)
            report("stats", stats)

    def on_wake(news: bytes) -> None:  # ingest committed pushes or notifications
        if PUSHES in news:
            dispatcher.wake()
        if NOTIFICATIONS in news:
            notifier.wake()

    def grant(value: Grant) -> None:
        report("slots", value)

    manager = (
        None
        if cluster_store is None or cluster_store.slots is None
        else SlotManager(cluster_store.slots, grant, http=settings.http.listen)
    )

    def run_slots(manager: SlotManager) -> None:
        """A cluster member: hold a fair share of the MQTT session slots (membership.py).
        However it ends, the MQTT process hears of it: a fatal report, and the last
        grant runs out."""
        try:
            manager.run(stop)
        except BaseException as e:
            log.exception("cluster.failed")
            report("fatal", f"cluster: {e}")

    def on_control(kind: str, value: object) -> None:
        if kind == "holding" and manager is not None:
            manager.holding(value)  # type: ignore[arg-type]

    # Before the threads start: nothing in flight yet is frozen with what start-up built.
    settle_gc()
    worker = threading.Thread(target=run_dispatcher, name="dispatch")
    worker.start()
    threading.Thread(target=run_reporter, name="reporter", daemon=True).start()
    slots_thread = None
    if manager is not None:
        slots_thread = threading.Thread(target=run_slots, args=(manager,), name="slots")
        slots_thread.start()
    keeper = threading.Thread(target=housekeeper.run, args=(stop,), name="housekeeping")
    keeper.start()
    publishing = threading.Thread(target=notifier.run, args=(stop,), name="notifier")
    publishing.start()
    report("ready", None)
    _listen(control, wake, on_wake, on_control)
    stop.set()  # the slot manager leaves at once: the MQTT process is disconnected
    dispatcher.wake()
    notifier.wake()
    worker.join()
    keeper.join(5)
    publishing.join(5)
    if slots_thread is not None and cluster_store is not None:
        slots_thread.join(5)
        cluster_store.close()
    report("stats", dispatcher.report())
    for each in (store, housekeeping_store, notifier_store):
        each.close()
    # Not pusher.close() and a normal exit: a push stuck on a hung OneTablet would hold
    # either until its timeout. It stays pending and is sent again on the next start.
    logging.shutdown()
    os._exit(0)


def _listen(
    control: Connection,
    wake: Connection,
    on_wake: Callable[[bytes], None],
    on_control: Callable[[str, object], None],
) -> None:
    """Relay wake-ups from ingest to the dispatcher, and the MQTT process's messages,
    until the control pipe says stop."""
    channels: list[Connection] = [control, wake]
    while True:
        for ready in wait(channels):
            assert isinstance(ready, Connection)
            try:
                if ready is wake:
                    on_wake(ready.recv_bytes())
                    continue
                kind, value = ready.recv()
            except (EOFError, OSError):
                if ready is wake:  # the ingest process ended; keep serving the outbox
                    channels.remove(wake)
                    continue
                orphaned()
            if kind == "stop":
                return
            on_control(str(kind), value)
