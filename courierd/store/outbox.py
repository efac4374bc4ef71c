"""The push outbox: claims in order per order, results, gauges, and cancel holds.

A push is claimable only when it heads its order's queue: no earlier push of the same
order is still pending, parked as failed, or held by a cancel in progress. That one
rule is what keeps every order's statuses in chain order, whatever the concurrency.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from courierd.domain import lifecycle
from courierd.domain.model import CANCELLED, Order, iso, value
from courierd.errors import InputError, StoreUnavailable
from courierd.store.cluster import NOW
from courierd.store.db import Database
from courierd.store.schema import DELIVERED

_COLUMNS = "id, order_id, status, body, idempotency_key, attempts, created_at, source"
# Both halves use partial indexes (outbox_due, outbox_open): delivered rows cost nothing.
_HEADS = (
    "FROM outbox AS o WHERE state = 'pending' AND next_attempt_at <= ? "
    "AND NOT EXISTS (SELECT 1 FROM outbox AS p WHERE p.order_id = o.order_id "
    "AND p.state IN ('pending', 'failed') AND p.id < o.id)"
)
CLAIM_SQL = f"SELECT {_COLUMNS} {_HEADS} ORDER BY next_attempt_at, id LIMIT ?"
# SQLite, one instance: the pushes in flight are heads too, and they come first (they
# were due first). Reading them again with every claim, to drop them here, cost a
# table read and a probe of each (about 1 ms per claim of 16 with 256 in flight, a
# quarter of the dispatcher's CPU); left out by id from a JSON list (`json_each`, one
# small index built per claim), they cost an index step each.
CLAIM_FREE_SQL = (
    f"SELECT {_COLUMNS} {_HEADS} AND o.id NOT IN (SELECT value FROM json_each(?)) "
    "ORDER BY next_attempt_at, id LIMIT ?"
)
# Shared databases: a claim is a lease on the row, taken with SKIP LOCKED so instances
# never wait for each other; a head row leased by another instance keeps its order's
# later pushes waiting, exactly as an in-flight push does within one instance. Leases
# are timed by the database's clock (the instances' clocks may differ).
LEASED_CLAIM_SQL = (
    f"UPDATE outbox SET claimed_by = ?, lease_until = {NOW} + ? WHERE id IN (SELECT id "
    f"{_HEADS} AND (lease_until IS NULL OR lease_until < {NOW}) "
    "ORDER BY next_attempt_at, id LIMIT ? "
    f"FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}"
)
# One result. The claim is ours, or nobody's: a push another instance took over after
# our claim lapsed is its to record.
RESULT_SQL = (
    "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
    "next_attempt_at = coalesce(?, next_attempt_at), "
    "delivered_at = CASE WHEN ? = 'delivered' THEN ? END, "
    "claimed_by = NULL, lease_until = NULL "
    "WHERE id = ? AND state = 'pending' AND (claimed_by IS NULL OR claimed_by = ?)"
)
# Deliveries at one time, by ids in a JSON list: what RESULT_SQL does for each.
DELIVERED_SQL = (
    f"UPDATE outbox SET state = '{DELIVERED}', attempts = attempts + 1, last_error = NULL, "
    "delivered_at = ?, claimed_by = NULL, lease_until = NULL "
    "WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending' "
    "AND (claimed_by IS NULL OR claimed_by = ?)"
)


@value
class OutboxRow:
    """A pending push claimed by the dispatcher."""

    id: int
    order_id: str
    status: str
    body: str
    idempotency_key: str
    attempts: int
    created_at: float
    source: str | None = None  # app, geofence or fill (shown to the sandbox in a header)


@value
class PushResult:
    """How one attempt of a push ended, to be recorded."""

    id: int
    state: str  # PENDING (retry at next_attempt_at), DELIVERED or FAILED
    at: float
    next_attempt_at: float | None = None
    error: str | None = None


class Outbox:
    """Outbox operations on one database connection.

    `holder` names this instance in claims; `lease_s` is how long a claim holds on a
    shared database before another instance may take the push over (renew the claims of
    pushes still in flight with `renew`).
    """

    def __init__(self, db: Database, holder: str = "local", lease_s: float = 30.0) -> None:
        self.db = db
        self.holder = holder
        self.lease_s = lease_s
        self._json_each: bool | None = None  # whether SQLite has json_each (asked once)

    # -- dispatcher -------------------------------------------------------------------

    def claim_due(self, now: float, limit: int, busy: Sequence[int] = ()) -> list[OutboxRow]:
        """Due pushes that head their order's queue; `busy` are ids already in flight."""
        if self.db.concurrent:
            with self.db.transaction():
                rows = self.db.rows(LEASED_CLAIM_SQL, (self.holder, self.lease_s, now, limit))
            return sorted((OutboxRow(*r) for r in rows), key=lambda r: r.id)
        if busy and self._has_json_each():
            ids = "[" + ",".join(map(str, busy)) + "]"
            return [OutboxRow(*r) for r in self.db.rows(CLAIM_FREE_SQL, (now, ids, limit))]
        rows = self.db.rows(CLAIM_SQL, (now, limit + len(busy)))
        skip = set(busy)
        return [OutboxRow(*r) for r in rows if r[0] not in skip][:limit]

    def _has_json_each(self) -> bool:
        """SQLite has JSON built in since 3.38 (and most builds before had it); one
        without it claims as before, reading the pushes in flight and dropping them."""
        if self._json_each is None:
            try:
                self.db.value("SELECT count(*) FROM json_each('[1]')")
                self._json_each = True
            except StoreUnavailable as e:  # "no such table: json_each"; else the database
                if "json_each" not in str(e):
                    raise
                self._json_each = False
        return self._json_each

    def renew(self, ids: Sequence[int]) -> None:
        """Extend this instance's claims on pushes still in flight."""
        if not self.db.concurrent or not ids:
            return
        with self.db.transaction():
            self.db.executemany(
                f"UPDATE outbox SET lease_until = {NOW} + ? WHERE id = ? AND claimed_by = ?",
                [(self.lease_s, i, self.holder) for i in ids],
            )

    def unclaim(self, ids: Sequence[int]) -> None:
        """Give back claims on pushes that were not sent (paused, stopping)."""
        if not self.db.concurrent or not ids:
            return
        with self.db.transaction():
            self.db.executemany(
                "UPDATE outbox SET claimed_by = NULL, lease_until = NULL "
                "WHERE id = ? AND claimed_by = ?",
                [(i, self.holder) for i in ids],
            )

    def next_due_after(self, now: float) -> float | None:
        """When the next pending push that is not due at `now` becomes due."""
        due = self.db.value(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' "
            "AND next_attempt_at > ?",
            (now,),
        )
        return None if due is None else float(due)

    def record_results(self, results: Iterable[PushResult]) -> None:
        """Record attempts in one commit; a push cancelled or held meanwhile stays so,
        and so does one another instance took over (its claim is no longer ours)."""
        results = list(results)
        if not results:
            return
        # Deliveries, nearly every result, by one statement per `at` (a burst's results
        # share it) on SQLite: a statement per push cost its binding, its NULLs' adapting
        # and its cursors' opening each time, half of the dispatcher's CPU in recording.
        delivered: dict[float, list[int]] = {}
        others: list[PushResult] = []
        batched = self._batched_ids()
        for r in results:
            if batched and r.state == DELIVERED and r.error is None:
                delivered.setdefault(r.at, []).append(r.id)
            else:
                others.append(r)
        with self.db.transaction():
            for at, ids in delivered.items():
                self.db.execute(
                    DELIVERED_SQL, (at, "[" + ",".join(map(str, ids)) + "]", self.holder)
                )
            if others:
                self.db.executemany(
                    RESULT_SQL,
                    [
                        (r.state, r.error, r.next_attempt_at, r.state, r.at, r.id, self.holder)
                        for r in others
                    ],
                )

    def _batched_ids(self) -> bool:
        """Whether results may name their pushes in one JSON list (SQLite, one instance)."""
        return not self.db.concurrent and self._has_json_each()

    def shift_schedule(self, delta: float) -> int:
        """Move every pending push by `delta` seconds: the wall clock stepped by that much,
        and what was due in 30 s (or overdue) must stay so in the new time."""
        with self.db.transaction():
            return self.db.changed(
                "UPDATE outbox SET next_attempt_at = next_attempt_at + ? WHERE state = 'pending'",
                (delta,),
            )

    def stats(self) -> tuple[int, float | None, int]:
        """(pending pushes, created_at of the oldest pending, failed pushes)."""
        pending, oldest = self.db.row(
            "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'"
        ) or (0, None)
        failed = self.db.value("SELECT count(*) FROM outbox WHERE state = 'failed'")
        return int(pending), oldest, int(failed)

    # -- order cancel -----------------------------------------------------------------

    def get_order(self, order_id: str) -> Order | None:
        row = self.db.row(
            "SELECT state, courier_id, hold_until FROM orders WHERE order_id = ?", (order_id,)
        )
        if row is None:
            return None
        state, courier_id, hold_until = row
        return Order(order_id, state, courier_id, hold_until is not None)

    def hold_for_cancel(self, order_id: str, now: float, hold_s: float) -> Order:
        """Check the order can be cancelled and hold its pushes while OneTablet is asked.

        One write transaction: nothing can move the order between the check and the
        hold. Refused (InputError) after dropoff, or while another cancel holds it.
        """
        with self.db.transaction():
            row = self.db.row(
                "SELECT state, courier_id, hold_until FROM orders WHERE order_id = ?"
                + self.db.for_update,
                (order_id,),
            )
            current = None if row is None else Order(order_id, row[0], row[1])
            if row is not None and row[2] is not None and row[2] > now:
                raise InputError(f"order {order_id} is being cancelled by another command")
            lifecycle.cancel(current, order_id)  # raises InputError when refused
            self.db.execute(
                "INSERT INTO orders (order_id, state, courier_id, updated_at, hold_until) "
                "VALUES (?, 'new', NULL, ?, ?) ON CONFLICT (order_id) DO UPDATE SET "
                "hold_until = excluded.hold_until",
                (order_id, iso(now), now + hold_s),
            )
            self.db.execute(
                "UPDATE outbox SET state = 'held' WHERE order_id = ? AND state = 'pending'",
                (order_id,),
            )
        return current or Order(order_id)

    def finish_cancel(self, order_id: str, now: float) -> int:
        """OneTablet accepted the cancel: the order is cancelled, its unsent pushes dropped."""
        with self.db.transaction():
            self.db.execute(
                "UPDATE orders SET state = ?, hold_until = NULL, updated_at = ? WHERE order_id = ?",
                (CANCELLED, iso(now), order_id),
            )
            return self.db.changed(
                "UPDATE outbox SET state = 'cancelled', last_error = 'order cancelled' "
                "WHERE order_id = ? AND state IN ('pending', 'failed', 'held')",
                (order_id,),
            )

    def release_hold(self, order_id: str) -> None:
        """The cancel did not go through: the order's pushes flow again."""
        with self.db.transaction():
            self._release("order_id = ?", (order_id,))

    def release_expired_holds(self, now: float) -> int:
        """Holds left by a cancel command that died mid-way: give their pushes back."""
        with self.db.transaction():
            return self._release("hold_until <= ?", (now,))

    def _release(self, which_orders: str, params: tuple[object, ...]) -> int:
        """End the holds of the held orders `which_orders` names; their pushes pending.

        The orders' rows first, locked on a shared database: a writer adding a push to
        one of them (it locks the row too) then waits for this release and finds the
        hold gone. With the pushes released first, a push it added in between was held,
        after the release had looked, and stayed held for good."""
        held = self.db.rows(
            f"SELECT order_id FROM orders WHERE {which_orders} ORDER BY order_id"
            f"{self.db.for_update}",
            params,
        )
        released = 0
        for (order_id,) in held:
            self.db.execute("UPDATE orders SET hold_until = NULL WHERE order_id = ?", (order_id,))
            released += self.db.changed(
                "UPDATE outbox SET state = 'pending' WHERE state = 'held' AND order_id = ?",
                (order_id,),
            )
        return released
