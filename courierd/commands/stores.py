"""`courierd stores import FILE` and `courierd stores list`: the store registry.

The CSV has the header `merchant_supplied_id,lat,lng,radius_m` (radius may be empty:
the geofence default applies). The whole file is checked first: one bad line and
nothing is imported (exit 2, naming the line); otherwise every store is inserted or
replaced in one transaction.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from courierd.config import Settings
from courierd.domain.fields import MAX_ID
from courierd.domain.model import Place
from courierd.errors import InputError
from courierd.store import open_store

HEADER = ["merchant_supplied_id", "lat", "lng", "radius_m"]
PROGRESS_EVERY = 50_000


def import_file(settings: Settings, file: str) -> int:
    source = "stdin" if file == "-" else file
    try:
        raw = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read {source}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{source} is not UTF-8 ({e.reason} at byte {e.start})") from None
    stores = list(_rows(text, source))
    with open_store(settings.store) as store:
        count = store.registry.import_stores(stores, time.time())
    print(json.dumps({"imported": count}))
    return 0


def _rows(text: str, source: str) -> Iterator[tuple[str, Place]]:
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise InputError(f"{source}: the first line must be {','.join(HEADER)}")
        seen: set[str] = set()
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank lines are fine
            sid, place = _store(row, f"{source} line {line}")
            if sid in seen:
                raise InputError(f"{source} line {line}: store {sid!r} appears twice")
            seen.add(sid)
            if len(seen) % PROGRESS_EVERY == 0:
                sys.stderr.write(f"stores: {len(seen):,} checked\n")
            yield sid, place
    except csv.Error as e:
        raise InputError(f"{source}: not a CSV file ({e})") from None


def _store(row: list[str], where: str) -> tuple[str, Place]:
    if len(row) != len(HEADER):
        raise InputError(f"{where}: expected {len(HEADER)} columns, found {len(row)}")
    sid, lat, lng, radius = (cell.strip() for cell in row)
    if not sid or len(sid) > MAX_ID or "\x00" in sid:
        raise InputError(f"{where}: merchant_supplied_id must be 1-{MAX_ID} characters")
    return sid, Place(
        _number(lat, "lat", -90, 90, where),
        _number(lng, "lng", -180, 180, where),
        None if not radius else _number(radius, "radius_m", 1, 100_000, where),
    )


def _number(text: str, name: str, low: float, high: float, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {name} {text[:40]!r} is not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{where}: {name} {value:g} is outside {low:g}..{high:g}")
    return value


def list_stores(settings: Settings, as_json: bool) -> int:
    from courierd.commands.operate import table

    with open_store(settings.store) as store:
        rows = store.registry.stores()
    print(json.dumps(rows, indent=2) if as_json else table(rows, [*HEADER, "updated_at"]))
    return 0
