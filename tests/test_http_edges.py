"""Every listener as CONTRACT.md 6.1 has it: only its own Host names (whatever the
header says), slow clients cut at the deadline without starving health or pushes, IPv6,
and the webhook secret compared as bytes. Against a running daemon, but for the Host
fuzzing (the same server, in this process)."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from courierd.devtools.localbroker import free_port
from courierd.devtools.sandbox import Sandbox
from courierd.edges.listen import host_of
from tests.harness import Daemon, Rig, delivered, open_path, statuses, wait_until
from tests.test_api import serve

pytestmark = pytest.mark.integration
TOKEN = "test-token-0123456789abcdef"
SECRET = "webhook-secret-7f1d-ß-ünï"  # non-ASCII: compared as its UTF-8 bytes


def call(
    port: int,
    method: str,
    path: str,
    host: str | None = None,
    headers: dict[str, str | bytes] | None = None,
    body: bytes | None = None,
    address: str = "127.0.0.1",
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(address, port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", f"localhost:{port}" if host is None else host)
    for name, value in {"Authorization": f"Bearer {TOKEN}", **(headers or {})}.items():
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, data


def listening(rig: Rig, **env: str) -> tuple[Daemon, int]:
    """A daemon with a token and the webhook listener; returns it and the webhook port."""
    port = free_port()
    daemon = rig.daemon(
        COURIERD_HTTP__TOKEN=TOKEN,
        COURIERD_WEBHOOK__LISTEN=f"127.0.0.1:{port}",
        COURIERD_WEBHOOK__SECRET=SECRET,
        **env,
    ).start()
    return daemon, port


def test_a_foreign_host_gets_421_and_no_data_on_every_listener(sqlite_rig: Rig) -> None:
    """DNS rebinding: Host attacker.example gets 421 from health, metrics, API, page and
    webhook; the names the listeners are meant for, allowed_hosts included, get answers."""
    daemon, hook = listening(
        sqlite_rig,
        COURIERD_HTTP__ALLOWED_HOSTS='["courierd.example"]',
        COURIERD_WEBHOOK__ALLOWED_HOSTS='["hooks.example"]',
    )
    api = daemon.http_port
    event = json.dumps({"type": "order.ready", "order_id": "o-1"}).encode()
    calls = [
        (api, "GET", "/healthz", None),
        (api, "GET", "/metrics", None),
        (api, "GET", "/v1/dashboard", None),
        (api, "GET", "/v1/orders?limit=5", None),
        (api, "GET", "/", None),
        (hook, "POST", "/onetablet/events", event),
    ]
    key: dict[str, str | bytes] = {"x-api-key": SECRET.encode()}
    for port, method, path, body in calls:
        for foreign in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.evil.example"):
            status, data = call(port, method, path, foreign, key, body)
            assert status == 421, (path, foreign, data)
            assert set(json.loads(data)) == {"error", "message"}  # nothing else
        own = "courierd.example" if port == api else "hooks.example"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", own):
            assert call(port, method, path, host, key, body)[0] == 200, (path, host)
    assert call(hook, "POST", "/onetablet/events", "courierd.example", key, event)[0] == 421


def test_300_slow_clients_starve_neither_health_nor_pushes(sqlite_rig: Rig) -> None:
    """300 clients trickling their requests and 120 idle ones (past the cap of 400):
    /healthz answers within 1 s and a push gets through while they are open, and each
    slow one is cut at the request deadline."""
    daemon = sqlite_rig.daemon(COURIERD_HTTP__REQUEST_TIMEOUT_S="6").start()
    slow: list[socket.socket] = []
    idle: list[socket.socket] = []
    opened = time.monotonic()
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", daemon.http_port), timeout=5)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
            slow.append(sock)
        for _ in range(120):
            idle.append(socket.create_connection(("127.0.0.1", daemon.http_port), timeout=5))
        pub = sqlite_rig.publisher()
        pub.status("c-1", "e-1", "o-slow", "dasher_confirmed")
        for i in range(3):
            for sock in slow:  # a byte each, never the end of the headers
                if not select.select([sock], [], [], 0)[0]:  # not pushed out at the cap
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X")
            started = time.monotonic()
            status, _ = daemon.health()
            assert status == 200 and time.monotonic() - started < 1.0, i
        wait_until(
            lambda: statuses(delivered(sqlite_rig.onetablet).get("o-slow", [])),
            10,
            "the push while 300 slow clients are connected",
        )
        pub.close()
        assert time.monotonic() - opened < 5, "the push came only after the slow clients left"
        reset = 0
        for sock in slow:  # each is cut at the deadline (or pushed out): a 408, the end
            sock.settimeout(10)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:  # pushed out just as it sent a byte
                reset += 1
                continue
            assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert reset <= 30
        for sock in idle:  # closed by then too, with nothing to answer
            sock.settimeout(10)
            assert sock.recv(4096) == b""
        assert time.monotonic() - opened < 15
    finally:
        for sock in slow + idle:
            sock.close()


def test_ipv6_listeners(sqlite_rig: Rig) -> None:
    """`[::1]:PORT` works for http.listen and webhook.listen."""
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    api, hook = free_port(), free_port()
    daemon = sqlite_rig.daemon(
        COURIERD_HTTP__LISTEN=f"[::1]:{api}",
        COURIERD_WEBHOOK__LISTEN=f"[::1]:{hook}",
        COURIERD_WEBHOOK__SECRET=SECRET,
    ).start(wait_ready=False)

    def health() -> Any:
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log.read_text()
        try:
            return call(api, "GET", "/healthz", f"[::1]:{api}", address="::1")[0] == 200
        except OSError:
            return False

    wait_until(health, 20, "health over IPv6")
    status, data = call(api, "GET", "/v1/dashboard", address="::1")
    assert status == 200 and "active_orders" in json.loads(data)
    event = json.dumps({"type": "order.ready", "order_id": "o-6"}).encode()
    status, _ = call(
        hook, "POST", "/onetablet/events", None, {"x-api-key": SECRET.encode()}, event, "::1"
    )
    assert status == 200


def test_the_webhook_secret_is_compared_as_bytes(sqlite_rig: Rig) -> None:
    """A non-ASCII secret matches when sent as its UTF-8 bytes, and nothing else does."""
    _, hook = listening(sqlite_rig)
    event = json.dumps({"type": "order.ready", "order_id": "o-2"}).encode()
    for key, want in (
        (SECRET.encode(), 200),
        (SECRET.encode("utf-8")[:-1], 401),
        (SECRET.encode("latin-1", "replace"), 401),
        (SECRET.encode() + b"x", 401),
    ):
        status, _ = call(hook, "POST", "/onetablet/events", None, {"x-api-key": key}, event)
        assert status == want, key


@pytest.fixture
def served(tmp_path: Path, onetablet: Sandbox) -> Iterator[int]:
    """The http.listen server in this process, over an empty store; its port."""
    open_path(tmp_path / "courierd.db").close()
    server = serve(tmp_path, onetablet, TOKEN)
    yield server.port
    server.stop()


@given(host=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_host_header_is_answered_421_unless_it_is_ours(served: int, host: str) -> None:
    """Whatever the Host header says, the answer is the dashboard only for our own names
    and 421 (or 400 for a header that is no Host at all) otherwise, never a 500."""
    status, data = call(served, "GET", "/v1/dashboard", host)
    ours = host_of(host) in {"localhost", "127.0.0.1", "::1"}
    assert status == (200 if ours else 421) or (status == 400 and not ours), (host, data)
    if status != 200:
        assert set(json.loads(data)) == {"error", "message"}
