"""The dispatcher: delivers the outbox to OneTablet, in order per order, parallel across.

One thread claims due pushes that head their order's queue (`Store.claim_due`) and
hands them to a bounded worker pool sharing one keep-alive connection pool. Workers
only call OneTablet and report; the dispatcher thread records results in batches
(one commit for many replies) and decides what happens next:
2xx delivered; retryable → next attempt after 1 s, 5 s, 30 s, ... (Retry-After wins);
other 4xx → parked as failed; 401 → every push pauses and one probe is sent with
backoff until the key works again.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from courierd.domain.model import DispatchStats
from courierd.domain.policy import RETRY_SCHEDULE, retry_delay
from courierd.edges.onetablet import OneTabletClient
from courierd.errors import Rejected, Unauthorized, Unavailable
from courierd.store.sqlite import DELIVERED, FAILED, PENDING, OutboxRow, PushResult, Store

log = logging.getLogger(__name__)

RETRY_SPREAD = 0.1  # retries land within ±10 % of their scheduled wait


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one push attempt got back, from a worker to the dispatcher thread."""

    row: OutboxRow
    outcome: str  # delivered, retry, failed, unauthorized; skipped (unsent: paused or cancelled)
    error: str | None = None
    retry_after: float | None = None


class Dispatcher:
    """Owns the outbox delivery loop; `wake()` it when new pushes are committed."""

    def __init__(
        self,
        store: Store,
        client: OneTabletClient,
        *,
        concurrency: int = 16,
        schedule: Sequence[float] = RETRY_SCHEDULE,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        still_pending: Callable[[int], bool] = lambda _push_id: True,
    ) -> None:
        self.store = store
        self.client = client
        self.stats = DispatchStats()
        self._stats_lock = threading.Lock()
        self.concurrency = concurrency
        self.schedule = tuple(schedule)
        self.clock = clock
        self.rng = rng or random.Random()
        self.still_pending = still_pending
        self.heartbeat = time.monotonic()
        self.paused_until: float | None = None  # set while OneTablet refuses our key
        self._auth_failures = 0
        # Claimed pushes: running, or queued for the next free worker. Keeping up to
        # `concurrency` queued means a worker that finishes starts the next push at
        # once instead of waiting for this thread's record-and-claim round trip.
        self._inflight: dict[int, tuple[OutboxRow, Future[None]]] = {}
        self._results: queue.SimpleQueue[Attempt] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="push")
        self._next_stats = 0.0
        self._probe_id: int | None = None  # the one push sent while paused by a 401

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event, grace_s: float = 10.0) -> None:
        """Until `stop`; then wait up to `grace_s` for in-flight pushes and record them."""
        try:
            while not stop.is_set():
                # Clear before looking for work, not after waiting: a wake-up that lands
                # between the wait and a clear would be lost for up to a second.
                self._wake.clear()
                self.heartbeat = time.monotonic()
                self._record()
                claimed_all = self._claim()
                self._refresh_stats()
                self._wake.wait(1.0 if claimed_all else self._until_next_due())
        finally:
            for row_id, (_, future) in list(self._inflight.items()):
                if future.cancel():  # queued, never sent: it stays pending for next time
                    del self._inflight[row_id]
            deadline = time.monotonic() + grace_s
            while self._inflight and time.monotonic() < deadline:
                self._wake.clear()
                self._record()
                self._wake.wait(0.05)
            self._record()
            self._pool.shutdown(wait=False, cancel_futures=True)
            if self._inflight:
                log.warning(
                    "dispatch.unfinished pushes=%d (sent again on start)", len(self._inflight)
                )

    def _claim(self) -> bool:
        """Start due pushes in the free slots; True if more may be waiting for a slot."""
        now = self.clock()
        slots = 2 * self.concurrency - len(self._inflight)
        if self.paused_until is not None:
            # Paused: one probe at a time, once its backoff has passed.
            slots = 1 if now >= self.paused_until and not self._inflight else 0
        if slots <= 0:
            return self.paused_until is None
        rows = self.store.claim_due(now, slots, busy=list(self._inflight))
        if self.paused_until is not None and rows:
            self._probe_id = rows[0].id
        for row in rows:
            self._inflight[row.id] = (row, self._pool.submit(self._attempt, row))
        return len(rows) == slots

    def _attempt(self, row: OutboxRow) -> None:
        """Worker: one call to OneTablet; never raises (the report is the result)."""
        paused = self.paused_until is not None and row.id != self._probe_id
        try:
            cancelled = not paused and not self.still_pending(row.id)
        except Exception:  # cannot tell: send it (at-least-once), but say so
            log.exception("dispatch.pending_check_failed order_id=%s", row.order_id)
            cancelled = False
        # Queued before a 401 paused everything, or cancelled (`order cancel`) since it
        # was claimed: leave it as the database has it, unsent.
        if paused or cancelled:
            self._results.put(Attempt(row, "skipped"))
            self._wake.set()
            return
        try:
            self.client.delivery_status(row.order_id, row.body, row.idempotency_key)
            attempt = Attempt(row, "delivered")
        except Unavailable as e:
            attempt = Attempt(row, "retry", str(e), e.retry_after)
        except Unauthorized as e:
            attempt = Attempt(row, "unauthorized", str(e))
        except Rejected as e:
            attempt = Attempt(row, "failed", str(e))
        except Exception as e:  # a bug must not lose the push: retry it, loudly
            log.exception("dispatch.crash order_id=%s", row.order_id)
            attempt = Attempt(row, "retry", f"internal error: {e!r}")
        self._results.put(attempt)
        self._wake.set()

    def _record(self) -> None:
        """Turn finished attempts into outbox updates, all in one commit."""
        attempts: list[Attempt] = []
        while True:
            try:
                attempts.append(self._results.get_nowait())
            except queue.Empty:
                break
        if not attempts:
            return
        now = self.clock()
        sent = [a for a in attempts if a.outcome != "skipped"]
        self.store.record_results([self._result(a, now) for a in sent])
        for a in attempts:
            del self._inflight[a.row.id]
        for a in sent:
            with self._stats_lock:
                self.stats.outcomes[a.outcome] += 1
                if a.outcome == "delivered":
                    self.stats.latencies.append(max(0.0, now - a.row.created_at))
            if a.outcome == "failed":
                log.warning(
                    "dispatch.parked order_id=%s status=%s error=%r",
                    a.row.order_id,
                    a.row.status,
                    a.error,
                )

    def _result(self, a: Attempt, now: float) -> PushResult:
        if a.outcome == "delivered":
            if self.paused_until is not None:
                log.info("dispatch.auth_recovered after=%d failures", self._auth_failures)
            self.paused_until, self._auth_failures = None, 0
            self.stats.auth_paused = False
            return PushResult(a.row.id, DELIVERED, now)
        if a.outcome == "failed":
            return PushResult(a.row.id, FAILED, now, None, a.error)
        if a.outcome == "unauthorized":
            self._auth_failures += 1
            self.paused_until = now + retry_delay(self._auth_failures, None, self.schedule)
            self.stats.auth_paused = True
            log.error(
                "dispatch.auth_paused probe_in=%.0fs error=%r", self.paused_until - now, a.error
            )
            return PushResult(a.row.id, PENDING, now, self.paused_until, a.error)
        spread = self.rng.uniform(-RETRY_SPREAD, RETRY_SPREAD)
        delay = retry_delay(a.row.attempts + 1, a.retry_after, self.schedule, spread)
        return PushResult(a.row.id, PENDING, now, now + delay, a.error)

    def _until_next_due(self) -> float:
        """Seconds until a push that is not due yet becomes due (at most 1 s).

        Pushes due now but not claimed wait behind an in-flight or parked push of
        their order; a result or a commit wakes the loop for them.
        """
        now = self.clock()
        if self.paused_until is not None:
            return max(0.01, min(1.0, self.paused_until - now))
        due = self.store.next_due_after(now)
        return 1.0 if due is None else max(0.001, min(1.0, due - now))

    def _refresh_stats(self) -> None:
        """Outbox gauges, at most once a second (they are counts over an index)."""
        now = time.monotonic()
        if now < self._next_stats:
            return
        self._next_stats = now + 1.0
        pending, oldest, failed = self.store.outbox_stats()
        with self._stats_lock:
            self.stats.pending, self.stats.failed = pending, failed
            self.stats.oldest_pending_age_s = (
                0.0 if oldest is None else max(0.0, self.clock() - oldest)
            )

    def report(self) -> DispatchStats:
        """Deltas since the last report, plus the current gauges (thread-safe)."""
        with self._stats_lock:
            return self.stats.take(time.monotonic() - self.heartbeat)
