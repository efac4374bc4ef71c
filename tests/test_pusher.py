"""The push path and the order commands' client against a real HTTP server on 127.0.0.1:
one client (`onetablet_http`), whichever library runs underneath, sends the same bytes
and reads replies the same way."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVarTuple, Unpack

import pytest

from courierd import logs
from courierd.devtools.sandbox import Request, Sandbox
from courierd.edges.onetablet import OneTabletClient, Reply
from courierd.edges.onetablet_http import CLIENTS
from courierd.edges.pusher import Push, Pusher
from courierd.errors import OneTabletError, Unavailable
from tests.conftest import API_KEY
from tests.onetablet_servers import Scripted
from tests.test_onetablet import BODY, ERROR_REPLIES, reply_with

Call = Callable[..., Reply]
OK_REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


# The order commands' client on the default library, and the pusher on each library.
CALLERS = [("command", CLIENTS[0]), *(("push", c) for c in CLIENTS)]


def made_by(caller: tuple[str, str], url: str, key: str, **options: object) -> Pusher:
    kind = OneTabletClient if caller[0] == "command" else Pusher
    return kind(url, key, client=caller[1], **options)  # type: ignore[return-value,arg-type]


@pytest.fixture(params=CALLERS, ids="-".join)
def delivery_status(request: pytest.FixtureRequest) -> Iterator[Callable[..., Call]]:
    """`make(url, key, **options)` → a delivery-status call by one caller or another."""
    made: list[Pusher] = []

    def make(url: str, key: str = API_KEY, **options: object) -> Call:
        made.append(made_by(request.param, url, key, **options))
        return made[-1].delivery_status

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("transport", ["rest", "webhooks"])
def test_every_caller_sends_the_same_request(onetablet: Sandbox, transport: str) -> None:
    """Same path, body bytes, key, idempotency key and source header from the commands and
    from pushes on every library, on both transports; an order id is escaped once."""
    for caller in CALLERS:
        with made_by(caller, onetablet.url, API_KEY, transport=transport) as c:
            c.delivery_status("a b?c/d", BODY, "key-1", "geofence")
    first, *others = onetablet.requests()
    assert len(others) == len(CALLERS) - 1
    for other in others:
        assert other.path == first.path
        assert other.body == first.body
        for header in ("x-api-key", "content-type", "idempotency-key", "x-courierd-source"):
            assert other.headers[header] == first.headers[header], header
        assert other.status == 200
    if transport == "rest":
        assert first.path == "/orders/a%20b%3Fc%2Fd/delivery-status"
    else:
        assert first.json["event"] == {"type": "order.delivery_status", "order_id": "a b?c/d"}


def test_a_base_url_with_a_path_keeps_it(onetablet: Sandbox) -> None:
    """OneTablet behind a prefix (https://host/v1): the prefix stays in every call."""
    onetablet.responder = lambda _: (200, {}, {"ok": True})
    with Pusher(f"{onetablet.url}/v1/", API_KEY) as p:
        p.delivery_status("o-1", BODY, "k")
    assert onetablet.requests()[-1].path == "/v1/orders/o-1/delivery-status"


@pytest.mark.parametrize(("status", "headers", "error", "retry_after"), ERROR_REPLIES)
def test_error_replies_map_to_the_same_errors(
    onetablet: Sandbox,
    delivery_status: Callable[..., Call],
    status: int,
    headers: dict[str, str],
    error: type[OneTabletError],
    retry_after: float | None,
) -> None:
    reply_with(onetablet, (status, headers, {"error": "Oops", "message": "order id missing"}))
    call = delivery_status(onetablet.url)
    with pytest.raises(error) as info:
        call("o-1", BODY, "k")
    assert info.value.status == status
    assert "Oops - order id missing" in str(info.value)
    assert getattr(info.value, "retry_after", None) == retry_after


def test_an_html_error_page_is_reported_by_its_start(
    onetablet: Sandbox, delivery_status: Callable[..., Call]
) -> None:
    """A proxy's 502 page, not JSON and not even UTF-8: retryable, shown shortened."""
    page = b"<h1>Bad gateway \xff</h1>" * 50
    onetablet.responder = lambda _: (502, {"content-type": "text/html"}, page)
    with pytest.raises(Unavailable) as info:
        delivery_status(onetablet.url)("o", BODY, "k")
    assert "502" in str(info.value) and "Bad gateway" in str(info.value)
    assert len(str(info.value)) < 300


def test_timeout_and_connection_refused_are_unavailable(
    onetablet: Sandbox, delivery_status: Callable[..., Call]
) -> None:
    release = threading.Event()

    def hold(_: Request) -> None:
        release.wait(5)

    onetablet.responder = hold
    with pytest.raises(Unavailable, match="in time"):
        delivery_status(onetablet.url, timeout=0.2)("o-1", BODY, "k")
    release.set()
    with pytest.raises(Unavailable, match="cannot reach"):
        delivery_status("http://127.0.0.1:9")("o-1", BODY, "k")


def test_one_log_line_per_call_and_never_the_key(
    onetablet: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    reply_with(onetablet, (500, {}, {"error": "E", "message": "down"}))
    with Pusher(onetablet.url, API_KEY) as p:
        with pytest.raises(Unavailable):
            p.delivery_status("o-7", BODY, "k")
        p.delivery_status("o-7", BODY, "k")
    lines = [r.getMessage() for r in caplog.records if r.name == "courierd.edges.onetablet"]
    assert len(lines) == 2
    assert "endpoint='POST /orders/o-7/delivery-status' order_id=o-7 status=500" in lines[0]
    assert "E - down" in lines[0] and "status=200 error='-'" in lines[1]
    assert all(API_KEY not in r.getMessage() for r in caplog.records)


def test_a_push_whose_claim_lapsed_is_not_sent(onetablet: Sandbox) -> None:
    """A push handed over after its claim's deadline (the process was stopped in
    between) is reported unsent: another instance may own it by now."""
    got: list[object] = []
    done = threading.Event()

    def report(outcome: object, _sent_at: float) -> None:
        got.append(outcome)
        done.set()

    with Pusher(onetablet.url, API_KEY, monotonic=lambda: 100.0) as p:
        p.send([Push("o-1", BODY, "k", None, report, until=99.0)])
        assert done.wait(10)
    assert got == [None] and onetablet.requests() == []


_Ts = TypeVarTuple("_Ts")


class _RefusingLoop(asyncio.SelectorEventLoop):
    """A loop that refuses to schedule `refuse` once (`call_soon` raises, as on a closed
    loop): a fault of the loop underneath, not of the pusher."""

    refuse: object = None

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        if self.refuse is not None and callback == self.refuse:
            self.refuse = None
            raise RuntimeError("refused")
        return super().call_soon(callback, *args, context=context)


def test_a_lapsed_push_is_told_once_though_telling_it_failed(
    onetablet: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A lapsed claim's push whose finishing fails (the loop refuses to schedule the
    pass's telling) is still told once, not sent by a task as well (a second result:
    the dispatcher's pushes in flight broken), and the failure does not keep every later
    result back."""
    told: list[tuple[str, object]] = []
    three = threading.Event()

    def done_for(order_id: str) -> Callable[[object, float], None]:
        def done(outcome: object, _sent_at: float) -> None:
            told.append((order_id, outcome))
            if len(told) >= 3:
                three.set()

        return done

    with Pusher(onetablet.url, API_KEY, monotonic=lambda: 100.0, loop_factory=_RefusingLoop) as p:
        assert isinstance(p._loop, _RefusingLoop)
        p._loop.refuse = p._tell
        p.send([Push("o-1", BODY, "k1", None, done_for("o-1"), until=99.0)])
        p.send([Push("o-2", BODY, "k2", None, done_for("o-2"), until=99.0)])
        p.send([Push("o-3", BODY, "k3", None, done_for("o-3"), until=99.0)])
        # A second result for o-1 (by a task) would come in the pass after its own,
        # before o-2's and o-3's were told.
        assert three.wait(10), f"told only {told}"
    assert told == [("o-1", None), ("o-2", None), ("o-3", None)]
    assert "pusher.crash order_id=o-1" in caplog.text and onetablet.requests() == []


def test_a_wall_clock_step_does_not_lapse_or_stretch_a_claim(onetablet: Sandbox) -> None:
    """The claim's deadline is on the monotonic clock: a wall clock far ahead does not
    make a live claim look lapsed (nor would one far behind make a lapsed claim live)."""
    got: list[object] = []
    done = threading.Event()

    def report(outcome: object, _sent_at: float) -> None:
        got.append(outcome)
        done.set()

    with Pusher(onetablet.url, API_KEY, clock=lambda: time.time() + 86_400) as p:
        p.send([Push("o-1", BODY, "k", None, report, until=time.monotonic() + 60)])
        assert done.wait(10)
    assert got != [None] and len(onetablet.requests()) == 1


def test_the_body_sent_is_the_body_stored(onetablet: Sandbox) -> None:
    """Bytes decided at commit time go out unchanged, non-ASCII included."""
    body = json.dumps({"delivery_status": "dropoff", "courier_info": {"full_name": "Zoë Ñ"}})
    with Pusher(onetablet.url, API_KEY) as p:
        p.delivery_status("o-1", body, "k")
    assert onetablet.requests()[-1].body == body.encode()


@pytest.mark.parametrize("caller", CALLERS, ids="-".join)
def test_a_closed_client_leaves_nothing_for_the_garbage_collector(
    onetablet: Sandbox, caller: tuple[str, str]
) -> None:
    """A call, then close: the client's loop is closed with it. Only stopped, each loop
    left its self-pipe (a socket pair) and itself to the garbage collector, which warned
    of them (ResourceWarning: unclosed socket, unclosed event loop) in whatever test ran
    when it came by. Closed twice, the client has nothing left to do (the order commands'
    second close left a coroutine never awaited, after waiting 2 s for it)."""
    gc.collect()  # what earlier tests left is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        warnings.simplefilter("always", RuntimeWarning)
        client = made_by(caller, onetablet.url, API_KEY)
        try:
            client.delivery_status("o-1", BODY, "k")
        finally:
            client.close()
        client.close()  # again: nothing more to do
        del client
        gc.collect()
    assert [str(w.message) for w in caught if w.category in (ResourceWarning, RuntimeWarning)] == []


def test_the_lines_of_replies_read_together_are_written_together() -> None:
    """At INFO each push has its line (`onetablet.call`): those of the replies one pass
    of the pusher's loop reads are written in one write (`logs.batched`), not one each,
    and before the dispatcher hears of the replies (each push's `done`, which records
    its result, and `after_replies`): a daemon that stops once results are recorded
    must not lose their lines."""
    n = 20
    gate = threading.Event()
    blocked, unblock = threading.Event(), threading.Event()
    server = Scripted(lambda _: (OK_REPLY, True), gate=gate)
    writes: list[str] = []
    lines_when_told: list[int] = []

    class Stream:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logs._handler
    handler = logs._handler = logs.LineHandler(Stream())
    handler.setFormatter(logs.LineFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    outcomes: list[object] = []
    logged_when_done: list[bool] = []

    def done(order_id: str, outcome: object, _sent: float = 0.0) -> None:
        written = {line.split(" order_id=")[1].split()[0] for line in "".join(writes).splitlines()}
        logged_when_done.append(order_id in written)
        outcomes.append(outcome)

    try:
        with Pusher(f"http://127.0.0.1:{server.port}", API_KEY, max_connections=n) as p:
            p.after_replies(lambda: lines_when_told.append("".join(writes).count("\n")))

            def block() -> None:
                blocked.set()
                unblock.wait(30)

            p.send(
                [
                    Push(f"o-{i}", BODY, f"k{i}", None, functools.partial(done, f"o-{i}"))
                    for i in range(n)
                ]
            )
            deadline = time.monotonic() + 30
            while len(server.requests) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            p._loop.call_soon_threadsafe(block)  # the loop reads nothing until every reply is sent
            assert blocked.wait(30)
            gate.set()
            while server.open and time.monotonic() < deadline:
                time.sleep(0.01)
            unblock.set()
            while len(outcomes) < n and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        unblock.set()
        server.close()
        root.handlers[:], root.level, logs._handler = saved[0], saved[1], saved[2]
    lines = "".join(writes).splitlines()
    assert len(outcomes) == n and all(isinstance(o, Reply) for o in outcomes)
    assert sorted(line.split(" order_id=")[1].split()[0] for line in lines) == sorted(
        f"o-{i}" for i in range(n)
    )
    assert len(writes) == 1  # one pass read every reply
    assert logged_when_done == [True] * n
    assert lines_when_told and lines_when_told[0] == n


def test_a_done_that_raises_holds_back_no_other_result(onetablet: Sandbox) -> None:
    """Each finished push's `done` hands its result to the dispatcher: one that raises
    (a bug) is logged, and the others of the same pass are still told."""
    told: list[str] = []
    every = threading.Event()

    def done_for(order_id: str) -> Callable[[object, float], None]:
        def done(_outcome: object, _sent_at: float) -> None:
            if order_id == "o-0":
                raise RuntimeError("a bug in done")
            told.append(order_id)
            if len(told) == 9:
                every.set()

        return done

    with Pusher(onetablet.url, API_KEY) as p:
        p.send([Push(f"o-{i}", BODY, f"k{i}", None, done_for(f"o-{i}")) for i in range(10)])
        assert every.wait(10), f"told only {sorted(told)}"
    assert sorted(told) == sorted(f"o-{i}" for i in range(1, 10))


def push_and_wait(p: Pusher, order_id: str, timeout: float = 10.0) -> object:
    """One push's outcome, waited for with a deadline (`delivery_status` waits forever:
    a push never finished would hang the test rather than fail it)."""
    got: list[object] = []
    done = threading.Event()

    def report(outcome: object, _sent_at: float) -> None:
        got.append(outcome)
        done.set()

    p.send([Push(order_id, BODY, f"k-{order_id}", None, report)])
    assert done.wait(timeout), f"{order_id} never finished"
    return got[0]


def test_a_push_on_a_kept_connection_has_no_task_and_its_deadline_still_cuts_it(
    onetablet: Sandbox,
) -> None:
    """Once a connection is kept, a push goes out on it without a task of its own
    (`OneTabletHttp.post_soon`), and a reply of a head read before ends it at once. One
    that gets no reply is still cut at its deadline (no answer in time, retried), its
    connection is not served again (its late reply answers no other push), and the
    next push is answered on another. Each reply names its order: the replies to o-1..o-4
    have one head (the same length), remembered from o-1's."""
    release, hanging = threading.Event(), threading.Event()

    def named(r: Request) -> tuple[int, dict[str, str], object]:
        if r.order_id == "hang":  # not answered until released
            hanging.set()
            release.wait(30)
        return 200, {}, {"order": r.order_id}

    async def other_tasks() -> int:
        return len(asyncio.all_tasks() - {asyncio.current_task()})

    def order_of(outcome: object) -> object:
        assert isinstance(outcome, Reply), outcome
        return outcome.body["order"]

    got: list[object] = []
    done = threading.Event()

    def report(outcome: object, _sent_at: float) -> None:
        got.append(outcome)
        done.set()

    onetablet.responder = named
    try:
        with Pusher(onetablet.url, API_KEY, timeout=1.0, max_connections=1) as p:
            assert order_of(push_and_wait(p, "o-1")) == "o-1"  # opens the one connection, kept
            # On the kept connection, without a task, each read as a head known before.
            assert [order_of(push_and_wait(p, o)) for o in ("o-2", "o-3")] == ["o-2", "o-3"]
            started = time.monotonic()
            p.send([Push("hang", BODY, "k-hang", None, report)])
            assert hanging.wait(10)
            assert p._thread.run(other_tasks(), timeout=5) == 0
            assert done.wait(10)
            assert 0.9 <= time.monotonic() - started < 5
            assert isinstance(got[0], Unavailable) and "in time" in str(got[0])
            release.set()  # its late reply comes on the connection given up, never read
            assert order_of(push_and_wait(p, "o-4")) == "o-4"
    finally:
        release.set()


def test_a_bug_starting_a_push_without_a_task_loses_neither_it_nor_the_others(
    onetablet: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A push whose start without a task fails unexpectedly (a bug; here the clock the
    pusher is given fails once, as the push starts) is said loudly and sent by a task:
    every push of the batch, it and those after it, still gets its one result."""
    failing = threading.Event()

    def clock() -> float:
        if failing.is_set():
            failing.clear()
            raise RuntimeError("a bug")
        return time.time()

    told: list[tuple[str, object]] = []
    all_told = threading.Event()

    def done_for(order_id: str) -> Callable[[object, float], None]:
        def done(outcome: object, _sent_at: float) -> None:
            told.append((order_id, outcome))
            if len(told) == 3:
                all_told.set()

        return done

    with Pusher(onetablet.url, API_KEY, clock=clock) as p:
        p.delivery_status("warm", BODY, "k")  # a kept connection: the next push goes without a task
        failing.set()
        p.send([Push(f"o-{i}", BODY, f"k{i}", None, done_for(f"o-{i}")) for i in range(3)])
        assert all_told.wait(10), f"told only {told}"
    assert sorted(o for o, _ in told) == ["o-0", "o-1", "o-2"]
    assert all(isinstance(outcome, Reply) for _, outcome in told), told
    assert "pusher.crash order_id=o-0" in caplog.text


def test_a_bug_starting_a_push_by_a_task_still_gives_it_one_result(
    onetablet: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """A push that goes by a task (no connection idle yet) whose start fails there (a
    bug; here the clock the pusher is given fails at its second reading, in the task):
    it gets its one result, an internal error (retried), said loudly, rather than its
    task dying with it and the push in flight for good; the next push is sent."""
    readings = [0]

    def clock() -> float:
        readings[0] += 1
        if readings[0] == 2:
            raise RuntimeError("a bug")
        return time.time()

    with Pusher(onetablet.url, API_KEY, clock=clock) as p:
        outcome = push_and_wait(p, "o-1")
        assert isinstance(outcome, Unavailable) and "internal error" in str(outcome)
        assert isinstance(push_and_wait(p, "o-2"), Reply)
    assert "pusher.crash order_id=o-1" in caplog.text
    assert [r.order_id for r in onetablet.requests()] == ["o-2"]
