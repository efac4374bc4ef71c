"""Instances sharing one database, as one daemon (CONTRACT.md 10).

- `Leases`: jobs one instance at a time should do (publishing notifications in order,
  housekeeping). A lease is a row with a holder and an expiry; the holder renews it, and
  when it dies (or stops: SIGSTOP) the lease runs out and another instance takes it.
- `Slots`: the MQTT sessions. The cluster reads the broker through K persistent
  sessions, `{client_id}-{k}`, each a member of the same shared subscriptions. Mosquitto
  keeps queueing a disconnected member's share in its session (mosquitto #1747), so a
  dead instance's sessions must be taken over, not waited for: each slot is held by one
  live instance, which connects with that client id.

Membership, as Kafka's cooperative rebalancing does it (DESIGN.md, v3):

- An instance is live while its heartbeat (`instances`, one row per instance, renewed
  every round) is younger than `lease_s`. Its slots are its lease: renewing is one
  heartbeat, which never waits on a slot row an ingest transaction holds (`holds`).
- Only silence costs a lease. A slot is taken over when its holder is no longer live;
  a slot beyond an instance's fair share is handed over at once: its holder disconnects
  the session, then clears the holder (`release`), and another takes it the next round.
- A takeover bumps the slot's `epoch`, the fencing token: every batch is committed only
  if the slots and epochs its messages came through are still this instance's.
- Every time is the database's (`NOW`, read in the statement that uses it): the hosts'
  clocks may differ.

`slots.lease_until` is a leftover of the first design (a lease per slot, renewed row by
row, which waited on the rows an ingest transaction holds): nothing reads or writes it.
It stays until no instance that still writes it (builds before 2026-12-07) can share the
database; a later migration drops it (README, "Scaling out").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from courierd.errors import StoreError, StoreUnavailable
from courierd.store.db import Database, placeholders

log = logging.getLogger(__name__)

# The database's clock, in seconds since the epoch (clock_timestamp(): now, not the
# transaction's start, which may be a lock wait ago).
NOW = "extract(epoch from clock_timestamp())::float8"
LOCK_TIMEOUT = "SET LOCAL lock_timeout = '2s'"  # never hang on a lock: next round instead
DB_CLOCK_EVERY_S = 1.0  # how often a process reads how far the database's clock is
DB_CLOCK_STEP_S = 0.5  # the host's clock moved this far from the monotonic one: read again


class DbClock:
    """courierd's clock, for times stored and compared: the host's wall clock, or on a
    shared database the database's, since each instance compares times the others
    stored (pushes due, cancel holds, when a push was made or a courier last heard
    from) and the hosts' clocks may differ.

    How far the database's clock is from `clock` is read once a second, and at once
    when `clock` stepped (NTP, an operator: it moved apart from `monotonic` since the
    last read); not at every call. A step during that read is seen the same way, and the
    reading after it taken alone. StoreUnavailable if the database cannot be reached
    then."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.clock = clock or (lambda: time.time())  # looked up at each call
        self.monotonic = monotonic
        self.offset = 0.0  # the database's clock minus `clock` (0 alone)
        self._next_read = float("-inf")
        self._apart = 0.0  # `clock` minus `monotonic` at the last read

    def __call__(self) -> float:
        now = self.clock()
        if self.db.concurrent:
            mono = self.monotonic()
            if mono >= self._next_read or abs(now - mono - self._apart) > DB_CLOCK_STEP_S:
                at = float(self.db.value(f"SELECT {NOW}"))
                after = self.clock()
                mono_after = self.monotonic()
                if abs(after - now - (mono_after - mono)) > DB_CLOCK_STEP_S:
                    # `clock` stepped during the read: a midpoint across the step is off by
                    # half of it; the later reading is on `clock` as it is now (off by at
                    # most the round trip).
                    self.offset = at - after
                else:
                    self.offset = at - (now + after) / 2
                self._next_read = mono + DB_CLOCK_EVERY_S
                self._apart, now = after - mono_after, after
        return now + self.offset


