"""Where couriers actually wait at a store, learned from their fixes (CONTRACT.md 13), pure.

The registry's point for a store is often not where couriers stand (the back door, the
car park, the pickup shelf down the street), and the dwell rule then fires late or never.
Every order's stay at its store (its fixes between arrived_at_store and
dasher_out_for_delivery) shows where they do.

- The centre is the median latitude and the median longitude of those fixes, not their
  mean: one multipath fix hundreds of metres off moves a mean by metres per fix, a median
  not at all (it takes half the fixes to move it).
- A stay ends with the courier walking or driving off: the fixes before the departure
  rule fired lie between the circle and its exit radius. They are not where anyone
  waits: a stay is cut after its last fix near its own median (within `CORE` times the
  stay's median distance from it, or `MIN_RADIUS_M`).
- The radius holds `HOLD` of the fixes around that centre (nearest rank), never less
  than `MIN_RADIUS_M`: GPS itself is not better than that. It must hold nearly all of
  them: a fix outside the circle starts the dwell over.
- Each stay weighs the same whatever its length: a courier who waited 40 minutes does
  not outvote ten who waited two. A stay's fixes are thinned to at most `PER_VISIT`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from courierd.domain.geo import distance_m
from courierd.domain.model import Place

HOLD = 0.95
MIN_RADIUS_M = 15.0
CORE = 3.0
PER_VISIT = 20


@dataclass(frozen=True, slots=True)
class Suggestion:
    """A store's learned pickup point."""

    merchant_supplied_id: str
    lat: float
    lng: float
    radius_m: float
    visits: int
    moved_m: float  # from the registered point


def suggest(
    store_id: str, registered: Place, visits: Sequence[Sequence[tuple[float, float]]]
) -> Suggestion | None:
    """The pickup point the `visits` (each a stay's fixes, lat/lng) show; None without any."""
    points = [p for visit in visits if visit for p in _thin(_without_departure(visit))]
    if not points:
        return None
    lat, lng = _median_point(points)
    spread = sorted(distance_m(lat, lng, y, x) for y, x in points)
    held = spread[max(0, math.ceil(HOLD * len(spread)) - 1)]
    return Suggestion(
        store_id,
        round(lat, 6),
        round(lng, 6),
        float(max(MIN_RADIUS_M, math.ceil(held))),
        sum(1 for visit in visits if visit),
        round(distance_m(registered.lat, registered.lng, lat, lng), 1),
    )


def _thin(points: Sequence[tuple[float, float]]) -> Sequence[tuple[float, float]]:
    """At most PER_VISIT of a stay's fixes, evenly spread over it."""
    if len(points) <= PER_VISIT:
        return points
    step = len(points) / PER_VISIT
    return [points[int(i * step)] for i in range(PER_VISIT)]


def _median_point(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in points), statistics.median(p[1] for p in points)


def _without_departure(points: Sequence[tuple[float, float]]) -> Sequence[tuple[float, float]]:
    """The stay up to its last fix near its own median (the way out is not the wait)."""
    lat, lng = _median_point(points)
    far = [distance_m(lat, lng, y, x) for y, x in points]
    near = max(MIN_RADIUS_M, CORE * statistics.median(far))
    last = max(i for i, d in enumerate(far) if d <= near or i == 0)
    return points[: last + 1]
