"""The simulator, the sandbox command and the one-command demo."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from courierd.devtools.sandbox import (
    Request,
    Sandbox,
    _json,
    _quick_request,
    _read_request,
    _Refused,
)
from courierd.devtools.simulate import Noise, Simulation
from courierd.domain.lifecycle import CHAIN
from tests.harness import Broker, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def simulate(noise: Noise | None = None, orders: int = 6) -> list[tuple[str, bytes, bool]]:
    published: list[tuple[str, bytes, bool]] = []
    sim = Simulation(
        lambda t, p, r: published.append((t, p, r)),
        couriers=3,
        speed=1e5,
        orders=orders,
        noise=noise,
        seed=1,
    )
    stop = threading.Event()
    threading.Timer(20, stop.set).start()
    sim.run(stop)
    stop.set()
    return published


def test_simulated_couriers_walk_the_chain_with_pings_and_profiles() -> None:
    """Without noise every order's statuses go out once, in chain order; profiles retained."""
    published = simulate()
    per_order: dict[str, list[str]] = defaultdict(list)
    for topic, payload, _ in published:
        if topic.endswith("/status"):
            doc = json.loads(payload)
            per_order[doc["order_id"]].append(doc["status"])
    assert len(per_order) == 6
    assert all(s == [c.value for c in CHAIN] for s in per_order.values())
    profiles = [(t, r) for t, _, r in published if t.endswith("/profile")]
    assert len(profiles) == 3 and all(r for _, r in profiles)
    assert any(t.endswith("/location") for t, _, _ in published)


def test_simulated_noise_is_produced() -> None:
    """With noise on, duplicates and junk are actually sent."""
    published = simulate(Noise(duplicates=0.5, junk=0.3), orders=4)
    statuses = [p for t, p, _ in published if t.endswith("/status")]
    assert len(statuses) != len(set(statuses))  # duplicates
    assert any(not p.startswith(b'{"event_id"') for p in statuses)  # junk


