"""Log lines: the cheap way of writing them (courierd/logs.py) writes the very lines
the plain one did, and the daemon's lines reach stderr promptly and whole."""

from __future__ import annotations

import io
import json
import logging
import re
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import courierd.logs
from courierd.daemon.ingest import commit_messages
from courierd.logs import (
    TEXT_DATE,
    TEXT_LINE,
    JsonFormatter,
    LineFormatter,
    TextFormatter,
    batched,
    escape_controls,
    setup_logging,
)
from courierd.store import Store
from tests.harness import Rig, wait_until


def _unsafe(c: str) -> bool:
    """The characters a line must not hold as they are (CONTRACT: one line per event):
    C0, DEL, C1, U+2028, U+2029, lone surrogates. Written out here, not logs._UNSAFE."""
    code = ord(c)
    return (
        code < 0x20
        or 0x7F <= code <= 0x9F
        or code in (0x2028, 0x2029)
        or (0xD800 <= code <= 0xDFFF)
    )


def escaped(text: str) -> str:
    """The reference: each unsafe character as \\xNN or \\uNNNN, one at a time."""
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") if _unsafe(c) else c
        for c in text
    )


# Text that has what a fast path could miss: controls, separators, surrogates, other
# non-printable characters that are safe (NBSP, soft hyphen, unassigned), and plain text.
ODD = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x20),
    st.characters(min_codepoint=0x7F, max_codepoint=0xA0),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from(["\u2028", "\u2029", "\u00ad", "\u200b", "\ufeff", "\U000e0001", "\u0378"]),
)
TEXTS = st.lists(st.one_of(st.text(max_size=8), ODD), max_size=8).map("".join)


def test_every_character_is_escaped_as_the_reference_says() -> None:
    """The whole Basic Multilingual Plane (every unsafe character is in it), one
    character at a time: the fast path (`str.isprintable`) never lets through a
    character the escape must rewrite."""
    wrong = [c for c in map(chr, range(0x10000)) if escape_controls(c) != escaped(c)]
    assert wrong == []


@given(TEXTS)
def test_escape_controls_is_the_reference_on_any_text(text: str) -> None:
    assert escape_controls(text) == escaped(text)


RECORDS = st.lists(
    st.tuples(
        # times within a few seconds of each other (the cached second, and its edges) and
        # anywhere up to 2096
        st.one_of(
            st.floats(1_705_341_898.0, 1_705_341_902.0),
            st.sampled_from([1_705_341_899.0, 1_705_341_899.9999999, 1_705_341_900.0]),
            st.floats(0, 4e9),
        ),
        st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
        st.sampled_from(["courierd.daemon.ingest", "courierd.edges.onetablet", "root"]),
        TEXTS,
    ),
    min_size=1,
    max_size=12,
)


def _record(created: float, level: int, name: str, value: str) -> logging.LogRecord:
    record = logging.LogRecord(name, level, "x", 1, "ingest.batch id=%s", (value,), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


@given(RECORDS)
def test_the_daemon_text_line_is_the_plain_formatters(
    records: list[tuple[float, int, str, str]],
) -> None:
    """setup_logging's formatter (an f-string, the time kept per second) writes, record
    after record, what logging's own Formatter writes for TEXT_LINE with the message
    escaped by the reference."""
    fast, general = LineFormatter(), TextFormatter(TEXT_LINE, TEXT_DATE)
    general.converter = time.gmtime
    plain = logging.Formatter(TEXT_LINE, TEXT_DATE)
    plain.converter = time.gmtime
    for created, level, name, value in records:
        expected = _record(created, level, name, value)
        expected.msg, expected.args = escaped(expected.getMessage()), None
        assert fast.format(_record(created, level, name, value)) == plain.format(expected)
        assert general.format(_record(created, level, name, value)) == plain.format(expected)


def test_the_daemon_text_line_with_a_traceback_is_the_general_one() -> None:
    """A record with a traceback goes TextFormatter's way: its lines escaped, indented."""
    try:
        raise ValueError("bad\nINFO forged\u2028\ud800")
    except ValueError:
        record = _record(1_705_341_900.5, logging.ERROR, "courierd", "x\r")
        record.exc_info = sys.exc_info()
    general = TextFormatter(TEXT_LINE, TEXT_DATE)
    general.converter = time.gmtime
    line = LineFormatter().format(record)
    record.exc_text = None
    assert line == general.format(record)
    assert line.startswith("2024-01-15T18:05:00.500Z ERROR courierd ingest.batch id=x\\x0d\n")


@given(RECORDS)
def test_the_json_line_is_the_plain_one(records: list[tuple[float, int, str, str]]) -> None:
    """The JSON line, record after record, is json.dumps of the fields with every unsafe
    character as \\uNNNN and the time formatted afresh."""
    fast = JsonFormatter()
    for created, level, name, value in records:
        record = _record(created, level, name, value)
        message = f"ingest.batch id={value}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        doc = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": logging.getLevelName(level).lower(),
            "logger": name,
            "event": "ingest.batch",
            "msg": message,
        }
        line = json.dumps(doc, ensure_ascii=False)
        expected = "".join(f"\\u{ord(c):04x}" if _unsafe(c) else c for c in line)
        assert fast.format(record) == expected


