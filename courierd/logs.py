"""Logging for journald and log shippers: one line per event, text or JSON, to stderr.

Messages start with a stable event name (`onetablet.call`, `ingest.batch`, ...) followed
by key=value context; `--log-format json` wraps the same line in a JSON object.

A message carries values from outside (ids, topics, OneTablet's error text). Ids with
control characters are dead-lettered at the edge, but anything else that still holds
one is escaped here: a line break, carriage return, escape sequence or Unicode line
separator in a value never starts what looks like a line of courierd's own.

The ingest process logs a line per status, so a line is kept cheap: the escaping regex
runs only on text `str.isprintable` finds something in, the time is formatted once per
second, and inside `batched()` the lines go out in one write at the block's end
instead of a write (a system call) each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import sys
import time
from collections.abc import Iterator
from typing import Any

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and lone
# surrogates (stderr's UTF-8 cannot write them: the whole line would be lost).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character and line separator written as an escape.

    Most text has none, and `str.isprintable` (a scan in C, cheaper than the regex)
    says so. It is False for every character `_UNSAFE` matches (controls are Unicode
    category Cc, the separators Zl and Zp, surrogates Cs: a test checks each one), and
    for others too (spaces other than " ", unassigned ones...): those go through the
    regex, as all text did before."""
    return text if text.isprintable() else _UNSAFE.sub(_escape, text)


TEXT_LINE = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s"
TEXT_DATE = "%Y-%m-%dT%H:%M:%S"
_last_second: tuple[float, str] = (-1.0, "")


def utc_second(created: float) -> str:
    """The UTC second `created` falls in, as TEXT_DATE writes it (both formats' time,
    less its milliseconds): made once per second, not per line."""
    global _last_second
    last = _last_second  # one tuple: another thread may replace it meanwhile
    if last[0] != created // 1:
        last = _last_second = (created // 1, time.strftime(TEXT_DATE, time.gmtime(created)))
    return last[1]


class TextFormatter(logging.Formatter):
    """The text line, escaped. A traceback spans lines, but each of its lines is escaped
    and indented, so an exception's message (often outside text) cannot start a line
    that passes for one of courierd's own, nor lose the record to a lone surrogate."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


class LineFormatter(TextFormatter):
    """courierd's text line: `TextFormatter(TEXT_LINE, TEXT_DATE)` in UTC, made by an
    f-string instead of `%` over the record's dict (a test holds the two equal). A
    record with a traceback or a stack goes the general way."""

    def __init__(self) -> None:
        super().__init__(TEXT_LINE, TEXT_DATE)
        self.converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = message = escape_controls(record.getMessage())
        record.asctime = asctime = utc_second(record.created)
        return f"{asctime}.{int(record.msecs):03d}Z {record.levelname} {record.name} {message}"


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, msg."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {
            "ts": f"{utc_second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": message.split(" ", 1)[0],
            "msg": message,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # json escapes C0 itself; DEL, C1 and the line separators it leaves as they are.
        line = json.dumps(out, ensure_ascii=False)
        return line if line.isprintable() else _UNSAFE.sub(_json_escape, line)


ATOMIC_WRITE = select.PIPE_BUF  # bytes a pipe takes in one piece (POSIX: at least 512)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`logging.StreamHandler`, and inside `batched()` it holds the lines and writes
    them together at the block's end: a write(2) for up to 4 KiB of a batch's lines
    instead of one per line (stderr is line-buffered). A warning or an error is written
    at once, with whatever is held before it (a fatal error may end the process with `os._exit`);
    `flush()` (`logging.shutdown` at exit) writes what is held too."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        self._holding = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._held.append(self.format(record) + "\n")
            if not self._holding or record.levelno >= logging.WARNING:
                self._write()
        except RecursionError:  # as StreamHandler
            raise
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        """The held lines, in writes of whole lines and at most PIPE_BUF bytes each: the
        processes share stderr (a pipe to journald, a terminal), and only a write that
        small is never cut by another process's line (a larger one may be, mid-line)."""
        held, self._held = self._held, []  # written or not: a failing stream must not grow it
        chunk: list[str] = []
        size = 0
        for line in held:
            n = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
            if chunk and size + n > ATOMIC_WRITE:
                self._write_lines(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += n
        if chunk:
            self._write_lines(chunk)

    def _write_lines(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._held:
                self._write()
            else:
                super().flush()

    def hold(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._holding += 1

    def release_held(self) -> None:
        """The end of a block: the lines held are written."""
        with self.lock:  # type: ignore[union-attr]
            self._holding -= 1
            if self._held:
                try:
                    self._write()
                except Exception:  # as emit's: said on stderr if it can, not raised
                    self.handleError(logging.makeLogRecord({"msg": "(held lines)"}))


_handler: LineHandler | None = None  # setup_logging's


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """The lines logged in the block are written together at its end (see LineHandler):
    for a loop that logs a line per item. Keep the block short: its lines wait for it."""
    handler = _handler
    if handler is None:
        yield
        return
    handler.hold()
    try:
        yield
    finally:
        handler.release_held()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    global _handler
    handler = _handler = LineHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; courierd logs its own line per call instead.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lean_records() -> None:
    """Log records without what no courierd format writes: the caller's file, function
    and line (found by walking up the stack, per record), the thread's and the
    process's names. The lines are the same; a record costs a fifth less (88k -> 69k
    instructions for `ingest.transition`, which the ingest process logs per status).
    The switches are `logging`'s own (its HOWTO, "Optimization"), for this process."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
