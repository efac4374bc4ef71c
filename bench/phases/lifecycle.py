"""Phase lifecycle: `decide` per event versus a python-statemachine instance per event."""

from __future__ import annotations

import time

from bench.common import STATUSES, say
from courierd.domain.lifecycle import CHAIN


def lifecycle_cost(events: int = 20_000) -> dict[str, float]:
    """µs per event: `decide` on the table read off the machine, versus binding a
    python-statemachine instance to the order and sending the event (what decide avoids)."""
    from courierd.domain.lifecycle import DeliveryLifecycle, decide
    from courierd.domain.model import Order, Status, StatusEvent

    say(f"lifecycle: {events:,} events through decide() and through the machine")
    statuses = [Status(STATUSES[i % len(STATUSES)]) for i in range(events)]

    class Model:
        state = "new"

    start = time.perf_counter()
    order = None
    for i, status in enumerate(statuses):
        d = decide(
            order,
            StatusEvent(f"e{i}", "o", "c", status),
            duplicate=False,
            profile=None,
            received_at="2026-01-01T00:00:00.000Z",
        )
        order = d.order if status is not CHAIN[-1] else Order("o")
    table_us = (time.perf_counter() - start) / events * 1e6
    start = time.perf_counter()
    for status in statuses:
        model = Model()
        model.state = "new" if status is CHAIN[0] else CHAIN[CHAIN.index(status) - 1].value
        DeliveryLifecycle(model=model, state_field="state").send("advance")
    machine_us = (time.perf_counter() - start) / events * 1e6
    say(
        f"  decide {table_us:.1f} µs/event, machine {machine_us:.1f} µs/event "
        f"({machine_us / table_us:.0f}x)"
    )
    return {
        "decide_us": round(table_us, 2),
        "machine_us": round(machine_us, 2),
        "ratio": round(machine_us / table_us, 1),
    }