# -- writing ------------------------------------------------------------------------------


class Stderr(io.StringIO):
    """Stands in for sys.stderr: keeps each write(2) the handler makes, as a string."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stderr]:
    """setup_logging("INFO") writing to a Stderr; logging as it was afterwards."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(courierd.logs, "_handler", courierd.logs._handler)
    out = Stderr()
    monkeypatch.setattr("sys.stderr", out)
    setup_logging("INFO", "text")
    yield out


def _status(order: str) -> tuple[str, bytes, int]:
    payload = json.dumps(
        {"event_id": f"e-{order}", "order_id": order, "status": "dasher_confirmed"}
    ).encode()
    return "couriers/c-1/status", payload, len(payload)


def test_a_batch_of_transitions_is_written_at_once(store: Store, stderr: Stderr) -> None:
    """The ingest process logs a line per status; a batch's lines leave in one write (a
    system call on the real stderr), all of them, in order, by the time the batch ends."""
    orders = [f"o-{i}" for i in range(20)]
    report = commit_messages(store, [_status(o) for o in orders], time.time())
    assert report.transitions == 20
    lines = [ln for ln in stderr.getvalue().splitlines() if "ingest.transition" in ln]
    assert [re.search(r"order_id=(\S+)", ln)[1] for ln in lines] == orders  # type: ignore[index]
    assert len([w for w in stderr.writes if "ingest.transition" in w]) == 1


def test_a_large_batch_is_written_in_whole_lines_no_write_too_large_to_stay_whole(
    store: Store, stderr: Stderr
) -> None:
    """courierd's processes share stderr: a write to a pipe of more than PIPE_BUF bytes
    may be cut by another process's line, mid-line. A batch of 300 transitions (about
    30 KiB of lines) goes out in writes of whole lines, none larger, and few of them."""
    orders = [f"order-{i:04d}" for i in range(300)]
    assert commit_messages(store, [_status(o) for o in orders], time.time()).transitions == 300
    writes = [w for w in stderr.writes if "ingest.transition" in w]
    assert all(w.endswith("\n") and len(w.encode()) <= select.PIPE_BUF for w in writes)
    assert len(writes) <= 2 * len("".join(writes).encode()) // select.PIPE_BUF + 1
    lines = "".join(writes).splitlines()
    assert [re.search(r"order_id=(\S+)", ln)[1] for ln in lines] == orders  # type: ignore[index]


def test_a_warning_goes_out_at_once_with_the_lines_held_before_it(stderr: Stderr) -> None:
    """Inside a batch, a warning or an error is not held (a fatal one may be the last
    thing the process does), nor are the lines before it; and whatever ends the block,
    its lines are out when it ends."""
    log = logging.getLogger("courierd.test")
    with pytest.raises(RuntimeError), batched():
        log.info("test.first")
        assert stderr.getvalue() == ""
        log.error("test.fatal")
        assert [ln.split()[-1] for ln in stderr.getvalue().splitlines()] == [
            "test.first",
            "test.fatal",
        ]
        log.info("test.last")
        raise RuntimeError
    assert stderr.getvalue().splitlines()[-1].endswith("test.last")


# -- the daemon ---------------------------------------------------------------------------


def _transition_orders(log: Path) -> list[str]:
    return re.findall(r"ingest\.transition order_id=(\S+)", log.read_text())


@pytest.mark.integration
def test_a_transition_line_reaches_stderr_without_more_traffic(sqlite_rig: Rig) -> None:
    """One status and then nothing: its line is on stderr within seconds, not held for
    a batch or a buffer that no further message comes to fill."""
    daemon = sqlite_rig.daemon().start()
    pub = sqlite_rig.publisher()
    try:
        pub.status("c-1", "e-alone", "o-alone", "dasher_confirmed")
        wait_until(lambda: _transition_orders(daemon.log) == ["o-alone"], 10, "the line")
    finally:
        pub.close()
    assert daemon.stop() == 0


@pytest.mark.integration
def test_sigterm_loses_no_line(sqlite_rig: Rig) -> None:
    """Statuses streaming in, then SIGTERM: every transition the daemon committed has
    its line on stderr once it has exited."""
    daemon = sqlite_rig.daemon().start()
    pub = sqlite_rig.publisher()
    store = sqlite_rig.store()

    def committed() -> set[str]:
        rows = store.db.rows("SELECT order_id FROM orders WHERE state <> 'new'")
        return {row[0] for row in rows}

    orders = [f"o-{i}" for i in range(300)]
    try:
        for i, order in enumerate(orders):
            pub.status("c-1", f"e-{order}", order, "dasher_confirmed")
            if i == 150:
                wait_until(committed, 10, "a first commit")
                daemon.send(signal.SIGTERM)
        assert daemon.stop() == 0
        done = committed()
    finally:
        pub.close()
        store.close()
    assert done and sorted(_transition_orders(daemon.log)) == sorted(done)
