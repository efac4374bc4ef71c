"""The ingest process: parse and commit batches of MQTT messages, one transaction each.

`commit_messages` parses every message (bad ones become dead letters; the MQTT process
has parsed them already as they arrived, batcher.Reader) and commits the batch in one
transaction; only then does the MQTT process acknowledge it. One fsync
per batch, not per message, is what makes `synchronous=FULL` affordable.

No message can stop ingest (CONTRACT.md 4.14). If the commit fails and the database
is not the cause (`StoreUnavailable` would say so), one of the messages is: the batch
is committed again one message at a time, and the one that still fails is kept as an
`unprocessable` dead letter while the others commit. If the database is the cause
(disk full, locked), nothing was written: the MQTT process retries the batch later.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection

from courierd.config import Settings
from courierd.daemon.ipc import orphaned, settle_gc, wake_for, worker_setup
from courierd.domain.model import (
    STATUS_TEXT,
    Assignment,
    BatchReport,
    CourierOffline,
    DeadLetter,
    Ignored,
    Input,
    LocationFix,
    Outcome,
    ProfileUpdate,
    StatusEvent,
)
from courierd.domain.owntracks import CourierIdFrom
from courierd.domain.planner import Effects
from courierd.domain.telemetry import parse
from courierd.errors import CourierdError, FencedOut, StoreError, StoreUnavailable
from courierd.logs import batched, lean_records
from courierd.store import Store, open_store
from courierd.store.writer import safe_text

log = logging.getLogger(__name__)

Raw = tuple[str, bytes, int]  # topic, payload (maybe only its start), original size
OUTCOMES = tuple(o.value for o in Outcome)
# Counts about fixes, geofences, alerts and ignored messages, for /metrics.
_TRACKING = ("fix_", "geofence_", "courier_", "ignored_")
_KINDS = {
    StatusEvent: "status",
    LocationFix: "location",
    ProfileUpdate: "profile",
    Assignment: "assignment",
    CourierOffline: "lwt",
    Ignored: "ignored",
    DeadLetter: "invalid",
}


def commit_messages(
    store: Store,
    messages: Sequence[Raw],
    now: float,
    owntracks: CourierIdFrom | None = "user",
    slots: Mapping[int, int] | None = None,
    parsed: Sequence[Input | None] | None = None,
) -> BatchReport:
    """Parse and commit one batch; raises only StoreUnavailable or FencedOut (then
    nothing was written).

    `owntracks` says where OwnTracks courier ids come from (None: OwnTracks is off);
    `slots` are the cluster's MQTT slots (with epochs) the batch came through;
    `parsed`, what each message was parsed into already (None: parse it here).
    """
    if parsed is None:
        parsed = [None] * len(messages)
    inputs = [
        parse(topic, payload, now=now, size=size, owntracks=owntracks)
        if done is None or (type(done) is DeadLetter and done.reason == "future_ts")
        else done  # too far ahead on arrival: judged again by this clock (batcher.Reader)
        for (topic, payload, size), done in zip(messages, parsed, strict=True)
    ]
    fx = _commit_isolating(store, messages, inputs, now, slots)
    report = BatchReport(
        len(inputs),
        transitions=len(fx.transitions),
        pushes=len(fx.pushes),
        notifications=len(fx.notifications),
    )
    report.kinds.update(_KINDS[type(item)] for item in inputs)
    report.outcomes.update({k: fx.counts[k] for k in OUTCOMES if fx.counts[k]})
    report.tracking.update({k: n for k, n in fx.counts.items() if k.startswith(_TRACKING)})
    for letter in fx.dead_letters:
        report.rejected[letter.reason] += 1
        log.warning(
            "ingest.rejected reason=%s topic=%s detail=%r",
            letter.reason,
            letter.topic[:200],
            letter.detail[:300],
        )
    if fx.transitions and log.isEnabledFor(logging.INFO):  # (else no line's text is made)
        _log_transitions(fx)
    return report


def _log_transitions(fx: Effects) -> None:
    with batched():  # a line per status: the batch's lines in one write
        for t in fx.transitions:
            log.info(
                "ingest.transition order_id=%s status=%s inferred=%s",
                t.order_id,
                STATUS_TEXT[t.status],
                t.inferred,
            )


def _commit_isolating(
    store: Store,
    messages: Sequence[Raw],
    inputs: list[Input],
    now: float,
    slots: Mapping[int, int] | None = None,
) -> Effects:
    """The batch in one transaction, or one message at a time if a message breaks it."""
    try:
        return store.writer.commit(inputs, now=now, slots=slots)
    except StoreError:  # the database, or fenced: not the data's fault
        raise
    except Exception as e:
        if len(inputs) == 1:
            topic, payload, size = messages[0]
            log.error("ingest.poison topic=%s error=%r", topic[:200], e)
            letter = DeadLetter(
                topic, payload, "unprocessable", safe_text(f"{type(e).__name__}: {e}")[:500], size
            )
            return store.writer.commit([letter], now=now, slots=slots)
        log.warning("ingest.isolating batch=%d error=%r", len(inputs), e)
    merged = Effects()
    for one_message, one_input in zip(messages, inputs, strict=True):
        fx = _commit_isolating(store, [one_message], [one_input], now, slots)
        merged.transitions += fx.transitions
        merged.pushes += fx.pushes
        merged.dead_letters += fx.dead_letters
        merged.counts.update(fx.counts)
    return merged


def clock_offset(store: Store) -> float | None:
    """courierd's clock minus this host's (batcher.Reader's "now"): 0 alone, the
    database's distance on a shared database; None if it cannot be read now."""
    try:
        store.clock()  # reads the database's clock if it is due
    except StoreUnavailable:
        return None
    return store.clock.offset


def ingest_main(settings: Settings, pipe: Connection, wake: Connection, instance: str) -> None:
    """Entry point of the ingest process: commit batches until told to stop."""
    worker_setup(settings, "courierd-ingest")
    lean_records()  # a log line per transition: one per status
    owntracks = settings.owntracks.courier_id if settings.owntracks.enabled else None
    try:
        store = open_store(
            settings.store,
            geofence=settings.geofence,
            instance=instance,
            slots=settings.cluster.slots,
            lease_s=settings.cluster.lease_s,
        )
    except CourierdError as e:
        pipe.send(("fatal", str(e)))
        return
    settle_gc()
    pipe.send(("ready", clock_offset(store)))
    # A batch that failed (database unavailable, fenced) is sent again, or dropped, by the
    # MQTT process: the ones it had already sent behind it are skipped, unwritten, until
    # it says to resume, so that batches are committed in the order they were taken.
    skipping = False
    while True:
        try:
            kind, batch = pipe.recv()
        except (EOFError, OSError):
            orphaned()
        if kind == "stop":
            break
        if kind == "resume":
            skipping = False
            continue
        if skipping and kind == "batch":
            pipe.send(("skipped", None))
            continue
        try:
            if kind == "probe":
                store.writer.heartbeat(time.time())
                pipe.send(("ok", None))
                continue
            messages, parsed, slots = batch
            now = store.clock()
            result = commit_messages(store, messages, now, owntracks, slots, parsed)
            result.clock_offset = store.clock.offset  # read with `now`
        except FencedOut as e:
            pipe.send(("fenced", str(e)))
            skipping = True
            continue
        except StoreUnavailable as e:
            log.error("ingest.database_unavailable error=%s", e)
            pipe.send(("unavailable", str(e)))
            skipping = kind == "batch"
            continue
        except Exception as e:  # a bug: say so, and let systemd restart us
            log.exception("ingest.failed")
            pipe.send(("fatal", f"ingest: {e!r}"))
            break
        pipe.send(("ok", result))
        news = wake_for(result)
        if news:
            # If the dispatcher is gone, the MQTT process hears of it on its own pipe.
            with contextlib.suppress(OSError):
                wake.send_bytes(news)
    store.close()
