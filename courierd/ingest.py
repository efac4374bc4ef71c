"""Ingest: batching messages (MQTT process) and committing them (core process).

The MQTT process takes messages from the inbox in batches bounded by count and by
milliseconds (`take_batch`) and hands each batch to the core process. There
`commit_messages` parses every message (bad ones become dead letters), commits the
whole batch in one transaction (`Store.commit_batch`) and answers with a
`BatchReport`. Only then does the MQTT process acknowledge the batch to the broker.
One fsync per batch, not per message, is what makes `synchronous=FULL` affordable.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass, field

from courierd.metrics import Metrics
from courierd.model import Assignment, DeadLetter, LocationFix, ProfileUpdate, StatusEvent
from courierd.mqtt import Message
from courierd.store import Store
from courierd.telemetry import parse

log = logging.getLogger(__name__)

OUTCOMES = ("accepted", "duplicate", "stale", "cancelled", "wrong_courier")
_KINDS = {
    StatusEvent: "status",
    LocationFix: "location",
    ProfileUpdate: "profile",
    Assignment: "assignment",
    DeadLetter: "invalid",
}


@dataclass(slots=True)
class BatchReport:
    """What one committed batch did, for metrics in the MQTT process."""

    size: int
    kinds: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    transitions: int = 0
    pushes: int = 0


def take_batch(
    inbox: queue.SimpleQueue[Message], *, size: int, wait_s: float, timeout: float
) -> list[Message]:
    """The first message (waiting up to `timeout`), then whatever follows within `wait_s`."""
    try:
        batch = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + wait_s
    while len(batch) < size:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(inbox.get(timeout=left))
            except queue.Empty:
                break
    return batch


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


def record_batch(metrics: Metrics, report: BatchReport) -> None:
    """Apply a batch report to the Prometheus metrics."""
    metrics.batch_size.observe(report.size)
    for kind, n in report.kinds.items():
        metrics.received.labels(kind).inc(n)
    for outcome, n in report.outcomes.items():
        metrics.events.labels(outcome).inc(n)
    for reason, n in report.rejected.items():
        metrics.rejected.labels(reason).inc(n)
    metrics.transitions.inc(report.transitions)
