"""The batch writer: read the rows a batch touches, plan it, write every effect at once.

One transaction per batch (group commit): orders, transitions, outbox rows, dead
letters, event ids, courier rows, geofence tracks and notifications are committed
together, and only then does the MQTT process acknowledge the batch. The rows are read
inside the write transaction, so nothing (an `order cancel`, another instance) changes
them between read and write: SQLite's BEGIN IMMEDIATE makes the transaction exclusive;
on PostgreSQL the rows are locked (`for_update`), orders before couriers, each sorted,
so that instances never deadlock.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring as _string
from typing import Any

from courierd.domain.geofence import GeofenceRules, Track
from courierd.domain.lifecycle import FINISHED, active_sql, valid_state
from courierd.domain.memo import Memo
from courierd.domain.model import (
    STATUS_TEXT,
    Assignment,
    CourierOffline,
    Input,
    LocationFix,
    Order,
    Place,
    StatusEvent,
    dumps,
    iso,
)
from courierd.domain.planner import (
    Consumed,
    CourierState,
    Effects,
    Places,
    Snapshot,
    plan_batch,
)
from courierd.errors import FencedOut
from courierd.store.db import Database, chunks, placeholders
from courierd.store.schema import HELD, PENDING

# Dead letters keep the start of the payload (enough to see what an app sent) and its size.
DEAD_LETTER_KEEP = 4096
# What the writer keeps per order (BatchWriter._tracks, _consumed, _rows) goes when the
# order finishes in a batch, and otherwise once no batch read the order for a whole
# interval of this many seconds: an order finished outside the writer (cancelled
# through the API or by OneTablet, expired, by another instance) is not read by it
# again, and what it kept of it (about 1.5 KB) stayed until a memo filled.
MEMO_SWEEP_S = 300.0

_ORDER_COLUMNS = (
    "o.order_id, o.state, o.courier_id, o.hold_until, o.status_at, "
    "o.pickup_lat, o.pickup_lng, o.pickup_radius_m, s.lat, s.lng, s.radius_m, "
    "o.dropoff_lat, o.dropoff_lng, o.dropoff_radius_m, o.address_lat, o.address_lng, "
    "o.confirmed_at, o.ready_at, o.assigned_at, o.status_ts, o.track, o.consumed"
)
# An order row's columns up to the track: the part `BatchWriter._order` keeps the
# values of, as they are the same batch after batch (only the track changes per fix).
_ORDER_KEY = 20
_ACTIVE = active_sql("o.state")
_ORDERS_FROM = "FROM orders AS o LEFT JOIN stores AS s ON s.merchant_supplied_id = o.store_id"


def safe_text(text: str) -> str:
    """Any exception text, made storable (lone surrogates escaped, NUL dropped)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "")


def _place(lat: Any, lng: Any, radius: Any) -> Place | None:
    return None if lat is None or lng is None else Place(lat, lng, radius)


Fence = Callable[[Mapping[int, int]], bool]
# What a snapshot takes from one order row: its order, places, track and consumed
# segments (None where the snapshot has none).
_Known = tuple[Order, "Places | None", "Track | None", "Consumed | None"]


