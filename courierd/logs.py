"""Logging for journald and log shippers: one line per event, text or JSON, to stderr.

Messages start with a stable event name (`onetablet.call`, `ingest.batch`, ...) followed
by key=value context; `--log-format json` wraps the same line in a JSON object.

A message carries values from outside (ids, topics, OneTablet's error text). Ids with
control characters are dead-lettered at the edge, but anything else that still holds
one is escaped here: a line break, carriage return, escape sequence or Unicode line
separator in a value never starts what looks like a line of courierd's own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators, and lone
# surrogates (stderr's UTF-8 cannot write them: the whole line would be lost).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character and line separator written as an escape."""
    return _UNSAFE.sub(_escape, text)


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


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, msg."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": message.split(" ", 1)[0],
            "msg": message,
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # json escapes C0 itself; DEL, C1 and the line separators it leaves as they are.
        return _UNSAFE.sub(_json_escape, json.dumps(out, ensure_ascii=False))


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = TextFormatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
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
