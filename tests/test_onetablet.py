"""The OneTablet client against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from courierd.devtools.sandbox import Request, Sandbox
from courierd.domain.policy import CLI_MAX_RETRY_AFTER
from courierd.edges.onetablet import OneTabletClient, _path, with_retries
from courierd.errors import OneTabletError, Rejected, Unauthorized, Unavailable
from tests.conftest import API_KEY

ORDER = b'{"id": "o-1", "subtotal": 2500, "zz_custom": {"keep": [1, 2]}}'
BODY = '{"delivery_status":"arriving_at_store","courier_info":{"full_name":"Mike Driver"}}'


def client(sandbox: Sandbox, **kw: object) -> OneTabletClient:
    return OneTabletClient(sandbox.url, API_KEY, **kw)  # type: ignore[arg-type]


def reply_with(sandbox: Sandbox, *replies: tuple[int, dict[str, str], object]) -> None:
    """Answer the next requests with these replies, then normally."""
    queue = list(replies)
    lock = threading.Lock()

    def responder(_: Request) -> tuple[int, dict[str, str], object] | None:
        with lock:
            return queue.pop(0) if queue else None

    sandbox.responder = responder


def test_rest_calls_send_exact_bodies_and_headers(onetablet: Sandbox) -> None:
    """Submit, cancel and delivery-status hit their paths with x-api-key and exact JSON."""
    with client(onetablet) as c:
        assert c.submit_order(ORDER, "o-1").status == 200
        c.cancel_order("o-1", "STORE_CLOSED", "closed early")
        c.delivery_status("o-1", BODY, "key-123")
    sub, can, st = onetablet.requests()
    assert (sub.path, sub.body) == ("/orders", ORDER)  # byte for byte as written
    assert (can.path, can.json) == (
        "/orders/o-1/cancel",
        {"cancel_reason": "STORE_CLOSED", "cancel_details": "closed early"},
    )
    assert (st.path, st.body.decode()) == ("/orders/o-1/delivery-status", BODY)
    for r in (sub, can, st):
        assert r.headers["x-api-key"] == API_KEY
        assert r.headers["content-type"] == "application/json"
        assert r.status == 200
    assert st.headers["idempotency-key"] == "key-123"


def test_webhooks_transport_envelope(onetablet: Sandbox) -> None:
    """Every operation is POST /webhooks with event.type and the REST fields."""
    with client(onetablet, transport="webhooks") as c:
        c.submit_order(ORDER, "o-1")
        c.cancel_order("o-1", "OTHER", None)
        c.delivery_status("o-1", BODY, "key-9")
    sub, can, st = onetablet.requests()
    assert {r.path for r in (sub, can, st)} == {"/webhooks"}
    assert sub.json == {"event": {"type": "order.submit", "order_id": "o-1"}, **json.loads(ORDER)}
    assert can.json == {
        "event": {"type": "order.cancel", "order_id": "o-1"},
        "order_id": "o-1",
        "cancel_reason": "OTHER",
    }
    assert st.json == {
        "event": {"type": "order.delivery_status", "order_id": "o-1"},
        "order_id": "o-1",
        **json.loads(BODY),
    }
    assert st.headers["idempotency-key"] == "key-9" and all(r.status == 200 for r in (sub, can, st))


def test_webhooks_envelope_event_is_never_overwritten_by_the_order(onetablet: Sandbox) -> None:
    """An order document with its own `event` field cannot replace the envelope's."""
    order = json.dumps({"id": "o-2", "event": {"type": "order.cancel", "order_id": "x"}})
    with client(onetablet, transport="webhooks") as c:
        c.submit_order(order.encode(), "o-2")
    (sent,) = onetablet.requests()
    assert sent.json["event"] == {"type": "order.submit", "order_id": "o-2"}
    assert sent.status == 200


def test_order_id_is_escaped_in_the_path(onetablet: Sandbox) -> None:
    """An order id with spaces or '?' cannot change the endpoint called."""
    with client(onetablet) as c:
        c.delivery_status("a b?c", BODY, "k")
    assert onetablet.requests()[0].path == "/orders/a%20b%3Fc/delivery-status"


# (status, reply headers, the error it maps to, its retry_after), for both clients
ERROR_REPLIES = [
    (400, {}, Rejected, None),
    (404, {}, Rejected, None),
    (401, {}, Unauthorized, None),
    (429, {"Retry-After": "7"}, Unavailable, 7.0),
    (503, {"Retry-After": "2"}, Unavailable, 2.0),
    (500, {}, Unavailable, None),
    (408, {}, Unavailable, None),
    (503, {"Retry-After": "²"}, Unavailable, None),  # a digit to str.isdigit, not to HTTP
]


