"""A bounded memo of a pure reading of stored text: per row, the text last written and
the value it stands for.

The ingest process reads back, on every batch, JSON it wrote itself on an earlier batch
(an order's geofence track, the fixes its rules consumed). Parsing and checking that
text costs several times what writing it does; the writer knows the value each text
stands for, so it leaves both here, and the next read of that very row takes the value
back if the text read is still the text written. Any other text (the row changed by
another instance, an operator, a restart) is a miss and is parsed as before: the memo
never says what the text does not.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Generic, TypeVar

T = TypeVar("T")


class Memo(Generic[T]):
    """At most `size` rows' (text, value); emptied whole when full (a database with more
    active rows than that gets the misses it would have had without a memo)."""

    def __init__(self, size: int = 65_536) -> None:
        self.size = size
        self._rows: dict[str, tuple[str, T]] = {}

    def get(self, key: str, text: str) -> T | None:
        """The value of `text` if it is what was last put for `key`."""
        found = self._rows.get(key)
        if found is None or found[0] != text:
            return None
        return found[1]

    def put(self, key: str, text: str, value: T) -> None:
        rows = self._rows
        if len(rows) >= self.size and key not in rows:
            rows.clear()
        rows[key] = (text, value)

    def forget(self, key: str) -> None:
        """Drop `key`'s row (one that will not be read again: its order finished)."""
        self._rows.pop(key, None)

    def keep_only(self, keys: Container[str]) -> None:
        """Drop every row but those of `keys`."""
        self._rows = {key: row for key, row in self._rows.items() if key in keys}