class BatchWriter:
    """Commits batches of parsed inputs; see the module text.

    `fence` (shared databases) checks, inside the transaction, that the MQTT slots the
    batch came through are still this instance's: `commit(..., slots=...)`.
    """

    def __init__(
        self,
        db: Database,
        geofence_rules: GeofenceRules | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.db = db
        self.geofence_rules = geofence_rules
        self.fence = fence
        # Each geofenced order's track and consumed fixes, as last written here: the next
        # batch reads the same text back, and takes the value instead of parsing it.
        self._tracks: Memo[Track] = Memo()
        self._consumed: Memo[Consumed] = Memo()
        # Per order, the columns before the track as last read and what they made (the
        # Order and Places): a pure function of those columns, so a row read again with
        # the very same values takes them back instead of building them anew.
        self._rows: dict[str, tuple[tuple[Any, ...], Order, Places | None]] = {}
        # The engine's address (SQLite's rowid) of each order row the batch being
        # committed read: its track is rewritten by that, a cheaper lookup than the key.
        self._addresses: dict[str, Any] = {}
        # The orders batches read since the last sweep (`_sweep`), and when it was.
        self._touched: set[str] = set()
        self._swept_at = float("-inf")
        # With a change marker (SQLite): `changes.seq` as this writer's last commit left
        # it (None: unknown), and what the snapshot takes from each order row, and each
        # courier's active orders, as of that commit. While the marker has not moved
        # since, nobody else wrote an order or a store, and these are exactly what
        # reading the rows would give: a courier's fix then reads no order row.
        self._seq: int | None = None
        self._known: dict[str, _Known] = {}
        self._known_active: dict[str, tuple[str, ...]] = {}
        # The batch's own, applied once it is committed: rows read (by courier), and
        # the track and segments written (None: not kept).
        self._read: dict[str, _Known] = {}
        self._read_active: dict[str, tuple[str, ...]] = {}
        self._wrote: dict[str, tuple[Track | None, Consumed | None, bool]] = {}

    def commit(
        self, inputs: Sequence[Input], *, now: float, slots: Mapping[int, int] | None = None
    ) -> Effects:
        """Decide a batch of inputs and write all its effects in one transaction.

        Raises FencedOut (nothing written) if `slots` are no longer this instance's."""
        order_ids: set[str] = set()
        event_ids: set[tuple[str, str]] = set()  # (order id, event id)
        couriers: set[str] = set()
        tracked: set[str] = set()  # couriers whose active orders the batch needs
        for item in inputs:
            if isinstance(item, StatusEvent):
                order_ids.add(item.order_id)
                event_ids.add((item.order_id, item.event_id))
                couriers.add(item.courier_id)
            elif isinstance(item, LocationFix | CourierOffline):
                couriers.add(item.courier_id)
                tracked.add(item.courier_id)
            elif isinstance(item, Assignment):
                order_ids.add(item.order_id)
                couriers.add(item.courier_id)
        trusted, self._seq = self._seq, None  # unknown unless this batch commits
        seq = None
        with self.db.transaction():
            if slots and self.fence is not None and not self.fence(slots):
                raise FencedOut(f"MQTT slots {sorted(slots)} were taken over by another instance")
            if self.db.concurrent:
                self._create_rows(order_ids, couriers, now)
            try:
                snap = self.snapshot(order_ids, event_ids, couriers, tracked, now=now, seq=trusted)
                fx = plan_batch(snap, inputs, now=now, geofence_rules=self.geofence_rules)
                self.write(fx, snap, now=now)
                for oid, order in fx.orders.items():  # finished: its row is read no more
                    if order.state in FINISHED:
                        self._forget(oid)
                self._touched.update(snap.orders)
                self._touched.update(fx.orders)  # new ones too: the writer holds them
                if self.db.change_marker:
                    # This batch's own order updates move it once (see `write`).
                    seq = self._changes(moved=bool(fx.orders))
            finally:
                self._addresses = {}  # this transaction's: never used in another
        if seq is not None:
            self._remember(fx, snap)
            self._seq = seq
        self._sweep(now)
        return fx

    def _forget(self, order_id: str) -> None:
        """Drop what is kept of an order (see __init__)."""
        self._tracks.forget(order_id)
        self._consumed.forget(order_id)
        self._rows.pop(order_id, None)

    def _sweep(self, now: float) -> None:
        """Once every MEMO_SWEEP_S, drop what is kept of the orders no batch touched since
        the last sweep (a clock stepped back sweeps at once). An order still active, only
        quiet, is a miss when next read: parsed as if never kept."""
        if self._swept_at <= now < self._swept_at + MEMO_SWEEP_S:
            return
        touched, self._touched, self._swept_at = self._touched, set(), now
        self._tracks.keep_only(touched)
        self._consumed.keep_only(touched)
        self._rows = {oid: row for oid, row in self._rows.items() if oid in touched}
        # And what the change marker lets batches skip reading: a courier is read again
        # once any of its active orders is dropped (or it has none).
        known = {oid: row for oid, row in self._known.items() if oid in touched}
        self._known = known
        self._known_active = {
            courier: oids
            for courier, oids in self._known_active.items()
            if oids and all(oid in known for oid in oids)
        }

    def _changes(self, moved: bool = False) -> int | None:
        """The change marker (`moved`: moved on first, for the batch's own order updates);
        None (trust nothing: read every row) if its row is gone."""
        if moved:  # two statements, not RETURNING: that needs SQLite 3.35
            self.db.execute("UPDATE changes SET seq = seq + 1 WHERE name = 'orders'")
        seq = self.db.value("SELECT seq FROM changes WHERE name = 'orders'")
        return None if seq is None else int(seq)

    def _remember(self, fx: Effects, snap: Snapshot) -> None:
        """After a commit: what the batch read, updated with what it wrote, is what the
        next batch would read (the marker says whether anyone else wrote meanwhile)."""
        known, active = self._known, self._known_active
        # Held and newly read rows over the bound: emptied whole, as the memos are. Counted
        # only near it (a difference of the two key views walked every row held, 10k
        # rows each batch of a fleet's fixes).
        read, size = self._read, self._tracks.size
        if len(known) + len(read) > size and len(known) + sum(o not in known for o in read) > size:
            known.clear()
            active.clear()
        known.update(self._read)
        active.update(self._read_active)
        for oid, (track, consumed, keep) in self._wrote.items():
            row = known.get(oid)
            if row is None:
                continue
            if track is None or (consumed is None and not keep):  # not kept: read it
                self._unknow(oid)
            else:
                known[oid] = (row[0], row[1], track, row[3] if keep else consumed)
        # Rows an assignment wrote (places, maybe a courier): read afresh, and so are the
        # active orders of the couriers they were and are now with.
        for oid in fx.assigned:
            self._unknow(oid)
            order = fx.orders.get(oid)
            if order is not None and order.courier_id is not None:
                active.pop(order.courier_id, None)
        # A status writes the row's state, courier and times from the very order the
        # batch decided, and nothing else: the row now reads as what the batch held of
        # it with that order. So for a row it held (read or kept) and for a row it
        # created (every column it did not write is NULL: no places, track, hold). The
        # order joins its courier's active orders, or leaves them once finished (a
        # finished order is not held). Not held: a row read but not kept (held,
        # unreadable track), or a new one given a track (kept only once read).
        read = self._read
        for oid, order in fx.orders.items():
            if oid in fx.assigned:
                continue
            held: _Known | None = None
            if oid in snap.orders or oid in snap.corrupt_orders:  # it had a row
                held = known.get(oid) if oid in read else None
            elif oid not in self._wrote:
                held = (order, None, None, None)
            courier = order.courier_id
            if held is None or held[0].courier_id not in (None, courier):
                self._unknow(oid)
                if courier is not None:
                    active.pop(courier, None)
                continue
            oids = None if courier is None else active.get(courier)
            if order.state in FINISHED:
                known.pop(oid, None)
                if oids is not None and courier is not None:
                    active[courier] = tuple(o for o in oids if o != oid)
                continue
            known[oid] = (order, held[1], held[2], held[3])
            if oids is not None and courier is not None and oid not in oids:
                active[courier] = (*oids, oid)

    def _unknow(self, oid: str) -> None:
        """Read the order's row (and its courier's active orders) again next batch."""
        row = self._known.pop(oid, None)
        if row is not None and row[0].courier_id is not None:
            self._known_active.pop(row[0].courier_id, None)

    def _create_rows(self, order_ids: set[str], couriers: set[str], now: float) -> None:
        """Make sure the rows a batch reads exist, so that reading them locks them: two
        instances taking the same new order then wait for each other instead of both
        deciding it afresh. Sorted, like every lock courierd takes."""
        self.db.executemany(
            "INSERT INTO orders (order_id, state, updated_at) VALUES (?, 'new', ?) "
            "ON CONFLICT (order_id) DO NOTHING",
            [(oid, iso(now)) for oid in sorted(order_ids)],
        )
        self.db.executemany(
            "INSERT INTO couriers (courier_id) VALUES (?) ON CONFLICT (courier_id) DO NOTHING",
            [(cid,) for cid in sorted(couriers)],
        )

    def snapshot(
        self,
        order_ids: set[str],
        event_ids: set[tuple[str, str]],
        couriers: set[str],
        tracked: set[str],
        *,
        now: float,
        seq: int | None = None,
    ) -> Snapshot:
        """The rows a batch needs; call inside `transaction()` so nobody changes them.

        `seq`: the change marker as this writer's last commit left it: if it has not
        moved, the active orders of couriers the writer holds are not read again."""
        snap = Snapshot()
        db = self.db
        address = f", o.{db.row_address}" if db.row_address else ""
        self._couriers(snap, couriers)
        # Couriers reported offline need their orders too: a message brings them back.
        tracked |= {c for c, state in snap.couriers.items() if state.offline}
        self._read, self._read_active, self._wrote = {}, {}, {}
        if db.change_marker:
            if seq is None or self._changes() != seq:  # someone else wrote: read all
                self._known.clear()
                self._known_active.clear()
            else:
                tracked = self._from_known(snap, tracked)
                order_ids = self._orders_from_known(snap, order_ids)
        where = []
        params: list[Any] = []
        for chunk in chunks(order_ids):
            where.append(f"o.order_id IN ({placeholders(chunk)})")
            params += chunk
        for chunk in chunks(tracked):
            where.append(f"(o.courier_id IN ({placeholders(chunk)}) AND {_ACTIVE})")
            params += chunk
        if where:
            # One statement, sorted where it locks rows: PostgreSQL instances lock orders
            # in the same order. (SQLite's transaction is exclusive: it locks no rows, and
            # its sort is a temporary B-tree of every row read.)
            lock = db.for_update_of("o")
            order_by = f" ORDER BY o.order_id{lock}" if lock else ""
            rows = db.rows(
                f"SELECT {_ORDER_COLUMNS}{address} {_ORDERS_FROM} WHERE {' OR '.join(where)}"
                f"{order_by}",
                params,
            )
            for row in rows:
                self._order(snap, row)
            if db.change_marker and not snap.corrupt_orders:  # corrupt: reported each time
                read = self._read
                for courier in tracked:
                    oids = tuple(snap.active.get(courier, ()))
                    if all(oid in read for oid in oids):
                        self._read_active[courier] = oids
        self._seen_events(snap, event_ids)
        return snap

    def _from_known(self, snap: Snapshot, tracked: set[str]) -> set[str]:
        """Fill `snap` with the active orders of the tracked couriers the writer holds;
        returns the couriers left to read."""
        known, active = self._known, self._known_active
        left = set()
        for courier in tracked:
            oids = active.get(courier)
            if oids is None or not all(map(known.__contains__, oids)):
                left.add(courier)
                continue
            if oids:
                snap.active.setdefault(courier, set()).update(oids)
            for oid in oids:
                self._read[oid] = known[oid]
                _take(snap, oid, known[oid])
        return left

    def _orders_from_known(self, snap: Snapshot, order_ids: set[str]) -> set[str]:
        """Fill `snap` with the orders of `order_ids` the writer holds (as reading their
        rows by id would: the order, its places, track and segments, and the order among
        its courier's active ones); returns the order ids left to read."""
        known, read, active = self._known, self._read, snap.active
        left = set()
        for oid in order_ids:
            row = known.get(oid)
            if row is None:
                left.add(oid)
                continue
            read[oid] = row
            # `_take`, inline (a call per status).
            order, places, track, consumed = row
            snap.orders[oid] = order
            if places is not None:
                snap.places[oid] = places
            if track is not None:
                snap.tracks[oid] = track
            if consumed is not None:
                snap.consumed[oid] = consumed
            courier = order.courier_id
            if courier is not None:  # what the writer holds is never finished
                oids = active.get(courier)
                if oids is None:
                    active[courier] = {oid}
                else:
                    oids.add(oid)
        return left

    def _seen_events(self, snap: Snapshot, event_ids: set[tuple[str, str]]) -> None:
        """Which of the batch's (order id, event id) pairs were seen before. A row with the
        order id '' is from before ids named their order: it counts for every order."""
        # Pair by pair, one primary-key probe each: an IN list per column made SQLite
        # probe every order with every id (100 orders x 500 ids a batch of statuses:
        # 40 ms, half the status-only ingest's time). Unsorted: a read that locks nothing.
        pairs = list(event_ids)
        for i in range(0, len(pairs), 250):
            chunk = pairs[i : i + 250]
            values = ",".join("(?, ?)" for _ in chunk)
            snap.seen_event_ids.update(
                (order_id, event_id)
                for order_id, event_id in self.db.rows(
                    f"WITH wanted (order_id, event_id) AS (VALUES {values}) "
                    "SELECT p.order_id, p.event_id FROM wanted JOIN processed_events p "
                    "ON p.order_id = wanted.order_id AND p.event_id = wanted.event_id",
                    [v for pair in chunk for v in pair],
                )
            )
        # Ids from before ids named their order (migration 6 gave them the order id ''):
        # looked up only while any is left (one probe a batch of statuses). Retention
        # deletes them, and courierd writes none since, so on most databases there is
        # none: the lookup by id cost about 2k instructions per status for nothing.
        legacy = event_ids and self.db.value(
            "SELECT 1 FROM processed_events WHERE order_id = '' LIMIT 1"
        )
        by_id: dict[str, set[str]] | None = None  # the batch's orders per event id, if needed
        wanted = sorted({event_id for _, event_id in event_ids}) if legacy else []
        for id_chunk in chunks(wanted):
            for _, event_id in self.db.rows(
                "SELECT order_id, event_id FROM processed_events "
                f"WHERE order_id = '' AND event_id IN ({placeholders(id_chunk)})",
                id_chunk,
            ):
                if by_id is None:  # (rows from before ids named their order: seldom)
                    by_id = {}
                    for order_id, batch_event_id in event_ids:
                        by_id.setdefault(batch_event_id, set()).add(order_id)
                snap.seen_event_ids.update((o, event_id) for o in by_id[event_id])

    def _couriers(self, snap: Snapshot, couriers: set[str]) -> None:
        for chunk in chunks(sorted(couriers)):
            for (
                cid,
                profile,
                fix_ts,
                lat,
                lng,
                acc,
                speed,
                heading,
                seen,
                offline,
                fix_at,
            ) in self.db.rows(
                "SELECT courier_id, profile, fix_ts, lat, lng, accuracy_m, speed_mps, "
                "heading, last_seen, offline, fix_at FROM couriers "
                f"WHERE courier_id IN ({placeholders(chunk)}) "
                f"ORDER BY courier_id{self.db.for_update}",
                chunk,
            ):
                fix = None
                if fix_ts is not None and lat is not None and lng is not None:
                    fix = LocationFix(cid, fix_ts, lat, lng, acc, speed, heading)
                snap.couriers[cid] = CourierState(fix, seen, bool(offline), fix_at)
                if profile is None:
                    continue
                try:
                    info = json.loads(profile)
                except (TypeError, ValueError, RecursionError):
                    info = None
                if isinstance(info, dict):
                    snap.profiles[cid] = info
                else:
                    snap.corrupt_profiles.add(cid)

    def _order(self, snap: Snapshot, row: tuple[Any, ...]) -> None:
        oid, state, courier, hold_until = row[:4]
        track, consumed = row[_ORDER_KEY : _ORDER_KEY + 2]
        if len(row) > _ORDER_KEY + 2:
            self._addresses[oid] = row[_ORDER_KEY + 2]
        key = row[:_ORDER_KEY]
        known_row = self._rows.get(oid)
        if known_row is not None and known_row[0] == key:
            # Seen before, unchanged: state valid, not held (only such rows are kept).
            order, places = known_row[1], known_row[2]
        else:
            if not valid_state(state):
                snap.corrupt_orders.add(oid)
                return
            order, places = self._order_of(key)
            # A held order's row is not kept (its release is another process's write);
            # nor is a finished order's row, which a batch seldom reads again (a late
            # duplicate).
            if state in FINISHED:
                self._rows.pop(oid, None)
            elif hold_until is None:
                rows = self._rows
                if len(rows) >= self._tracks.size and oid not in rows:
                    rows.clear()
                rows[oid] = (key, order, places)
        snap.orders[oid] = order
        if courier is not None and state not in FINISHED:
            snap.active.setdefault(courier, set()).add(oid)
        if places is not None:
            snap.places[oid] = places
        if track is not None:
            known = self._tracks.get(oid, track)
            if known is not None:
                snap.tracks[oid] = known
            else:
                with contextlib.suppress(ValueError):  # unreadable: the rules start over
                    snap.tracks[oid] = Track.from_json(track)
        if consumed is not None:
            segments = self._consumed.get(oid, consumed)
            if segments is not None:
                snap.consumed[oid] = segments
            else:
                with contextlib.suppress(ValueError):  # unreadable: counted afresh
                    snap.consumed[oid] = read_consumed(consumed)
        # What the snapshot took from a row it may take again without reading it, while
        # the change marker stands still: not a held order's (released by another process)
        # nor an unreadable track's or segments' (kept as text only).
        if (
            self.db.change_marker
            and hold_until is None
            and state not in FINISHED
            and (track is None or oid in snap.tracks)
            and (consumed is None or oid in snap.consumed)
        ):
            self._read[oid] = (order, places, snap.tracks.get(oid), snap.consumed.get(oid))

    @staticmethod
    def _order_of(key: tuple[Any, ...]) -> tuple[Order, Places | None]:
        """The order and its places, from an order row's columns before the track."""
        (oid, state, courier, hold_until, status_at, p_lat, p_lng, p_rad, s_lat, s_lng, s_rad,
         d_lat, d_lng, d_rad, a_lat, a_lng, confirmed_at, ready_at, assigned_at,
         status_ts) = key  # fmt: skip
        # Held until the hold is released (housekeeping, within seconds of its end), not
        # only until it ends: a push made in between joins the held ones, and so is not
        # sent ahead of them (they wait for the release; only pending ones are claimed).
        held = hold_until is not None
        order = Order(
            oid, state, courier, held, status_at, confirmed_at, ready_at, assigned_at, status_ts
        )
        pickup = _place(p_lat, p_lng, p_rad) or _place(s_lat, s_lng, s_rad)
        dropoff = _place(d_lat, d_lng, d_rad) or _place(a_lat, a_lng, None)
        if pickup is None and dropoff is None:
            return order, None
        return order, Places(pickup, dropoff)

    def write(self, fx: Effects, snap: Snapshot, *, now: float) -> None:
        """Write every effect of a batch; call inside `transaction()` (one commit)."""
        db = self.db
        now_iso = iso(now)
        # With a change marker, the upsert's update moves `track_rev`, as the writer's
        # rewrite of a track does, so that the update trigger skips the writer's own rows
        # (schema.py) and the writer moves the marker once per batch instead (`_changes`).
        # A new row moves it through the insert trigger, as anyone's does.
        rev = ", track_rev = orders.track_rev + 1" if db.change_marker else ""
        db.insert_rows(
            # (No OR FAIL: SQLite runs an upsert's DO UPDATE with ABORT whatever the
            # statement says, so it keeps its statement journal anyway.)
            "INSERT INTO orders (order_id, state, courier_id, updated_at, status_at, "
            "assigned_at, status_ts) VALUES",
            "(?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    o.order_id,
                    o.state,
                    o.courier_id,
                    now_iso,
                    o.status_at,
                    o.assigned_at,
                    o.status_ts,
                )
                for o in fx.orders.values()
            ],
            " ON CONFLICT (order_id) DO UPDATE SET state = excluded.state, "
            "courier_id = excluded.courier_id, updated_at = excluded.updated_at, "
            "status_at = excluded.status_at, assigned_at = excluded.assigned_at, "
            f"status_ts = excluded.status_ts{rev}",
        )
        for kind in ("pickup", "dropoff"):  # an assignment's place replaces the known one
            db.executemany(
                f"UPDATE orders SET {kind}_lat = ?, {kind}_lng = ?, {kind}_radius_m = ? "
                "WHERE order_id = ?",
                [
                    (place.lat, place.lng, place.radius_m, oid)
                    for oid, places in fx.assigned.items()
                    if (place := getattr(places, kind)) is not None
                ],
            )
        # Tracks of the orders the batch read, by their address if the engine has one;
        # the others (an order new in this batch) by key.
        by_address: list[tuple[str, str | None, Any]] = []
        by_key: list[tuple[str, str | None, Any]] = []
        addresses = self._addresses
        for oid, track in fx.tracks.items():
            texts = self._track_text(oid, track), self._consumed_text(oid, fx.consumed.get(oid))
            address = addresses.get(oid)
            if address is None:
                by_key.append((*texts, oid))
            else:
                by_address.append((*texts, address))
        # `rev` (above) tells this rewrite from anyone else's too (schema.py).
        for rows, column in ((by_key, "order_id"), (by_address, db.row_address)):
            if not db.update_from:  # one statement per row
                db.executemany(
                    f"UPDATE{db.or_fail} orders SET track = ?, "
                    f"consumed = COALESCE(?, consumed){rev} WHERE {column} = ?",
                    rows,
                )
                continue
            db.insert_rows(  # several rows per statement, as inserts are
                "WITH v (track, consumed, k) AS (VALUES",
                "(?, ?, ?)",
                rows,
                f") UPDATE{db.or_fail} orders SET track = v.track, consumed = COALESCE("
                f"v.consumed, orders.consumed){rev} FROM v WHERE orders.{column} = v.k",
            )
        db.insert_rows(
            f"INSERT{db.or_fail} INTO transitions (order_id, status, inferred, event_id, at, "
            "recorded_at, source, lat, lng, fixes, clocked) VALUES",
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    t.order_id,
                    STATUS_TEXT[t.status],
                    int(t.inferred),
                    t.event_id,
                    t.at,
                    now_iso,
                    t.source,
                    None if t.where is None else t.where[0],
                    None if t.where is None else t.where[1],
                    fx.transition_fixes[i] if i < len(fx.transition_fixes) else None,
                    int(t.clocked),
                )
                for i, t in enumerate(fx.transitions)
            ],
        )
        # A push of an order whose cancel is in progress waits ("held") for its outcome.
        held = {oid for oid, o in {**snap.orders, **fx.orders}.items() if o.held}
        db.insert_rows(
            f"INSERT{db.or_fail} INTO outbox (order_id, status, body, idempotency_key, state, "
            "attempts, next_attempt_at, created_at, source) VALUES",
            f"(?, ?, ?, ?, ?, 0, {db.at_once}, ?, ?)",
            [
                (
                    p.order_id,
                    STATUS_TEXT[p.status],
                    p.body,
                    p.idempotency_key,
                    HELD if p.order_id in held else PENDING,
                    now,
                    now,
                    p.source,
                )
                for p in fx.pushes
            ],
            f" ON CONFLICT ({db.push_key}) DO NOTHING",
        )
        db.executemany(
            "INSERT INTO dead_letters (topic, payload, reason, detail, received_at, size) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    safe_text(d.topic),
                    d.payload[:DEAD_LETTER_KEEP],
                    d.reason,
                    safe_text(d.detail),
                    now_iso,
                    len(d.payload) if d.size is None else d.size,
                )
                for d in fx.dead_letters
            ],
        )
        db.insert_rows(
            f"INSERT{db.or_fail} INTO processed_events (order_id, event_id, seen_at) VALUES",
            "(?, ?, ?)",
            [(order_id, e, now_iso) for order_id, e in sorted(fx.event_ids)],
            " ON CONFLICT (order_id, event_id) DO NOTHING",
        )
        db.executemany(
            "INSERT INTO couriers (courier_id, profile, profile_at) VALUES (?, ?, ?) "
            "ON CONFLICT (courier_id) DO UPDATE SET profile = excluded.profile, "
            "profile_at = excluded.profile_at",
            [
                (cid, None if info is None else dumps(info), now_iso)
                for cid, info in fx.profiles.items()
            ],
        )
        # The planner read these rows in this transaction: what it says is the truth.
        db.executemany(
            "INSERT INTO couriers (courier_id, fix_ts, lat, lng, accuracy_m, speed_mps, "
            "heading, last_seen, offline, fix_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (courier_id) DO UPDATE SET fix_ts = excluded.fix_ts, "
            "lat = excluded.lat, lng = excluded.lng, accuracy_m = excluded.accuracy_m, "
            "speed_mps = excluded.speed_mps, heading = excluded.heading, "
            "last_seen = excluded.last_seen, offline = excluded.offline, "
            "fix_at = excluded.fix_at",
            [_courier_row(cid, state) for cid, state in sorted(fx.couriers.items())],
        )
        db.insert_rows(
            f"INSERT{db.or_fail} INTO track_points (courier_id, ts, lat, lng, accuracy_m, "
            "recorded_at) VALUES",
            "(?, ?, ?, ?, ?, ?)",
            [(f.courier_id, f.ts, f.lat, f.lng, f.accuracy_m, now_iso) for f in fx.track_points],
        )
        db.executemany(
            "INSERT INTO notifications (topic, payload, created_at) VALUES (?, ?, ?)",
            [(n.topic, n.payload, now) for n in fx.notifications],
        )

    def _track_text(self, order_id: str, track: Track) -> str:
        text, value = track.stored()
        if value is not None:
            self._tracks.put(order_id, text, value)
        self._wrote[order_id] = (value, None, True)
        return text

    def _consumed_text(self, order_id: str, consumed: Consumed | None) -> str | None:
        if consumed is None:
            return None
        text, value = stored_consumed(consumed)
        if value is not None:
            self._consumed.put(order_id, text, value)
        track = self._wrote.get(order_id, (None, None, True))[0]  # written just before
        self._wrote[order_id] = (track, value, False)
        return text

    def heartbeat(self, now: float) -> None:
        """A real write and commit: proves the database takes writes (health's probe)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('heartbeat', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (iso(now),),
            )


def _consumed_json(consumed: Consumed | None) -> str | None:
    return None if consumed is None else stored_consumed(consumed)[0]


def stored_consumed(consumed: Consumed) -> tuple[str, Consumed | None]:
    """The JSON text to store, and what `read_consumed` gives back for it (None if it
    would refuse it). Segments as the planner makes them (two strings and a positive
    int) are written by hand, into the very text the JSON encoder writes."""
    if len(consumed) == 1:  # most orders: one courier, one segment
        c, first, n = consumed[0]
        if _plain_segment(c, first, n):
            return f"[[{_string(c)},{_string(first)},{n}]]", consumed
    if all(_plain_segment(c, first, n) for c, first, n in consumed):
        text = ",".join(f"[{_string(c)},{_string(first)},{n}]" for c, first, n in consumed)
        return f"[{text}]", consumed
    return dumps([list(segment) for segment in consumed]), None


def _plain_segment(courier: Any, first: Any, n: Any) -> bool:
    """A segment as the planner makes it: written by hand, as the encoder would."""
    return type(courier) is str and type(first) is str and type(n) is int and n > 0


def read_consumed(text: str) -> Consumed:
    """Stored segments (see planner.Consumed); ValueError if they are anything else."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError("consumed is not JSON") from e
    if not isinstance(doc, list) or not all(
        isinstance(seg, list)
        and len(seg) == 3
        and isinstance(seg[0], str)
        and isinstance(seg[1], str)
        and isinstance(seg[2], int)
        and not isinstance(seg[2], bool)
        and seg[2] > 0
        for seg in doc
    ):
        raise ValueError("consumed is not [[courier_id, first_ts, count], ...]")
    return tuple((c, first, n) for c, first, n in doc)


def _courier_row(courier_id: str, state: CourierState) -> tuple[Any, ...]:
    f = state.fix
    seen = (state.last_seen, int(state.offline), state.fix_at)
    if f is None:
        return (courier_id, None, None, None, None, None, None, *seen)
    return (courier_id, f.ts, f.lat, f.lng, f.accuracy_m, f.speed_mps, f.heading, *seen)


def _take(snap: Snapshot, oid: str, row: _Known) -> None:
    """Put what the writer holds of an order's row into `snap`, as reading it would."""
    order, places, track, consumed = row
    snap.orders[oid] = order
    if places is not None:
        snap.places[oid] = places
    if track is not None:
        snap.tracks[oid] = track
    if consumed is not None:
        snap.consumed[oid] = consumed
