"""Instances sharing one database, as one daemon (CONTRACT.md 10).

- `Leases`: jobs one instance at a time should do (publishing notifications in order,
  housekeeping). A lease is a row with a holder and an expiry; the holder renews it, and
  when it dies (or stops: SIGSTOP) the lease runs out and another instance takes it.
- `Slots`: the MQTT sessions. The cluster reads the broker through K persistent
  sessions, `{client_id}-{k}`, each a member of the same shared subscriptions. Mosquitto
  keeps queueing a disconnected member's share in its session (mosquitto #1747), so a
  dead instance's sessions must be taken over, not waited for: each slot is leased by
  one live instance, which connects with that client id. Leases are spread evenly over
  the live instances (`instances`, heartbeats), a takeover bumps the slot's `epoch`, and
  the ingest transaction checks it (`holds`) so a paused instance that wakes up cannot
  commit, and so cannot acknowledge, what is no longer its share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from courierd.errors import StoreError
from courierd.store.db import Database, placeholders

MIN_STALE_S = 10.0  # an instance silent this long (or a lease, if longer) is gone


class Leases:
    """Named leases held by `holder`."""

    def __init__(self, db: Database, holder: str) -> None:
        self.db = db
        self.holder = holder

    def hold(self, name: str, now: float, ttl_s: float) -> bool:
        """Take or renew the lease `name` until now + ttl_s; False if another holds it."""
        with self.db.transaction():
            return (
                self.db.changed(
                    "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                    "until = excluded.until WHERE leases.holder = excluded.holder "
                    "OR leases.until < ?",
                    (name, self.holder, now + ttl_s, now),
                )
                == 1
            )

    def release(self, name: str) -> None:
        with self.db.transaction():
            self.db.execute(
                "UPDATE leases SET until = 0 WHERE name = ? AND holder = ?", (name, self.holder)
            )


class Slots:
    """This instance's share of the MQTT session slots."""

    def __init__(self, db: Database, instance: str, count: int, lease_s: float = 15.0) -> None:
        self.db = db
        self.instance = instance
        self.count = count
        self.lease_s = lease_s
        self.stale_s = max(MIN_STALE_S, lease_s)
        self.unheld = 0  # slots no live lease covered at the end of the last round

    def join(self, now: float, http: str = "") -> None:
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
                "VALUES (?, ?, ?, ?) ON CONFLICT (instance_id) DO UPDATE SET "
                "heartbeat_at = excluded.heartbeat_at",
                (self.instance, now, now, http),
            )
            self.db.executemany(
                "INSERT INTO slots (slot) VALUES (?) ON CONFLICT (slot) DO NOTHING",
                [(k,) for k in range(self.count)],
            )

    def leave(self) -> None:
        """A clean stop: give the slots up at once, and leave the instance list."""
        with self.db.transaction():
            self.db.execute(
                "UPDATE slots SET holder = NULL, lease_until = NULL WHERE holder = ?",
                (self.instance,),
            )
            self.db.execute("DELETE FROM instances WHERE instance_id = ?", (self.instance,))

    def rebalance(self, now: float, keep: Mapping[int, int]) -> dict[int, int]:
        """One round: heartbeat, renew the leases of the slots in `keep` (slot → epoch)
        that are still ours, take free or expired slots, and let go of slots beyond a
        fair share (they are not renewed, and expire for another instance to take).

        Fair: every live instance holds floor(K / live) slots, some one more. An
        instance lets a slot go only while another live instance has fewer than the
        floor, and takes more than the floor only while nobody else is short of it.
        Returns the slots to hold, with their epochs.
        """
        self._bury(now)
        with self.db.transaction():
            if self.db.dialect == "postgres":  # never hang on a lock: next round instead
                self.db.execute("SET LOCAL lock_timeout = '2s'")
            self.db.execute(
                "INSERT INTO instances (instance_id, started_at, heartbeat_at) VALUES (?, ?, ?) "
                "ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.instance, now, now),
            )
            live = [
                r[0]
                for r in self.db.rows(
                    "SELECT instance_id FROM instances WHERE heartbeat_at >= ?",
                    (now - self.stale_s,),
                )
            ]
            counts: dict[str, int] = dict(
                self.db.rows(
                    "SELECT holder, count(*) FROM slots WHERE holder IS NOT NULL "
                    "AND lease_until >= ? GROUP BY holder",
                    (now,),
                )
            )
            floor_share = self.count // max(1, len(live))
            others_short = any(
                int(counts.get(i, 0)) < floor_share for i in live if i != self.instance
            )
            share = floor_share if others_short else math.ceil(self.count / max(1, len(live)))
            held = self._still_ours(keep, now)
            for slot in sorted(held, reverse=True)[: max(0, len(held) - share)]:
                del held[slot]  # beyond our share: left to expire, then taken by another
            if held:
                qs = placeholders(list(held))
                self.db.execute(
                    f"UPDATE slots SET lease_until = ? WHERE holder = ? AND slot IN ({qs})",
                    (now + self.lease_s, self.instance, *held),
                )
            while len(held) < share:
                taken = self.db.row(
                    "UPDATE slots SET holder = ?, epoch = epoch + 1, lease_until = ? "
                    "WHERE slot = (SELECT slot FROM slots WHERE slot < ? AND (holder IS NULL "
                    "OR lease_until IS NULL OR lease_until < ?) ORDER BY slot LIMIT 1"
                    f"{self.db.for_update}{self.db.skip_locked}) RETURNING slot, epoch",
                    (self.instance, now + self.lease_s, self.count, now),
                )
                if taken is None:
                    break
                held[int(taken[0])] = int(taken[1])
            covered = self.db.value(
                "SELECT count(*) FROM slots WHERE slot < ? AND holder IS NOT NULL "
                "AND lease_until >= ?",
                (self.count, now),
            )
            self.unheld = self.count - int(covered or 0)
        return held

    def _bury(self, now: float) -> None:
        """Forget instances that stopped beating, and end their database sessions.

        A stopped process (SIGSTOP) can sit in the middle of a transaction, its row
        locks holding every other instance up; the server's idle timeout does not end a
        session that stopped half way through sending its statements (a pipeline), so
        the cluster does, first, before anything here could wait on those locks."""
        gone = [
            r[0]
            for r in self.db.rows(
                "SELECT instance_id FROM instances WHERE heartbeat_at < ? AND instance_id <> ?",
                (now - self.stale_s, self.instance),
            )
        ]
        if not gone:
            return
        if self.db.dialect == "postgres":
            from courierd.store import session_name

            names = [session_name(i)[:63] for i in gone]
            self.db.rows(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                f"current_database() AND application_name IN ({placeholders(names)})",
                names,
            )
        with self.db.transaction():
            self.db.executemany("DELETE FROM instances WHERE instance_id = ?", [(g,) for g in gone])

    def _still_ours(self, keep: Mapping[int, int], now: float) -> dict[int, int]:
        if not keep:
            return {}
        qs = placeholders(list(keep))
        rows = self.db.rows(
            f"SELECT slot, epoch FROM slots WHERE slot IN ({qs}) AND holder = ? "
            "AND lease_until >= ?",
            (*keep, self.instance, now),
        )
        return {int(s): int(e) for s, e in rows if keep.get(int(s)) == int(e)}

    def holds(self, fence: Mapping[int, int]) -> bool:
        """Inside the ingest transaction: are these slots still ours, at these epochs?
        The rows stay locked (FOR SHARE) until commit, so no takeover slips in between."""
        if not fence:
            return True
        qs = placeholders(list(fence))
        rows = self.db.rows(
            f"SELECT slot, epoch FROM slots WHERE slot IN ({qs}) AND holder = ? FOR SHARE",
            (*fence, self.instance),
        )
        return {int(s): int(e) for s, e in rows} == dict(fence)

    def view(self) -> list[dict[str, object]]:
        """Every slot and who holds it (for health and operators)."""
        return [
            {"slot": s, "holder": h, "epoch": e, "lease_until": u}
            for s, h, e, u in self.db.rows(
                "SELECT slot, holder, epoch, lease_until FROM slots ORDER BY slot"
            )
        ]