def test_sandbox_command_answers_and_injects_faults(tmp_path: Path) -> None:
    """`courierd sandbox` serves, checks the key, and injects 500s on request."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "courierd",
            "sandbox",
            "--port",
            str(port),
            "--api-key",
            "k1",
            "--error-rate",
            "1",
        ],
        stderr=subprocess.PIPE,
    )
    try:

        def post(key: str) -> int:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/orders/o1/delivery-status",
                method="POST",
                data=b'{"delivery_status": "dropoff"}',
                headers={"x-api-key": key},
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    status: int = r.status
                    return status
            except urllib.error.HTTPError as e:
                e.close()  # the reply it holds
                return e.code
            except OSError:
                return 0

        assert wait_until(lambda: post("k1"), 10, "sandbox to listen") == 500
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            assert b"o1" in r.read()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)  # also closes the pipe
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


def test_a_stopped_sandbox_answers_no_one() -> None:
    """stop() also closes the connections clients keep alive: a stopped sandbox answers no
    one (the threaded server's connection threads went on serving after stop())."""
    sandbox = Sandbox(api_key="k").start()
    host, port = sandbox.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/requests/count")
        assert json.loads(conn.getresponse().read()) == {"count": 0}
        sandbox.stop()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            conn.request("GET", "/requests/count")
            conn.getresponse().read()
    finally:
        conn.close()


def test_a_sandbox_not_started_refuses_to_answer() -> None:
    """answer() before start() says so, instead of waiting for a loop that never runs."""
    sandbox = Sandbox(api_key="k")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(sandbox.answer, "POST", "/orders", {}, b"{}")
            with pytest.raises(RuntimeError, match="start"):
                call.result(timeout=30)
    finally:
        sandbox.stop()


def test_posts_are_answered_while_the_log_is_read() -> None:
    """Reading the request log (GET /requests, the page) does not hold up POSTs: a long
    log took seconds to serve, and every push waited behind it."""
    sandbox = Sandbox(api_key="k").start()
    reading, release = threading.Event(), threading.Event()
    log = sandbox.log

    def slow_log(since: int = 0) -> list[dict[str, object]]:
        reading.set()
        release.wait(60)
        return log(since)

    sandbox.log = slow_log  # type: ignore[method-assign]
    host, port = sandbox.url.removeprefix("http://").split(":")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            reader = pool.submit(urllib.request.urlopen, f"{sandbox.url}/requests", timeout=60)
            assert reading.wait(30)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/orders", b'{"id": "o1"}', {"x-api-key": "k"})
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            release.set()
            reader.result(timeout=60).close()
            sandbox.stop()


def test_bad_tool_arguments_exit_2() -> None:
    """Out-of-range shares and windows are refused before anything starts."""
    for args in (
        ["sandbox", "--error-rate", "2"],
        ["sandbox", "--outage", "5:1"],
        ["simulate", "--couriers", "0"],
    ):
        proc = subprocess.run([sys.executable, "-m", "courierd", *args], capture_output=True)
        assert proc.returncode == 2, args


@pytest.mark.integration
def test_demo_brings_everything_up(tmp_path: Path) -> None:
    """`courierd demo` with no configuration: health ok, transitions flow, Ctrl-C exits 0."""
    broker = Broker(tmp_path / "broker").start()
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")}
    env |= {"COURIERD_MQTT__URL": broker.url, "COURIERD_HTTP__LISTEN": f"127.0.0.1:{http_port}"}
    log = tmp_path / "demo.log"
    with log.open("wb") as stderr:  # the demo has its own copy
        proc = subprocess.Popen(
            [sys.executable, "-m", "courierd", "demo"], cwd=tmp_path, env=env, stderr=stderr
        )
    try:
        wait_until(
            lambda: "onetablet.call" in log.read_text() and "status=200" in log.read_text(),
            20,
            "a delivered push",
        )
        assert (tmp_path / "var" / "courierd.db").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
        broker.stop()


POST = b"POST /orders HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
ORDER = b'{"id": "o1"}'  # a body the sandbox answers 200 (12 bytes)


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /  HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET / HTTQ/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nhost: x\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"x-a: b\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (POST + b"content-length: ten\r\n\r\n", 400),
    (POST + b"content-length: -1\r\n\r\n", 400),
    (POST + b"content-length: \xb2\r\n\r\n", 400),  # a digit to str.isdigit, not to int
    # Digits only (RFC 9110 8.6); int() read these as 12, 0 and 12 (the body is 12 bytes)
    (POST + b"content-length: +12\r\n\r\n" + ORDER, 400),
    (POST + b"content-length: 0_0\r\n\r\n", 400),
    (POST + b"content-length: 1_2\r\n\r\n" + ORDER, 400),
    (POST + b"content-length:\r\n\r\n", 400),  # empty: it was taken as 0
    # Lengths that disagree: the last one was believed (RFC 9112 6.3: 400)
    (POST + b"content-length: 0\r\ncontent-length: 12\r\n\r\n" + ORDER, 400),
    (POST + b"content-length: 12, 0\r\n\r\n" + ORDER, 400),
    (POST + b"transfer-encoding: chunked\r\n\r\n5\r\n{}   \r\n0\r\n\r\n", 411),
    (POST + b"transfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n{}", 400),
    (POST + b"content-length: 2000000\r\n\r\n", 413),
    # Too many digits for int() (over 4,300): no answer at all, an exception logged
    (POST + b"content-length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    # ... with the rest of the request sent: read and dropped, not a reset (lingering)
    (POST + b"content-length: 3000000\r\n\r\n" + b"x" * 3_000_000, 413),
    (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nhost: x", 400),  # the client stopped half-way through the head
]


@pytest.mark.parametrize(("data", "status"), MALFORMED)
def test_a_malformed_request_is_answered_then_closed(data: bytes, status: int) -> None:
    """A request the sandbox cannot read gets the status http.server gave it (400, 414,
    431, 505), 411 for a chunked body, 413 for one over the limit, in JSON, and the
    connection closes; the asyncio sandbox closed such a connection without a word. The
    request is not logged, and the next connection is served."""
    sandbox = Sandbox(api_key="k").start()
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(data)
            if data.endswith(b"host: x"):
                sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):  # until the sandbox closes
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode()), received[:200]
        assert b"connection: close" in head.lower().split(b"\r\n")
        assert json.loads(body)["error"] == http.HTTPStatus(status).phrase
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/orders", b'{"id": "o1"}', {"x-api-key": "k"})
        assert conn.getresponse().status == 200
        conn.close()
        assert [r.path for r in sandbox.requests()] == ["/orders"]
    finally:
        sandbox.stop()