@pytest.mark.parametrize(("status", "headers", "error", "retry_after"), ERROR_REPLIES)
def test_error_replies_map_to_the_tree(
    onetablet: Sandbox,
    status: int,
    headers: dict[str, str],
    error: type[OneTabletError],
    retry_after: float | None,
) -> None:
    """Each status becomes its error, carrying OneTablet's message and Retry-After."""
    reply_with(onetablet, (status, headers, {"error": "Oops", "message": "order id missing"}))
    with client(onetablet) as c, pytest.raises(error) as info:
        c.delivery_status("o-1", BODY, "k")
    assert info.value.status == status
    assert "Oops - order id missing" in str(info.value)
    assert getattr(info.value, "retry_after", None) == retry_after


def test_real_validation_400_and_bad_key_401(onetablet: Sandbox) -> None:
    """The sandbox's own checks answer like OneTablet: 400 missing id, 401 bad key."""
    with client(onetablet) as c, pytest.raises(Rejected, match="missing order id"):
        c.submit_order(b'{"subtotal": 1}', "?")
    with OneTabletClient(onetablet.url, "wrong") as c, pytest.raises(Unauthorized):
        c.delivery_status("o-1", BODY, "k")


def test_timeout_and_connection_refused_are_unavailable(onetablet: Sandbox) -> None:
    """A reply slower than the timeout, or no server at all, is retryable."""
    release = threading.Event()

    def slow(_: Request) -> None:
        release.wait(5)
        return None

    onetablet.responder = slow
    with client(onetablet, timeout=0.2) as c, pytest.raises(Unavailable, match="in time"):
        c.delivery_status("o-1", BODY, "k")
    release.set()
    with (
        OneTabletClient("http://127.0.0.1:9", API_KEY) as c,
        pytest.raises(Unavailable, match="cannot reach"),
    ):
        c.delivery_status("o-1", BODY, "k")


def test_with_retries_schedule_retry_after_and_no_retry_on_4xx(onetablet: Sandbox) -> None:
    """5xx is retried on the schedule (Retry-After if longer); 4xx is not retried."""
    waits: list[float] = []
    reply_with(onetablet, (500, {}, {}), (429, {"Retry-After": "3"}, {}))
    with client(onetablet) as c:
        reply = with_retries(lambda: c.submit_order(ORDER, "o-1"), sleep=waits.append)
    assert reply.status == 200 and waits == [1.0, 5.0]  # 3 s Retry-After < 5 s schedule
    assert len(onetablet.requests()) == 3

    reply_with(onetablet, *[(500, {}, {})] * 4)
    with client(onetablet) as c, pytest.raises(Unavailable):
        with_retries(lambda: c.submit_order(ORDER, "o-1"), sleep=waits.append)
    assert waits[2:] == [1.0, 5.0, 30.0] and len(onetablet.requests()) == 7

    reply_with(onetablet, (400, {}, {"error": "Bad Request", "message": "nope"}))
    with client(onetablet) as c, pytest.raises(Rejected):
        with_retries(lambda: c.submit_order(ORDER, "o-1"), sleep=waits.append)
    assert len(onetablet.requests()) == 8 and len(waits) == 5


def test_with_retries_caps_retry_after_for_a_person_waiting(onetablet: Sandbox) -> None:
    """A Retry-After of a day (or of 400 digits) waits at most a minute at the prompt."""
    waits: list[float] = []
    reply_with(
        onetablet, (429, {"Retry-After": "86400"}, {}), (503, {"Retry-After": "9" * 400}, {})
    )
    with client(onetablet) as c:
        reply = with_retries(lambda: c.submit_order(ORDER, "o-1"), sleep=waits.append)
    assert reply.status == 200 and waits == [CLI_MAX_RETRY_AFTER, CLI_MAX_RETRY_AFTER]


def test_api_key_never_logged(onetablet: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """The per-call log line has endpoint, order id, status and error, and no key."""
    caplog.set_level("DEBUG")
    reply_with(onetablet, (500, {}, {"error": "E", "message": "down"}))
    with client(onetablet) as c:
        with pytest.raises(Unavailable):
            c.delivery_status("o-7", BODY, "k")
        c.delivery_status("o-7", BODY, "k")
    lines = [r.getMessage() for r in caplog.records if r.name == "courierd.edges.onetablet"]
    assert len(lines) == 2
    assert "endpoint='POST /orders/o-7/delivery-status' order_id=o-7 status=500" in lines[0]
    assert "E - down" in lines[0] and "status=200 error='-'" in lines[1]
    assert all(API_KEY not in r.getMessage() for r in caplog.records)


@settings(max_examples=500)
@given(st.text(st.characters(max_codepoint=0x2FF)) | st.text())
@example("o-1_2.3~4")
@example("o/1")
@example("o 1")
@example("")
def test_an_order_ids_path_segment_is_quotes(order_id: str) -> None:
    """`_path` (ids of unreserved characters as they are) escapes as `quote(safe="")`."""
    assert _path(order_id) == quote(order_id, safe="")
