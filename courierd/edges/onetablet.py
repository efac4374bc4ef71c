"""The OneTablet HTTP client: submit order, cancel order, delivery status.

Two transports (CONTRACT.md section 5): `rest` calls the three endpoints of the API
text; `webhooks` sends each operation as one `POST /webhooks` whose body is the REST
body plus an `event` object naming the operation (see the README for the envelope).
Each method makes one attempt and maps failures onto the `OneTabletError` tree;
`with_retries` adds the API text's retry schedule for the order commands. Every call,
here and in `pusher.py`, is `call`: one request, under `onetablet_http.py`'s policy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from courierd.domain.model import dumps, value
from courierd.domain.policy import (
    CLI_MAX_RETRY_AFTER,
    RETRY_SCHEDULE,
    Verdict,
    classify,
    parse_retry_after,
)
from courierd.edges.onetablet_http import (
    CLIENTS,
    Answer,
    ForeignOrigin,
    LoopThread,
    NoAnswer,
    OneTabletHttp,
)
from courierd.errors import OneTabletError, Rejected, Unauthorized, Unavailable

log = logging.getLogger(__name__)

# Names of the operations in the webhooks envelope's `event.type`.
SUBMIT, CANCEL, DELIVERY_STATUS = "order.submit", "order.cancel", "order.delivery_status"

T = TypeVar("T")


@value
class Reply:
    """A 2xx reply: its status and the bytes of its body; `body` parses them (JSON
    where it is JSON, else text) when asked. A push's reply is never read past its
    status, and parsing each one was 5 % of the push process's CPU."""

    status: int
    content: bytes

    @property
    def body(self) -> Any:
        return _body(self.content)


