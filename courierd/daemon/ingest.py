"""Committing a batch of MQTT messages: the job of the ingest process.

`commit_messages` parses every message (bad ones become dead letters), commits the
whole batch in one transaction (`Store.commit_batch`) and returns a `BatchReport`.
Only then does the MQTT process acknowledge the batch to the broker. One fsync per
batch, not per message, is what makes `synchronous=FULL` affordable.
"""

from __future__ import annotations

import logging

from courierd.domain.model import (
    Assignment,
    BatchReport,
    DeadLetter,
    LocationFix,
    Outcome,
    ProfileUpdate,
    StatusEvent,
)
from courierd.domain.telemetry import parse
from courierd.store.sqlite import Store

log = logging.getLogger(__name__)

OUTCOMES = tuple(o.value for o in Outcome)
_KINDS = {
    StatusEvent: "status",
    LocationFix: "location",
    ProfileUpdate: "profile",
    Assignment: "assignment",
    DeadLetter: "invalid",
}


def commit_messages(store: Store, messages: list[tuple[str, bytes]], now: float) -> BatchReport:
    """Parse and commit one batch. Store errors propagate: they are fatal."""
    inputs = [parse(topic, payload) for topic, payload in messages]
    fx = store.commit_batch(inputs, now=now)
    report = BatchReport(len(inputs), transitions=len(fx.transitions), pushes=len(fx.pushes))
    report.kinds.update(_KINDS[type(item)] for item in inputs)
    report.outcomes.update({k: fx.counts[k] for k in OUTCOMES if fx.counts[k]})
    for letter in fx.dead_letters:
        report.rejected[letter.reason] += 1
        log.warning(
            "ingest.rejected reason=%s topic=%s detail=%r",
            letter.reason,
            letter.topic,
            letter.detail,
        )
    for t in fx.transitions:
        log.info(
            "ingest.transition order_id=%s status=%s inferred=%s",
            t.order_id,
            t.status.value,
            t.inferred,
        )
    return report