def read_reply(replies: BinaryIO) -> tuple[int, dict[bytes, bytes], bytes]:
    """One reply from a connection's reading end: status, headers (names in lower case), body."""
    status = int(replies.readline().split(b" ")[1])
    headers = {}
    while (line := replies.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, replies.read(int(headers[b"content-length"]))


def test_requests_sent_together_are_answered_in_order_on_a_kept_connection() -> None:
    """Requests sent back to back on one keep-alive connection are answered in their order,
    whatever each one needs (a POST answered at once, a GET served off the loop, a refused
    key, a head that arrives in two packets, the second of which would be a request of its
    own), and a POST with `connection: close` ends the connection after its reply."""
    sandbox = Sandbox(api_key="k").start()

    def post(key: bytes, close: bool = False) -> bytes:
        end = b"connection: close\r\n" if close else b""
        return (
            b"POST /orders HTTP/1.1\r\nhost: x\r\nx-api-key: "
            + key
            + b"\r\ncontent-length: 12\r\n"
            + end
            + b"\r\n"
            + ORDER
        )

    count = b"GET /requests/count HTTP/1.1\r\nhost: x\r\n\r\n"
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            replies = sock.makefile("rb")
            sock.sendall(post(b"k"))
            assert read_reply(replies)[0] == 200
            begun = b"POST /x HTTP/1.1\r\nx-note: "  # the rest of its head comes later
            sock.sendall(post(b"k") + count + post(b"bad") + post(b"k") + count + begun)
            got = [read_reply(replies) for _ in range(5)]
            assert [(s, json.loads(b)) for s, _, b in got] == [
                (200, {"ok": True}),
                (200, {"count": 2}),
                (401, {"error": "Unauthorized", "message": "invalid or missing x-api-key"}),
                (200, {"ok": True}),
                (200, {"count": 4}),
            ]
            sock.sendall(post(b"k") + post(b"k", close=True) + post(b"k"))
            assert [read_reply(replies)[0] for _ in range(2)] == [404, 200]  # POST /x, then
            assert replies.read() == b""  # closed after the second: the third is not read
            replies.close()
        assert [r.status for r in sandbox.requests()] == [200, 200, 401, 200, 404, 200]
    finally:
        sandbox.stop()


@pytest.mark.parametrize(
    ("connection", "kept"),
    [(b"", False), (b"connection: keep-alive\r\n", True), (b"connection: close\r\n", False)],
    ids=["default", "keep-alive", "close"],
)
def test_an_http_1_0_post_closes_the_connection_unless_kept_alive(
    connection: bytes, kept: bool
) -> None:
    """HTTP/1.0 closes the connection after the reply unless the request asks to keep it."""
    sandbox = Sandbox(api_key="k").start()
    request = (
        b"POST /orders HTTP/1.0\r\nx-api-key: k\r\ncontent-length: 12\r\n"
        + connection
        + b"\r\n"
        + ORDER
    )
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            replies = sock.makefile("rb")
            sock.sendall(request)
            assert read_reply(replies)[0] == 200
            if kept:
                sock.sendall(request)
                assert read_reply(replies)[0] == 200
                sock.shutdown(socket.SHUT_WR)
            assert replies.read() == b""
            replies.close()
    finally:
        sandbox.stop()


@pytest.mark.parametrize(("data", "status"), MALFORMED)
def test_a_malformed_request_after_answered_ones_is_answered_then_closed(
    data: bytes, status: int
) -> None:
    """On a connection that has been served, a malformed request sent right behind a
    well-formed one gets the same answer as on a new connection, after the well-formed
    one's reply, and the connection closes."""
    sandbox = Sandbox(api_key="k").start()
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            replies = sock.makefile("rb")
            sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER)
            assert read_reply(replies)[0] == 200
            sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER + data)
            if data.endswith(b"host: x"):
                sock.shutdown(socket.SHUT_WR)
            assert read_reply(replies)[0] == 200
            refused, headers, body = read_reply(replies)
            assert (refused, headers[b"connection"]) == (status, b"close")
            assert json.loads(body)["error"] == http.HTTPStatus(status).phrase
            assert replies.read() == b""
            replies.close()
        assert [r.status for r in sandbox.requests()] == [200, 200]
    finally:
        sandbox.stop()