class OneTabletClient:
    """The order commands' client: `onetablet_http`'s one policy, on a loop of its own,
    called from any thread (each call waits for its reply)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: str = "rest",
        timeout: float = 30.0,
        max_connections: int = 16,
        client: str = CLIENTS[0],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if transport not in ("rest", "webhooks"):
            raise ValueError(f"unknown transport {transport!r}")
        self.transport = transport
        self._clock = clock
        self._loop = LoopThread("onetablet")
        self._http = OneTabletHttp.open_on(
            self._loop,
            base_url,
            api_key,
            deadline_s=timeout,
            max_connections=max_connections,
            client=client,
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort: the connections are ending
            self._loop.run(self._http.close(), timeout=2.0)
        self._loop.stop()

    def __enter__(self) -> OneTabletClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit_order(self, document: bytes, order_id: str) -> Reply:
        """`POST /orders` with the document exactly as the user wrote it."""
        if self.transport == "rest":
            return self._call("/orders", order_id, document)
        envelope = _envelope(SUBMIT, order_id, json.loads(document))
        return self._call("/webhooks", order_id, dumps(envelope).encode())

    def cancel_order(self, order_id: str, reason: str, details: str | None) -> Reply:
        """`POST /orders/{id}/cancel` with cancel_reason and, if given, cancel_details."""
        body: dict[str, Any] = {"cancel_reason": reason}
        if details is not None:
            body["cancel_details"] = details
        return self._operation(CANCEL, f"/orders/{_path(order_id)}/cancel", order_id, body)

    def delivery_status(
        self, order_id: str, body: str, idempotency_key: str, source: str | None = None
    ) -> Reply:
        """`POST /orders/{id}/delivery-status` with a body fixed when the push was decided
        (the daemon sends these through `edges/pusher.py`; this is the same call, once)."""
        return self._call(
            *delivery_status_request(self.transport, order_id, body, idempotency_key, source)
        )

    def _operation(
        self,
        kind: str,
        path: str,
        order_id: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> Reply:
        if self.transport == "webhooks":
            body = _envelope(kind, order_id, {"order_id": order_id, **body})
            path = "/webhooks"
        return self._call(path, order_id, dumps(body).encode(), headers)

    def _call(
        self, path: str, order_id: str, content: bytes, headers: dict[str, str] | None = None
    ) -> Reply:
        return self._loop.run(call(self._http, path, order_id, content, headers, self._clock))


# Writes a call's line: (level, endpoint, order id, status, error, milliseconds).
LineWriter = Callable[[int, str, str, int | None, str | None, float], None]


async def call(
    http: OneTabletHttp,
    path: str,
    order_id: str,
    content: bytes,
    headers: dict[str, str] | None,
    clock: Callable[[], float],
    lines: LineWriter | None = None,
) -> Reply:
    """One POST, by pushes and commands alike; logs one line (by `lines` if given: the
    pusher writes a pass's lines together); returns a 2xx reply or raises the matching
    error (a 3xx is `Rejected`, its Location in the message)."""
    started = time.perf_counter()
    try:
        answer: Answer | BaseException = await http.post(path, content, headers or {})
    except (NoAnswer, ForeignOrigin) as e:
        answer = e
    return answered(path, order_id, answer, started, clock(), lines)


def answered(
    path: str,
    order_id: str,
    answer: Answer | BaseException,
    started: float,
    now: float,
    lines: LineWriter | None = None,
) -> Reply:
    """`call`'s end, once the POST of `path` ended (`started`: by `time.perf_counter`)
    with `answer` (or without: `NoAnswer`, or `ForeignOrigin` if it was refused): logs
    the call's line, returns a 2xx reply or raises the matching error."""
    endpoint = f"POST {path}"
    if isinstance(answer, Answer):
        return interpret(endpoint, order_id, answer, started, now, lines)
    if isinstance(answer, NoAnswer):
        raise no_reply(endpoint, order_id, started, answer.reason, lines) from None
    if isinstance(answer, ForeignOrigin):  # never sent: a bug or a hostile id
        _log_call(endpoint, order_id, None, str(answer), started, lines)
        raise Rejected(f"{endpoint}: refused: {answer}") from None
    raise answer


def delivery_status_request(
    transport: str, order_id: str, body: str, idempotency_key: str, source: str | None
) -> tuple[str, str, bytes, dict[str, str]]:
    """(path, order id, content, headers) of a delivery-status push on `transport`.

    `source` (app, geofence, fill) travels in `x-courierd-source`: OneTablet ignores it,
    the sandbox's page shows it.
    """
    headers = {"idempotency-key": idempotency_key}
    if source:
        headers["x-courierd-source"] = source
    if transport == "rest":
        return f"/orders/{_path(order_id)}/delivery-status", order_id, body.encode(), headers
    envelope = _envelope(DELIVERY_STATUS, order_id, {"order_id": order_id, **json.loads(body)})
    return "/webhooks", order_id, dumps(envelope).encode(), headers


def interpret(
    endpoint: str,
    order_id: str,
    answer: Answer,
    started: float,
    now: float,
    lines: LineWriter | None = None,
) -> Reply:
    """Log the call's one line; return a 2xx reply or raise the matching error."""
    verdict = classify(answer.status)
    error = None if verdict is Verdict.DELIVERED else _error_text(_body(answer.content), answer)
    _log_call(endpoint, order_id, answer.status, error, started, lines)
    if verdict is Verdict.DELIVERED:
        return Reply(answer.status, answer.content)
    message = f"OneTablet answered {answer.status} to {endpoint}: {error}"
    if verdict is Verdict.RETRY:
        raise Unavailable(message, answer.status, parse_retry_after(answer.retry_after, now))
    if verdict is Verdict.UNAUTHORIZED:
        raise Unauthorized(message, answer.status)
    raise Rejected(message, answer.status)


def no_reply(
    endpoint: str,
    order_id: str,
    started: float,
    error: str | None,
    lines: LineWriter | None = None,
) -> Unavailable:
    """The error (retryable) for a call that got no answer: `error` None is a timeout."""
    if error is None:
        _log_call(endpoint, order_id, None, "timeout", started, lines)
        return Unavailable(f"{endpoint}: OneTablet did not answer in time")
    _log_call(endpoint, order_id, None, f"connection error: {error}", started, lines)
    return Unavailable(f"{endpoint}: cannot reach OneTablet ({error})")


def with_retries(
    call: Callable[[], T],
    *,
    schedule: Sequence[float] = RETRY_SCHEDULE,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[OneTabletError, float], None] | None = None,
) -> T:
    """Call, retrying `Unavailable` after each wait of `schedule` (Retry-After if longer,
    up to CLI_MAX_RETRY_AFTER: someone is waiting at a prompt).

    4xx errors are not retried. After the last wait the last error is raised.
    """
    for wait in (*schedule, None):
        try:
            return call()
        except Unavailable as e:
            if wait is None:
                raise
            delay = max(wait, min(e.retry_after or 0.0, CLI_MAX_RETRY_AFTER))
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def _envelope(kind: str, order_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """The webhooks body: `event` first; a field of that name in the body never wins."""
    rest = {k: v for k, v in body.items() if k != "event"}
    return {"event": {"type": kind, "order_id": order_id}, **rest}


# What `quote(..., safe="")` leaves as it is: an id made of these only is its own path
# segment (most are), without quote's cost (a third of a push's request building).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def _path(order_id: str) -> str:
    if _UNRESERVED.fullmatch(order_id):
        return order_id
    return quote(order_id, safe="")


def _body(content: bytes) -> Any:
    """Parsed JSON where it is JSON, else the text."""
    try:
        return json.loads(content)
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        return content.decode("utf-8", "replace")


def _error_text(body: Any, answer: Answer) -> str:
    """OneTablet's `{error, message}`, else the start of whatever it sent; a redirect's
    target first (it is not followed: CONTRACT.md 6.1)."""
    if 300 <= answer.status < 400:
        where = (answer.location or "no Location")[:200]
        return f"redirect to {where!r} not followed"
    if isinstance(body, dict) and ("message" in body or "error" in body):
        error, message = body.get("error"), body.get("message")
        return " - ".join(str(p) for p in (error, message) if p) or answer.reason
    text = str(body).strip()[:200]
    return text or answer.reason or f"HTTP {answer.status}"


def _log_call(
    endpoint: str,
    order_id: str,
    status: int | None,
    error: str | None,
    started: float,
    lines: LineWriter | None = None,
) -> None:
    level = logging.INFO if error is None else logging.WARNING
    if not log.isEnabledFor(level):  # at WARNING, a delivered push's line: not built
        return
    ms = (time.perf_counter() - started) * 1000
    (lines or write_line)(level, endpoint, order_id, status, error, ms)


def write_line(
    level: int, endpoint: str, order_id: str, status: int | None, error: str | None, ms: float
) -> None:
    """A call's one line, now."""
    log.log(
        level,
        "onetablet.call endpoint=%r order_id=%s status=%s error=%r ms=%.1f",
        endpoint,
        order_id,
        status if status is not None else "-",
        error or "-",
        ms,
    )
