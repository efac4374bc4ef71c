"""`courierd replay` and `courierd stores suggest`: tuning the geofences from what happened
(CONTRACT.md 13).

Both only read. SQLite is opened read-only (`mode=ro`: a running daemon keeps writing
beside it); PostgreSQL sessions are read-only (`default_transaction_read_only`, on every
connection), so a bug here could not write either, and a database behind this version
is an error (upgrade the daemon first), never migrated from here. The work is the pure
core's (domain/replay.py, domain/pickup.py).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from courierd.config import GeofenceSettings, Settings
from courierd.domain.fields import parse_rfc3339
from courierd.domain.geofence import GeofenceRules
from courierd.domain.model import format_ts
from courierd.domain.pickup import Suggestion
from courierd.domain.replay import OrderReplay, Summary, replay, summarise
from courierd.errors import InputError, TelemetryError
from courierd.store import Store, open_store
from courierd.store.replays import ReplayReads

PROGRESS_EVERY_S = 1.0
PRUNED_SHOWN = 20  # orders named when their fixes were pruned
_SCREENING = ("max_accuracy_m", "max_speed_mps")


def rules_with(
    settings: GeofenceSettings, pairs: Sequence[str], flag: str = "--set "
) -> tuple[GeofenceRules, bool]:
    """The rules under `--set geofence.KEY=VALUE` overrides, validated like the settings
    file; and whether the screening keys changed (the stored fixes are then screened
    again). InputError names the bad pair (after `flag`: the API's query parameters
    are checked here too, with no flag)."""
    values = settings.model_dump()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or section != "geofence" or not dot or name not in values:
            known = ", ".join(f"geofence.{k}" for k in values if k != "enabled")
            raise InputError(f"{flag}{pair[:80]!r}: expected KEY=VALUE with KEY one of {known}")
        if name == "enabled":
            raise InputError(
                f"{flag}geofence.enabled: replay runs the rules; it cannot turn them off"
            )
        values[name] = value.strip()
    try:
        tuned = GeofenceSettings.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{flag}geofence.{where}: {first['msg']}") from None
    for name, value in tuned.model_dump().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{flag}geofence.{name}: {value} is not a finite number")
    screen = any(getattr(tuned, k) != getattr(settings, k) for k in _SCREENING)
    return GeofenceRules(**tuned.model_dump(exclude={"enabled"})), screen


def moment(text: str | None, flag: str) -> str | None:
    """An RFC 3339 time as stored (UTC, milliseconds), or InputError."""
    if text is None:
        return None
    try:
        return format_ts(parse_rfc3339(text.strip()))
    except TelemetryError as e:
        raise InputError(f"{flag}: {e.detail}") from None


def readonly_store(settings: Settings) -> Store:
    return open_store(settings.store, readonly=True)


def run_replay(
    settings: Settings,
    orders: Sequence[str],
    since: str | None,
    until: str | None,
    overrides: Sequence[str],
    as_json: bool,
) -> int:
    rules, screen = rules_with(settings.geofence, overrides)
    start, end = moment(since, "--since"), moment(until, "--until")
    with readonly_store(settings) as store:
        reads = ReplayReads(store.db)
        ids = reads.order_ids(orders, start, end)
        missing = sorted(set(orders) - set(ids))
        if missing:
            raise InputError(f"no accepted fixes stored for order {missing[0]!r}")
        pruned: dict[str, int] = {}
        results = list(replay_orders(reads, ids, rules, screen, pruned))
    # A partly pruned order is shown, flagged, but kept out of the summary: its replay
    # is not faithful, and would skew the shifts the summary is read for.
    summary = summarise(r for r in results if r.order_id not in pruned)
    if as_json:
        print(json.dumps(replay_json(results, summary, pruned)))
    else:
        print(report_text(results, summary, pruned))
    return 0


def replay_orders(
    reads: ReplayReads,
    ids: Sequence[str],
    rules: GeofenceRules,
    screen: bool,
    pruned: dict[str, int] | None = None,
) -> Iterator[OrderReplay]:
    """Replayed orders; a progress line on stderr each second of a long replay.

    An order some of whose consumed fixes were pruned (retention) is not faithful: it
    is replayed over the fixes still kept, its missing count put in `pruned`, or left
    out when `pruned` is None. Either way stderr names such orders."""
    started = last = time.monotonic()
    fixes = 0
    partial: list[str] = []
    for n, history in enumerate(reads.histories(ids), 1):
        fixes += len(history.fixes)
        if history.missing:
            # Some of its fixes were pruned: a replay would not be faithful.
            partial.append(history.order_id)
            if pruned is None:
                continue
            pruned[history.order_id] = history.missing
        yield replay(history, rules, screen=screen)
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            sys.stderr.write(
                f"replay: {n:,}/{len(ids):,} orders, {fixes:,} fixes, {now - started:.0f} s\n"
            )
    if partial:
        shown = ", ".join(partial[:PRUNED_SHOWN]) + (", ..." if len(partial) > PRUNED_SHOWN else "")
        what = "left out" if pruned is None else "flagged, not in the summary"
        sys.stderr.write(
            f"replay: {len(partial):,} orders {what}, some of the fixes their rules "
            "consumed are no longer kept (accepted fixes are deleted after "
            f"store.fix_retention_days): {shown}\n"
        )


def replay_json(
    results: Sequence[OrderReplay], summary: Summary, pruned: Mapping[str, int] | None = None
) -> dict[str, Any]:
    pruned = pruned or {}
    return {
        "orders": [
            {
                "order_id": r.order_id,
                "missing_fixes": pruned.get(r.order_id, 0),
                "statuses": [
                    {"status": s.status.value, "was": s.was, "would_be": s.would_be}
                    for s in r.statuses
                ],
            }
            for r in results
        ],
        "summary": {**summary.to_json(), "orders_missing_fixes": len(pruned)},
    }


def report_text(
    results: Sequence[OrderReplay], summary: Summary, pruned: Mapping[str, int] | None = None
) -> str:
    """Changed orders one status a line (a partly pruned order's flagged), then the
    summary (of the faithful orders only)."""
    pruned = pruned or {}
    lines = []
    for r in results:
        if r.order_id in pruned:
            lines.append(
                f"{r.order_id}  {pruned[r.order_id]} of its fixes pruned: not faithful, "
                "not in the summary"
            )
        for s in r.statuses:
            if not s.changed:
                continue
            if s.would_be is None:
                what = f"would not fire (was {s.was})"
            elif s.was is None:
                what = f"would newly fire at {s.would_be}"
            else:
                what = f"{s.was} -> {s.would_be} ({_signed(s.shift_s)})"
            lines.append(f"{r.order_id}  {s.status.value}: {what}")
    lines.append(f"orders replayed: {summary.orders}, orders that change: {summary.changed}")
    if pruned:
        lines.append(f"orders with pruned fixes (not in the summary): {len(pruned)}")
    for shift in summary.shifts:
        parts = []
        if shift.median_s is not None and shift.p90_s is not None:
            parts.append(
                f"fired in {shift.orders} both times, shift median "
                f"{_signed(shift.median_s)}, p90 {_signed(shift.p90_s)}"
            )
        if shift.newly:
            parts.append(f"{shift.newly} would newly fire")
        if shift.lost:
            parts.append(f"{shift.lost} would not fire")
        lines.append(f"  {shift.status.value}: " + ", ".join(parts))
    return "\n".join(lines)


def _signed(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:+.1f} s"


def run_suggest(settings: Settings, min_orders: int, fmt: str) -> int:
    with readonly_store(settings) as store:
        found = [s for _, s in ReplayReads(store.db).suggestions(min_orders)]
    if fmt == "json":
        print(json.dumps({"stores": [suggestion_json(s) for s in found]}))
    elif fmt == "csv":
        from courierd.commands.stores import HEADER

        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(HEADER)
        out.writerows([s.merchant_supplied_id, s.lat, s.lng, s.radius_m] for s in found)
    else:
        from courierd.commands.operate import table

        print(table([suggestion_json(s) for s in found], list(SUGGESTION_KEYS)))
    return 0


SUGGESTION_KEYS = ("merchant_supplied_id", "lat", "lng", "radius_m", "visits", "moved_m")


def suggestion_json(s: Suggestion) -> dict[str, Any]:
    return {k: getattr(s, k) for k in SUGGESTION_KEYS}