HEAD_PARTS = st.sampled_from(
    [
        b"POST",
        b"GET",
        b" ",
        b"/orders",
        b"/o%20x?y=1",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"\r\n",
        b"\r\n\r\n",
        b"x-api-key: k",
        b"X-Api-Key:k\t",
        b"content-length: 12",
        b"Content-Length:  3 ",
        b"content-length: 0\x0b",
        b"content-length: 12, 12",
        b"content-length: +1",
        b"content-length: 99999999",
        b"transfer-encoding: chunked",
        b"connection: close",
        b"Connection: Keep-Alive",
        b"\xa0host\x85: x\x1c",
        b":",
        b"no colon",
        b"{}",
        ORDER,
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(HEAD_PARTS, max_size=16).map(b"".join))
@example(POST + b"content-length: 12\r\n\r\n" + ORDER)
@example(POST + b"content-length: 12\r\ncontent-length: 12\r\n\r\n" + ORDER)
@example(b"POST /orders HTTP/1.1\r\ncontent-length: \x0b12\r\n\r\n" + ORDER)
@example(b"POST HTTP/1.1\r\nx-api-key: k\r\ncontent-length: 12\r\n\r\n" + ORDER)  # no target
@example(b"POST /a b HTTP/1.1\r\ncontent-length: 12\r\n\r\n" + ORDER)  # a space in it
@example(b"POST /orders HTTP/1.1\r\nConnection: close\r\ncontent-length: 12\r\n\r\n" + ORDER)
def test_a_request_answered_at_once_is_read_as_the_reader_reads_it(data: bytes) -> None:
    """What the sandbox answers where it arrives (`_quick_request`) is a whole keep-alive
    POST that the connection's reader (`_read_request`) reads the same: target, headers,
    body; anything else, it leaves to the reader."""
    quick = _quick_request(data, 0)
    if quick is None:
        return
    target, headers, body, end = quick

    async def read() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(data[:end])
        reader.feed_eof()
        try:
            return await _read_request(reader)
        except _Refused as refused:
            return refused.status

    assert asyncio.run(read()) == ("POST", target, "HTTP/1.1", headers, body)
    assert headers.get("connection", "").lower() != "close"


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ).map(lambda doc: json.dumps(doc).encode()),
        st.tuples(
            st.sampled_from([b"{", b"{ ", b" {", b"\xef\xbb\xbf{"]),
            st.binary(max_size=20),
            st.sampled_from([b"}", b"} ", b"}x", b"\n"]),
        ).map(b"".join),
        st.sampled_from(["{}", '{"a": "\u00e9"}', '{"a": 1}\n']).flatmap(
            lambda text: st.sampled_from(
                ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-16"]
            ).map(text.encode)
        ),
    )
)
@example(b'{"a": "\xed\xa0\x80"}')  # a lone surrogate, which json.loads reads
def test_a_body_is_read_as_json_loads_reads_it(body: bytes) -> None:
    """The sandbox's quick reading of a JSON body gives what json.loads gives, or raises
    ValueError where it does."""
    try:
        expected = json.loads(body)
    except ValueError:
        with pytest.raises(ValueError):
            _json(body)
        return
    assert json.dumps(_json(body)) == json.dumps(expected)  # (NaN is not equal to itself)