class Leases:
    """Named leases held by `holder` (shared databases only)."""

    def __init__(self, db: Database, holder: str) -> None:
        self.db = db
        self.holder = holder

    def hold(self, name: str, ttl_s: float) -> bool:
        """Take or renew the lease `name` for ttl_s; False if another holds it."""
        with self.db.transaction():
            return (
                self.db.changed(
                    f"INSERT INTO leases (name, holder, until) VALUES (?, ?, {NOW} + ?) "
                    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                    f"until = excluded.until WHERE leases.holder = excluded.holder "
                    f"OR leases.until < {NOW}",
                    (name, self.holder, ttl_s),
                )
                == 1
            )

    def release(self, name: str) -> None:
        with self.db.transaction():
            self.db.execute(
                "UPDATE leases SET until = 0 WHERE name = ? AND holder = ?", (name, self.holder)
            )


@dataclass(frozen=True, slots=True)
class Round:
    """What one round decided: slots held (slot → epoch), and slots to hand over (their
    sessions disconnected first, then `Slots.release`)."""

    held: dict[int, int] = field(default_factory=dict)
    handover: dict[int, int] = field(default_factory=dict)


class Slots:
    """This instance's share of the MQTT session slots."""

    def __init__(self, db: Database, instance: str, count: int, lease_s: float = 15.0) -> None:
        self.db = db
        self.instance = instance
        self.count = count
        self.lease_s = lease_s
        self._cannot_end_sessions = False
        self.unheld = 0  # slots no live instance held at the end of the last round

    def join(self, http: str = "") -> None:
        """Register this instance, and make sure every slot row exists.

        The slot count is the cluster's, not the instance's: a session that nobody holds
        any more would keep receiving its share of messages, queued for no one. So the
        first instance records it, and an instance configured otherwise is refused.
        """
        with self.db.transaction():
            known = self.db.value("SELECT value FROM meta WHERE key = 'cluster_slots'")
            if known is None:
                self.db.execute(
                    "INSERT INTO meta (key, value) VALUES ('cluster_slots', ?) "
                    "ON CONFLICT (key) DO NOTHING",
                    (str(self.count),),
                )
            elif int(known) != self.count:
                raise StoreError(
                    f"cluster.slots is {known} for this database but {self.count} here: every "
                    "instance must use the same value (see README, Scaling out)"
                )
            self.db.execute(
                "INSERT INTO instances (instance_id, started_at, heartbeat_at, http) "
                f"VALUES (?, {NOW}, {NOW}, ?) ON CONFLICT (instance_id) DO UPDATE SET "
                "heartbeat_at = excluded.heartbeat_at",
                (self.instance, http),
            )
            self.db.executemany(
                "INSERT INTO slots (slot) VALUES (?) ON CONFLICT (slot) DO NOTHING",
                [(k,) for k in range(self.count)],
            )

    def rebalance(self) -> Round:
        """One round: heartbeat (which renews every slot this instance holds), take free
        slots and slots of instances gone silent, and name the slots beyond a fair share.

        Fair: every live instance holds floor(K / live) slots, some one more. An
        instance hands a slot over only while another live instance has fewer than the
        floor, and takes more than the floor only while nobody else is short of it.
        """
        self._bury()
        with self.db.transaction():
            self.db.execute(LOCK_TIMEOUT)
            self.db.execute(
                "INSERT INTO instances (instance_id, started_at, heartbeat_at) "
                f"VALUES (?, {NOW}, {NOW}) "
                "ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.instance,),
            )
            live = [
                r[0]
                for r in self.db.rows(
                    f"SELECT instance_id FROM instances WHERE heartbeat_at >= {NOW} - ?",
                    (self.lease_s,),
                )
            ]
            counts: dict[str, int] = {
                str(h): int(n)
                for h, n in self.db.rows(
                    "SELECT holder, count(*) FROM slots WHERE holder IS NOT NULL GROUP BY holder"
                )
            }
            # Ours whatever we believed: a slot still ours after an error is taken back.
            held = {
                int(s): int(e)
                for s, e in self.db.rows(
                    "SELECT slot, epoch FROM slots WHERE holder = ?", (self.instance,)
                )
            }
            floor_share = self.count // max(1, len(live))
            others_short = any(counts.get(i, 0) < floor_share for i in live if i != self.instance)
            share = floor_share if others_short else -(-self.count // max(1, len(live)))
            beyond = sorted(held, reverse=True)[: max(0, len(held) - share)]
            handover = {s: held.pop(s) for s in beyond}
            while len(held) < share:
                taken = self.db.row(
                    "UPDATE slots SET holder = ?, epoch = epoch + 1 "
                    "WHERE slot = (SELECT slot FROM slots s WHERE slot < ? AND (holder IS NULL "
                    "OR NOT EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = s.holder "
                    f"AND i.heartbeat_at >= {NOW} - ?)) ORDER BY slot LIMIT 1 "
                    "FOR UPDATE SKIP LOCKED) RETURNING slot, epoch",
                    (self.instance, self.count, self.lease_s),
                )
                if taken is None:
                    break
                held[int(taken[0])] = int(taken[1])
            covered = self.db.value(
                "SELECT count(*) FROM slots s WHERE slot < ? AND holder IS NOT NULL "
                "AND EXISTS (SELECT 1 FROM instances i WHERE i.instance_id = s.holder "
                f"AND i.heartbeat_at >= {NOW} - ?)",
                (self.count, self.lease_s),
            )
            self.unheld = self.count - int(covered or 0)
        return Round(held, handover)

    def release(self, slots: Mapping[int, int]) -> None:
        """Hand these slots over now (their sessions are disconnected): free at once."""
        if not slots:
            return
        with self.db.transaction():
            self.db.execute(LOCK_TIMEOUT)
            self.db.executemany(
                "UPDATE slots SET holder = NULL WHERE slot = ? AND epoch = ? AND holder = ?",
                [(s, e, self.instance) for s, e in slots.items()],
            )

    def leave(self) -> None:
        """A clean stop: give the slots up at once, and leave the instance list."""
        with self.db.transaction():
            self.db.execute(LOCK_TIMEOUT)
            self.db.execute("UPDATE slots SET holder = NULL WHERE holder = ?", (self.instance,))
            self.db.execute("DELETE FROM instances WHERE instance_id = ?", (self.instance,))

    def _bury(self) -> None:
        """Forget instances gone silent, ending their database sessions that sit in a
        transaction.

        A stopped process (SIGSTOP) can sit in the middle of a transaction, its row
        locks holding every other instance up; the server's idle timeout does not end a
        session that stopped half way through sending its statements (a pipeline), so
        the cluster does, first, before anything here could wait on those locks. Idle
        sessions hold no lock, and are left alone: ending them would only make a
        healthy instance that was merely slow (or a database that was just restarted)
        log errors. Ending sessions needs the same role or pg_signal_backend; without
        it, the idle timeout is left to do the job, and a warning says so once."""
        gone = [
            r[0]
            for r in self.db.rows(
                f"SELECT instance_id FROM instances WHERE heartbeat_at < {NOW} - ? "
                "AND instance_id <> ?",
                (self.lease_s, self.instance),
            )
        ]
        if not gone:
            return
        from courierd.store import session_name

        names = [session_name(i)[:63] for i in gone]
        try:
            self.db.rows(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                f"current_database() AND application_name IN ({placeholders(names)}) "
                "AND state <> 'idle' AND xact_start < clock_timestamp() - make_interval("
                "secs => ?)",
                (*names, self.lease_s / 2),
            )
        except StoreUnavailable:
            raise
        except Exception as e:  # the driver's error: privileges, a statement timeout
            if not self._cannot_end_sessions:
                log.warning("cluster.cannot_end_sessions instances=%s error=%s", gone, e)
            self._cannot_end_sessions = True
        with self.db.transaction():
            self.db.execute(
                f"DELETE FROM instances WHERE instance_id IN ({placeholders(gone)}) "
                f"AND heartbeat_at < {NOW} - ?",
                (*gone, self.lease_s),
            )

    def holds(self, fence: Mapping[int, int]) -> bool:
        """Inside the ingest transaction: are these slots still ours, at these epochs?
        The rows stay locked (FOR SHARE) until commit, so no takeover or hand-over slips
        in between; renewing (a heartbeat) does not touch them."""
        if not fence:
            return True
        qs = placeholders(list(fence))
        rows = self.db.rows(
            f"SELECT slot, epoch FROM slots WHERE slot IN ({qs}) AND holder = ? FOR SHARE",
            (*fence, self.instance),
        )
        return {int(s): int(e) for s, e in rows} == dict(fence)

    def view(self) -> list[dict[str, object]]:
        """Every slot, who holds it, and until when (for health and operators)."""
        return [
            {"slot": s, "holder": h, "epoch": e, "lease_until": u}
            for s, h, e, u in self.db.rows(
                "SELECT s.slot, s.holder, s.epoch, i.heartbeat_at + ? FROM slots s "
                "LEFT JOIN instances i ON i.instance_id = s.holder ORDER BY s.slot",
                (self.lease_s,),
            )
        ]
