"""Upkeep that runs beside the dispatcher: the offline watchdog, retention, abandoned
orders, and holds left by a dead cancel.

A thread of the dispatch process, on its own database connection. It never stops the
daemon: a failure is logged and tried again on the next round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from courierd.errors import StoreUnavailable
from courierd.store import Store
from courierd.store.cluster import DbClock
from courierd.store.expiry import BATCH as EXPIRE_BATCH
from courierd.store.retention import Pruned

log = logging.getLogger(__name__)

HOLDS_EVERY_S = 5.0
WATCHDOG_EVERY_S = 5.0  # the contract asks for a check at least every 10 s
FIRST_PRUNE_AFTER_S = 10.0
RECLAIM_PAGES = 512  # pages given back per vacuum step (2 MiB at 4 KiB pages)


class Housekeeper:
    """`run(stop)` until stopped; `prune_now` does one whole retention pass."""

    def __init__(
        self,
        store: Store,
        *,
        offline_after_s: float = 300.0,
        on_alert: Callable[[], None] = lambda: None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        # The host's clock (`clock`), or on a shared database the database's: the times
        # compared (holds, last heard from, updated) were stored by every instance.
        self.clock = DbClock(store.db, clock)
        self.offline_after_s = offline_after_s
        self.on_alert = on_alert
        self.couriers_offline = 0  # the gauge, refreshed with every watchdog round
        self.reported = 0  # alerts written since `take_reported` was last called
        retention_s = min(store.retention.retention_s, store.retention.fix_retention_s)
        # CONTRACT.md 4.12 / the retention issue: at least every min(1 h, retention / 4),
        # of the shorter retention (finished orders, or accepted fixes).
        self.prune_every_s = min(3600.0, retention_s / 4)
        # Abandoned orders: looked for every minute, or sooner when they expire sooner.
        self.expire_every_s = min(60.0, store.expiry.abandon_after_s / 4)

    def run(self, stop: threading.Event) -> None:
        next_prune: float | None = None
        next_holds = next_watch = next_expire = 0.0
        while not stop.wait(min(1.0, self.prune_every_s, self.expire_every_s)):
            try:
                now = self.clock()  # a shared database's: it may be unavailable
                if next_prune is None:
                    next_prune = now + min(FIRST_PRUNE_AFTER_S, self.prune_every_s)
                if self.store.db.concurrent and not self.store.leases.hold(
                    "housekeeping", self.store.lease_s
                ):
                    continue  # another instance of the cluster does it
                if now >= next_watch:
                    next_watch = now + WATCHDOG_EVERY_S
                    self.watch(now)
                if now >= next_holds:
                    next_holds = now + HOLDS_EVERY_S
                    released = self.store.outbox.release_expired_holds(now)
                    if released:
                        log.warning("housekeeping.hold_expired pushes_released=%d", released)
                if now >= next_expire:
                    next_expire = now + self.expire_every_s
                    self.expire(now)
                if now >= next_prune:
                    next_prune = now + self.prune_every_s
                    self.prune_now(stop)
            except StoreUnavailable as e:
                log.warning("housekeeping.database_unavailable error=%s (trying again)", e)
            except Exception:
                log.exception("housekeeping.failed (trying again)")

    def watch(self, now: float) -> list[str]:
        """Report couriers silent for too long (one alert each); refresh the gauge."""
        reported = self.store.notices.report_silent(now, self.offline_after_s)
        for courier_id in reported:
            log.warning("watchdog.courier_offline courier_id=%s", courier_id)
        if reported:
            self.reported += len(reported)
            self.on_alert()
        self.couriers_offline = self.store.notices.offline_count()
        return reported

    def expire(self, now: float) -> list[str]:
        """Mark every abandoned order expired (CONTRACT.md 12), a batch at a time."""
        expired: list[str] = []
        while True:
            step = self.store.expiry.step(now)
            expired += step
            if len(step) < EXPIRE_BATCH:
                break
        if expired:
            shown = ",".join(expired[:20]) + (",..." if len(expired) > 20 else "")
            log.info("housekeeping.expired orders=%d order_ids=%s", len(expired), shown)
        return expired

    def take_reported(self) -> int:
        """Alerts written since the last call (for /metrics)."""
        n, self.reported = self.reported, 0
        return n

    def prune_now(self, stop: threading.Event | None = None) -> Pruned:
        """Prune in short transactions until nothing old is left, then reclaim pages."""
        total = Pruned()
        started = time.monotonic()
        while stop is None or not stop.is_set():
            step = self.store.retention.step(self.clock())
            total.orders += step.orders
            total.dead_letters += step.dead_letters
            total.legacy_events += step.legacy_events
            total.track_points += step.track_points
            if step.total == 0:
                break
            # Let the ingest writer in between steps: it waits while a step holds the lock.
            time.sleep(0.005)
        reclaimed = self.store.db.reclaim_free_pages(RECLAIM_PAGES)
        if total.total or reclaimed:
            log.info(
                "retention.pruned orders=%d dead_letters=%d legacy_events=%d track_points=%d "
                "pages_reclaimed=%d seconds=%.2f longest_step_ms=%.1f",
                total.orders,
                total.dead_letters,
                total.legacy_events,
                total.track_points,
                reclaimed,
                time.monotonic() - started,
                self.store.retention.longest_s * 1000,
            )
        return total