@pytest.mark.parametrize(
    "lengths",
    [b"content-length: 12", b"content-length: 12\r\ncontent-length: 12", b"content-length: 12, 12"],
    ids=["one", "repeated", "list"],
)
def test_a_content_length_repeated_with_one_value_is_read(lengths: bytes) -> None:
    """The same length twice, on two lines or as a list ("12, 12"), is the one length
    (RFC 9110 8.6 lets a recipient take it so): the body is read and answered, and the
    connection serves the next request."""
    sandbox = Sandbox(api_key="k").start()
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            request = POST + lengths + b"\r\n\r\n" + ORDER
            sock.sendall(request + request)
            replies = sock.makefile("rb")
            for _ in range(2):
                status = replies.readline()
                assert status.startswith(b"HTTP/1.1 200 "), status
                length = 0
                while (line := replies.readline()) != b"\r\n":
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                replies.read(length)
            replies.close()
        assert [(r.path, r.body) for r in sandbox.requests()] == [("/orders", ORDER)] * 2
    finally:
        sandbox.stop()


def test_a_started_broker_closes_its_copy_of_the_log(tmp_path: Path) -> None:
    """LocalBroker.start gives mosquitto its log file and closes its own copy (it was
    left to be collected, with a ResourceWarning, unclosed file, as start returned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        broker = Broker(tmp_path / "broker").start()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    log = str((tmp_path / "broker" / "mosquitto.log").resolve())
    assert broker.proc is not None
    assert [os.readlink(f"/proc/{broker.proc.pid}/fd/{fd}") for fd in (1, 2)] == [log, log]


def served_connection(sandbox: Sandbox) -> tuple[socket.socket, BinaryIO]:
    """A connection to the sandbox that one POST has been answered on (so it is idle, kept
    alive), and its reading end."""
    host, port = sandbox.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    replies = sock.makefile("rb")
    sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER)
    assert read_reply(replies)[0] == 200
    return sock, replies


def test_a_kept_connection_answers_a_plain_post_where_it_arrives() -> None:
    """On an idle kept-alive connection a plain POST is answered without the connection's
    coroutine (Sandbox.quick_answers counts it), as it is in the bench."""
    sandbox = Sandbox(api_key="k").start()
    try:
        sock, replies = served_connection(sandbox)
        with sock, replies:
            before = sandbox.quick_answers
            sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER)
            assert read_reply(replies)[0] == 200
            assert sandbox.quick_answers == before + 1
    finally:
        sandbox.stop()


@pytest.mark.parametrize(
    "data",
    [
        b"POST HTTP/1.1\r\nx-api-key: k\r\ncontent-length: 12\r\n\r\n" + ORDER,
        b"POST /a b HTTP/1.1\r\nx-api-key: k\r\ncontent-length: 12\r\n\r\n" + ORDER,
    ],
    ids=["no-target", "space-in-target"],
)
def test_a_bad_request_line_on_a_kept_connection_is_refused(data: bytes) -> None:
    """A request line that is not three words, sent alone on an idle kept-alive connection
    (where the sandbox answers what it can at once), is refused 400 and the connection
    closes, as on a new connection: `POST HTTP/1.1` was answered 404 and logged."""
    sandbox = Sandbox(api_key="k").start()
    try:
        sock, replies = served_connection(sandbox)
        with sock, replies:
            sock.sendall(data)
            status, headers, body = read_reply(replies)
            assert (status, headers[b"connection"]) == (400, b"close"), body
            assert "bad request syntax" in json.loads(body)["message"]
            assert replies.read() == b""
        assert [r.status for r in sandbox.requests()] == [200]
    finally:
        sandbox.stop()


def test_a_lone_closing_post_on_a_kept_connection_is_answered_then_closed() -> None:
    """A POST with `Connection: close`, alone on an idle kept-alive connection, is answered
    and then the connection closes."""
    sandbox = Sandbox(api_key="k").start()
    try:
        sock, replies = served_connection(sandbox)
        with sock, replies:
            sock.settimeout(10)  # a connection left open fails the test in 10 s, not 30
            sock.sendall(POST + b"Connection: close\r\ncontent-length: 12\r\n\r\n" + ORDER)
            assert read_reply(replies)[0] == 200
            assert replies.read() == b""
    finally:
        sandbox.stop()


def order_post(order_id: str) -> bytes:
    body = json.dumps({"id": order_id}).encode()
    return POST + b"content-length: %d\r\n\r\n" % len(body) + body


def test_a_request_whose_quick_reply_fails_is_logged_once() -> None:
    """A POST answered at once whose reply cannot be put on the wire (a Retry-After
    fault the wire cannot carry) goes to the connection's coroutine, as any request whose
    answer raises there: it is logged once, not once there and once by the coroutine."""
    sandbox = Sandbox(api_key="k").start()
    try:
        sock, replies = served_connection(sandbox)
        with sock, replies:
            sandbox.faults.throttle_rate = 1.0
            sandbox.faults.retry_after_s = "\u20ac"  # type: ignore[assignment]
            sock.settimeout(10)
            sock.sendall(order_post("o2"))
            assert replies.read() == b""  # the coroutine's reply raised too: closed
        assert [(r.order_id, r.status) for r in sandbox.requests()] == [("o1", 200), ("o2", 429)]
    finally:
        sandbox.stop()


def test_pipelined_posts_after_a_failed_write_are_not_answered_at_once() -> None:
    """Pipelined POSTs on an idle kept connection whose client has gone (reset) in the
    meantime: the first reply's write fails and closes the transport, and the rest are
    not answered at once and logged as answered (their replies dropped unsent): they go
    to the coroutine, which stops as its reader fails."""
    sandbox = Sandbox(api_key="k").start()
    try:
        sock, replies = served_connection(sandbox)
        entered, go_on = threading.Event(), threading.Event()

        def hold() -> None:  # the sandbox's loop reads nothing until the client is gone
            entered.set()
            go_on.wait(30)

        sandbox._loop.call_soon_threadsafe(hold)
        assert entered.wait(10)
        try:
            with sock, replies:
                sock.sendall(b"".join(order_post(o) for o in ("o2", "o3", "o4")))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            go_on.set()

        async def connections() -> int:
            return len(asyncio.all_tasks() - {asyncio.current_task()})

        def served() -> bool:
            running = asyncio.run_coroutine_threadsafe(connections(), sandbox._loop)
            return running.result(10) == 0

        wait_until(served, 10, "the connection's end")
        assert [r.order_id for r in sandbox.requests()] == ["o1", "o2"]
    finally:
        sandbox.stop()


UNREADABLE_BODIES = [
    ("/orders/o1/delivery-status", b'{"delivery_status": []}'),
    ("/orders/o1/delivery-status", b'{"delivery_status": {"a": 1}}'),
    ("/webhooks", b'{"event": {"type": ["order.submit"]}, "id": "o1"}'),
    ("/orders", b'{"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("/orders", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(
    ("path", "body"), UNREADABLE_BODIES, ids=["list", "object", "type", "deep", "deep-top"]
)
def test_a_body_of_the_wrong_shape_is_answered_400_with_the_replies_before_it(
    path: str, body: bytes
) -> None:
    """A status or event type that is a list or object (unhashable), or JSON nested too
    deep to read, is answered 400, on an idle kept connection and pipelined behind and
    before served requests: it raised in the checks, and the connection was aborted with
    the replies before it unsent."""
    sandbox = Sandbox(api_key="k").start()
    bad = (
        f"POST {path} HTTP/1.1\r\nx-api-key: k\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    ok = POST + b"content-length: 12\r\n\r\n" + ORDER
    try:
        sock, replies = served_connection(sandbox)
        with sock, replies:
            sock.sendall(bad)
            assert read_reply(replies)[0] == 400
            sock.sendall(ok + bad + ok)
            assert [read_reply(replies)[0] for _ in range(3)] == [200, 400, 200]
        assert [r.status for r in sandbox.requests()] == [200, 400, 200, 400, 200]
    finally:
        sandbox.stop()


def test_wait_for_wakes_when_a_request_is_logged() -> None:
    """wait_for returns as soon as the request it waits for is logged, not at its timeout."""
    sandbox = Sandbox(api_key="k").start()
    waiting = threading.Event()

    def posted(requests: list[Request]) -> bool:
        waiting.set()  # called under the log's lock: a request logged after this wakes it
        return bool(requests)

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            began = time.monotonic()
            waiter = pool.submit(sandbox.wait_for, posted, 30)
            assert waiting.wait(30)
            sock, replies = served_connection(sandbox)
            sock.close()
            replies.close()
            assert waiter.result(60) is True
            assert time.monotonic() - began < 15
    finally:
        sandbox.stop()


def test_an_answer_handed_out_is_a_copy() -> None:
    """Changing what answer() returned does not change the next reply."""
    sandbox = Sandbox(api_key="k").start()
    try:
        reply = sandbox.answer("POST", "/orders", {"x-api-key": "k"}, ORDER)
        assert reply == (200, {}, {"ok": True})
        handed: dict[str, str] = reply[1]
        handed["x-changed"] = "1"
        reply[2]["ok"] = False
        assert sandbox.answer("POST", "/orders", {"x-api-key": "k"}, ORDER) == (
            200,
            {},
            {"ok": True},
        )
        sock, replies = served_connection(sandbox)
        with sock, replies:
            sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER)
            status, headers, body = read_reply(replies)
            assert (status, b"x-changed" in headers, json.loads(body)) == (200, False, {"ok": True})
    finally:
        sandbox.stop()


def test_a_client_that_does_not_read_is_held_and_then_answered_in_order() -> None:
    """A client that sends requests one by one without reading their replies is held once
    its replies back up (writing paused: the rest goes to the connection's coroutine, which
    waits in drain()), not answered into a buffer without bound; when it reads, every
    reply comes, in order."""
    sandbox = Sandbox(api_key="k").start()
    count, pad = 3400, "x" * 7000  # about 24 MB of 404 replies, each naming its path
    requests = [
        f"POST /{i:05d}{pad} HTTP/1.1\r\nx-api-key: k\r\ncontent-length: 2\r\n\r\n{{}}".encode()
        for i in range(count)
    ]
    try:
        host, port = sandbox.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: fixed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each request at once
        sock.settimeout(60)
        sock.connect((host, int(port)))
        with sock, sock.makefile("rb") as replies, concurrent.futures.ThreadPoolExecutor(1) as pool:
            sock.sendall(POST + b"content-length: 12\r\n\r\n" + ORDER)
            assert read_reply(replies)[0] == 200  # kept alive, idle: answered at once
            for held, request in enumerate(requests):  # one by one: each arrives whole
                sock.sendall(request)

                def logged(r: list[Request], n: int = held + 2) -> bool:
                    return len(r) >= n

                if not sandbox.wait_for(logged, timeout=2):
                    break  # held: kernel buffers take a few MB of replies, not 24 MB
            else:
                pytest.fail("every request answered, its replies unread")
            rest = pool.submit(sock.sendall, b"".join(requests[held + 1 :]))
            got = [read_reply(replies) for _ in range(count)]
            rest.result(60)
        paths = [r.split(b" ")[1].decode() for r in requests]
        assert [(s, json.loads(b)["message"]) for s, _, b in got] == [
            (404, f"no endpoint {p}") for p in paths
        ]
    finally:
        sandbox.stop()


def test_the_page_shows_refused_bodies_whose_id_is_not_a_string() -> None:
    """A refused body whose order id is a number or a list, or that is not JSON at all, is
    logged without an order, and
    the page and log still serve: the page raised (html.escape of 5, a list as a key) on
    every load after it, and its connection closed without a reply."""
    sandbox = Sandbox(api_key="k").start()
    try:
        for path, body in [
            ("/orders", b'{"id": 5}'),
            ("/webhooks", b'{"order_id": [1]}'),
            ("/webhooks", b'{"order_id": "a"'),  # not JSON at all
            ("/orders", b'{"id": "\xff"}'),  # not UTF-8
        ]:
            request = urllib.request.Request(
                sandbox.url + path, data=body, headers={"x-api-key": "k"}, method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 400
            refused.value.close()
        with urllib.request.urlopen(sandbox.url + "/", timeout=30) as page:
            assert page.status == 200 and b"/webhooks" in page.read()
        assert [r["order_id"] for r in sandbox.log()] == [None] * 4
    finally:
        sandbox.stop()
