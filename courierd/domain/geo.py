"""Great-circle distance and the rough ETA `order show` reports (CONTRACT.md 9).

Pure: no I/O, no clock. Distances are haversine on a sphere of the mean Earth radius
(IUGG, 6 371 008.8 m): within 0.5 % of the ellipsoid everywhere, far better than phone
GPS, and cheap enough to run on every fix.

The ETA is deliberately crude. Roads are longer than the straight line (x 1.3, a common
urban detour factor), and a courier's instantaneous speed says little about the rest of
the trip, so it is clamped to 3-15 m/s (walking pace to a fast scooter) and taken as
7 m/s when the courier sent none. It is a hint for dispatchers, not a promise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from courierd.domain.model import JSON, NEW, Status

EARTH_RADIUS_M = 6_371_008.8
DETOUR_FACTOR = 1.3
MIN_SPEED_MPS = 3.0
MAX_SPEED_MPS = 15.0
DEFAULT_SPEED_MPS = 7.0

Target = Literal["pickup", "dropoff"]

# Order states in which the courier is still heading for the store, and the one in
# which they are heading for the customer. Finished orders (dropoff, cancelled) have
# no ETA, nor has a state value courierd does not know.
_TO_PICKUP = frozenset(
    {
        NEW,
        Status.DASHER_CONFIRMED.value,
        Status.ARRIVING_AT_STORE.value,
        Status.ARRIVED_AT_STORE.value,
    }
)
_TO_DROPOFF = frozenset({Status.DASHER_OUT_FOR_DELIVERY.value})


class LatLng(Protocol):
    """Anything with a position in degrees: a place, a fix, a `LocationFix`."""

    @property
    def lat(self) -> float: ...

    @property
    def lng(self) -> float: ...


def distance_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Great-circle distance in metres between two points given in degrees (haversine)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlam = math.radians(lng2 - lng1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    # Rounding can push h a hair past 1 for antipodal points; asin would then fail.
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, max(0.0, h))))


def between(a: LatLng, b: LatLng) -> float:
    """Great-circle distance in metres between two positions."""
    return distance_m(a.lat, a.lng, b.lat, b.lng)


# Metres per degree of latitude on the sphere: no two points whose latitudes differ by
# x degrees are nearer than x times this (the meridian is the shortest way between two
# parallels). A hair under it, and a millimetre more (below that the haversine's terms
# underflow to 0), so that rounding never puts the shortcut of `beyond` and `within` on
# the other side of what `between` computes. Public: geofence.py writes the shortcut out
# in its hot path.
M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180 * (1 - 1e-9)
SHORTCUT_MARGIN_M = 1e-3


def beyond(a: LatLng, b: LatLng, limit_m: float) -> bool:
    """`between(a, b) > limit_m`, the very same answer, without the haversine when the
    latitudes alone put the points further apart than that (a courier far from a place,
    most of its fixes)."""
    if abs(a.lat - b.lat) * M_PER_DEG_LAT > limit_m + SHORTCUT_MARGIN_M:
        return True
    return between(a, b) > limit_m


def within(a: LatLng, b: LatLng, limit_m: float) -> bool:
    """`between(a, b) <= limit_m`, the very same answer (a NaN limit too), with the
    shortcut of `beyond`."""
    if abs(a.lat - b.lat) * M_PER_DEG_LAT > limit_m + SHORTCUT_MARGIN_M:
        return False
    return between(a, b) <= limit_m


def eta_speed(speed_mps: float | None) -> float:
    """The speed an ETA assumes: the courier's, clamped to 3-15 m/s; 7 m/s when unknown."""
    if speed_mps is None or not math.isfinite(speed_mps):
        return DEFAULT_SPEED_MPS
    return min(MAX_SPEED_MPS, max(MIN_SPEED_MPS, speed_mps))


@dataclass(frozen=True, slots=True)
class Eta:
    """Where the courier is heading, how far it is in a straight line, and how long."""

    to: Target
    distance_m: float
    seconds: float

    def as_json(self) -> JSON:
        """The `eta` object of `order show`: whole metres and whole seconds."""
        return {"to": self.to, "distance_m": round(self.distance_m), "seconds": round(self.seconds)}


def eta(
    status: str,
    position: LatLng | None,
    pickup: LatLng | None,
    dropoff: LatLng | None,
    speed_mps: float | None = None,
) -> Eta | None:
    """The ETA of an order in state `status` for a courier at `position`, or None.

    Heading for the pickup until the order is `dasher_out_for_delivery`, then for the
    dropoff. None when the order is finished (or its state unknown), or when the courier's
    position or the place it is heading for is unknown. `speed_mps` is the courier's recent
    speed (e.g. from their last fix), None when they sent none.
    """
    target: Target
    if status in _TO_PICKUP:
        target, place = "pickup", pickup
    elif status in _TO_DROPOFF:
        target, place = "dropoff", dropoff
    else:
        return None
    if position is None or place is None:
        return None
    d = between(position, place)
    return Eta(target, d, d * DETOUR_FACTOR / eta_speed(speed_mps))
