"""Retention (CONTRACT.md 4.12): forget finished orders and old dead letters, a bit at a time.

What a finished order (dropoff, cancelled or expired) leaves behind (its row, transitions,
delivered pushes, event ids) and dead letters go once older than the retention.
Accepted fixes go by their own age, after `fix_retention_s`, the first kept first
(`_fixes`; a courier's fixes may serve several orders, so they cannot go with an order;
at 10k fixes/s they are most of the database, so they are kept for less time than the
orders: replay leaves out, and says so, an order whose fixes went first). An
order with a push still pending, parked or held is kept whole, however old. Each
step is one short transaction; the number of rows per step adapts so that a step
stays near `budget_s`, because the ingest writer waits while a step holds the lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from courierd.domain.lifecycle import finished_sql
from courierd.domain.model import iso
from courierd.store.db import Database, placeholders

MAX_BATCH = 5000
# How far a step of the host clock pruning makes up for: a fix kept before the clock
# stepped back goes with those kept after it (by keeping order) at most this much before
# its own stamp says. Past it (a host that ran a year behind, then came right), fixes go
# by their stamps alone, so a few misstamped ones cannot take days of others with them.
CLOCK_STEP_S = 3600.0


@dataclass(slots=True)
class Pruned:
    """What one step removed."""

    orders: int = 0
    dead_letters: int = 0
    legacy_events: int = 0
    track_points: int = 0

    @property
    def total(self) -> int:
        return self.orders + self.dead_letters + self.legacy_events + self.track_points


class Retention:
    """Prunes one database; call `step` until it returns nothing removed."""

    def __init__(
        self,
        db: Database,
        retention_s: float,
        *,
        fix_retention_s: float | None = None,
        budget_s: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.db = db
        self.retention_s = retention_s
        self.fix_retention_s = retention_s if fix_retention_s is None else fix_retention_s
        self.budget_s = budget_s
        self.clock = clock
        self.batch = 100
        self.longest_s = 0.0  # the slowest step so far, for the tests and the log

    def step(self, now: float) -> Pruned:
        """One transaction removing up to `batch` finished orders and dead letters each."""
        cutoff = iso(now - self.retention_s)
        fix_cutoff = iso(now - self.fix_retention_s)
        started = self.clock()
        done = Pruned()
        with self.db.transaction():
            done.orders = self._orders(cutoff)
            done.dead_letters = self.db.changed(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters "
                "WHERE received_at < ? ORDER BY received_at LIMIT ?)",
                (cutoff, self.batch),
            )
            fix_late = iso(now - self.fix_retention_s + CLOCK_STEP_S)
            done.track_points = self._fixes(fix_cutoff, fix_late, self.batch * 10)
            since = self.db.value("SELECT value FROM meta WHERE key = 'legacy_events_since'")
            if since is not None and since < cutoff:
                done.legacy_events = self.db.changed(
                    "DELETE FROM processed_events WHERE order_id = '' AND event_id IN "
                    "(SELECT event_id FROM processed_events WHERE order_id = '' LIMIT ?)",
                    (self.batch,),
                )
                if done.legacy_events == 0:
                    self.db.execute("DELETE FROM meta WHERE key = 'legacy_events_since'")
        elapsed = self.clock() - started
        self.longest_s = max(self.longest_s, elapsed)
        if elapsed > self.budget_s:
            self.batch = max(1, self.batch // 2)
        elif elapsed < self.budget_s / 4 and done.total >= self.batch:
            self.batch = min(MAX_BATCH, self.batch * 2)
        return done

    def _orders(self, cutoff: str) -> int:
        ids = [
            r[0]
            for r in self.db.rows(
                f"SELECT order_id FROM orders AS o WHERE {finished_sql()} "
                "AND updated_at < ? AND hold_until IS NULL AND NOT EXISTS (SELECT 1 FROM "
                "outbox WHERE outbox.order_id = o.order_id AND state IN ('pending', 'failed', "
                f"'held')) ORDER BY updated_at LIMIT ?{self.db.for_update}",
                (cutoff, self.batch),
            )
        ]
        if not ids:
            return 0
        qs = placeholders(ids)
        for table in ("transitions", "outbox", "processed_events", "onetablet_events", "orders"):
            self.db.execute(f"DELETE FROM {table} WHERE order_id IN ({qs})", ids)
        return len(ids)

    def _fixes(self, cutoff: str, late: str, limit: int) -> int:
        """Prune accepted fixes kept before `cutoff`, the first kept first (by id), up to
        `limit` rows: what stays is then every fix kept from some point on, whichever
        way the clock stepped. By `recorded_at` alone, the fixes kept after the clock
        stepped back (stamped earlier) would go before those kept just before them,
        while replay takes a segment whose first fix is kept as whole (store/replays.py).

        First, by id: up to the last kept of the `limit` stamped earliest, but none
        stamped `late` (CLOCK_STEP_S past the cutoff) or later and none after it, so a
        fix goes at most CLOCK_STEP_S early. Then what is still past the cutoff goes by
        its stamp (a step larger than CLOCK_STEP_S, either way: as before this rule, a
        gap in a segment is then possible; but a fix kept while the clock was ahead does
        not hold pruning back, and misstamped fixes take none with them). Such a fix,
        while it is among the first kept, leaves pruning to go by stamps until it is due
        itself: a smaller step meanwhile may then leave a gap too.

        Ids follow keeping order: one writer on SQLite. On PostgreSQL the id is an
        identity, not cached, so numbered in the order of the inserts whichever instance
        makes them; a batch keeping a courier's fixes holds its `couriers` row locked
        (writer.py), so one courier's fixes are numbered one transaction after another;
        and `recorded_at` is the database's clock (DbClock) for every instance."""
        upto = self.db.value(
            "SELECT max(id) FROM (SELECT id FROM track_points WHERE recorded_at < ? "
            "ORDER BY recorded_at LIMIT ?) AS due",
            (cutoff, limit),
        )
        if upto is None:
            return 0
        # The first kept that may not go early, among the `limit` the delete may take.
        held = self.db.value(
            "SELECT min(id) FROM (SELECT id, recorded_at FROM track_points WHERE id <= ? "
            "ORDER BY id LIMIT ?) AS head WHERE recorded_at >= ?",
            (upto, limit, late),
        )
        gone = self.db.changed(
            "DELETE FROM track_points WHERE id IN (SELECT id FROM track_points "
            "WHERE id <= ? ORDER BY id LIMIT ?)",
            (upto if held is None else held - 1, limit),
        )
        if gone < limit:
            gone += self.db.changed(
                "DELETE FROM track_points WHERE id IN (SELECT id FROM track_points "
                "WHERE recorded_at < ? ORDER BY recorded_at LIMIT ?)",
                (cutoff, limit - gone),
            )
        return gone
