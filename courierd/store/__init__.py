"""courierd's storage: one interface over SQLite (embedded default) or PostgreSQL.

`open_store(settings)` picks the backend from the settings; every job talks to the
same `Store`, whose parts each do one thing:

- `writer`  (writer.py): a batch of MQTT inputs → one transaction of effects;
- `outbox`  (outbox.py): push claims in order per order, results, cancel holds;
- `queries` (queries.py): what `order show` and the operator commands read;
- `notices` (notices.py): MQTT messages to publish, and the offline watchdog;
- `registry` (registry.py): the store registry, and the places of submitted orders;
- `inbound` (inbound.py): what OneTablet tells courierd about orders;
- `retention` (retention.py): pruning what finished orders leave behind;
- `expiry` (expiry.py): abandoned orders become `expired`.

The backend (`db`) is a `Database` (db.py): sqlite.py (the embedded default) or
postgres.py (`store.url`; several instances share it: cluster.py).
"""

from __future__ import annotations

from courierd.config import GeofenceSettings, StoreSettings
from courierd.domain.geofence import GeofenceRules
from courierd.store.cluster import DbClock, Leases, Slots
from courierd.store.db import Database
from courierd.store.expiry import Expiry
from courierd.store.inbound import Inbound
from courierd.store.notices import Notices
from courierd.store.outbox import Outbox
from courierd.store.queries import Queries
from courierd.store.registry import Registry
from courierd.store.retention import Retention
from courierd.store.writer import BatchWriter

DEFAULT_RULES = GeofenceRules()


class Store:
    """One connection to courierd's database and the jobs done over it."""

    def __init__(
        self,
        db: Database,
        *,
        retention_s: float = 30 * 86400.0,
        fix_retention_s: float | None = None,
        abandon_after_s: float = 24 * 3600.0,
        geofence_rules: GeofenceRules | None = DEFAULT_RULES,
        instance: str = "local",
        slots: int = 4,
        lease_s: float = 15.0,
    ) -> None:
        self.db = db
        # The time to stamp and compare stored times by: the host's, or a shared
        # database's (its instances' hosts may disagree). Cheap: one query a second.
        self.clock = DbClock(db)
        self.instance = instance
        self.lease_s = lease_s
        # Shared databases only: the cluster's MQTT session slots, and its leases.
        self.slots = Slots(db, instance, slots, lease_s) if db.concurrent else None
        self.leases = Leases(db, instance)
        fence = self.slots.holds if self.slots is not None else None
        self.writer = BatchWriter(db, geofence_rules, fence)
        self.outbox = Outbox(db, holder=instance, lease_s=2 * lease_s)
        self.queries = Queries(db)
        self.notices = Notices(db)
        self.registry = Registry(db)
        self.inbound = Inbound(db)
        self.retention = Retention(db, retention_s, fix_retention_s=fix_retention_s)
        self.expiry = Expiry(db, abandon_after_s)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(
    settings: StoreSettings,
    *,
    readonly: bool = False,
    geofence: GeofenceSettings | None = None,
    instance: str = "local",
    slots: int = 4,
    lease_s: float = 15.0,
) -> Store:
    """The configured database, opened (and migrated, unless `readonly`: then one
    behind this courierd is a StoreError, and nothing is written to it).

    `instance` names this process's instance in claims and leases (a cluster's members
    must differ); `slots` is the cluster's MQTT session count.
    """
    db: Database
    url = settings.postgres_url
    if url is not None:
        from courierd.store.postgres import PostgresDatabase

        db = PostgresDatabase(
            url,
            readonly=readonly,
            idle_in_transaction_s=lease_s,
            application_name=session_name(instance),
        )
    else:
        from courierd.store.sqlite import SqliteDatabase

        db = SqliteDatabase(
            settings.path,
            synchronous=settings.synchronous,
            busy_timeout_s=settings.busy_timeout_s,
            readonly=readonly,
        )
    return Store(
        db,
        retention_s=settings.retention_days * 86400.0,
        fix_retention_s=settings.fix_retention_days * 86400.0,
        abandon_after_s=settings.abandon_after_h * 3600.0,
        geofence_rules=geofence_rules(geofence or GeofenceSettings()),
        instance=instance,
        slots=slots,
        lease_s=lease_s,
    )


def session_name(instance: str) -> str:
    """The PostgreSQL application_name of an instance's connections."""
    return f"courierd {instance}"


def geofence_rules(settings: GeofenceSettings) -> GeofenceRules | None:
    """The rules the planner applies; None when inference is turned off."""
    if not settings.enabled:
        return None
    return GeofenceRules(**settings.model_dump(exclude={"enabled"}))
