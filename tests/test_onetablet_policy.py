"""One client policy for every call to OneTablet (CONTRACT.md 6.1), with real servers on
127.0.0.1: redirects are failures and never followed, the key stays with OneTablet's
origin, a whole-request deadline, and the proxy variables ruling pushes and commands
alike, whichever library runs underneath."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from courierd.devtools.sandbox import Request, Sandbox
from courierd.edges.onetablet import call
from courierd.edges.onetablet_http import (
    CLIENTS,
    MAX_REPLY_BYTES,
    LoopThread,
    NoAnswer,
    OneTabletHttp,
    origin_of,
)
from courierd.edges.pusher import Pusher
from courierd.errors import Rejected, Unavailable
from tests.conftest import API_KEY, Cli
from tests.harness import Rig, wait_until
from tests.onetablet_servers import ConnectProxy, Flood, OtherHost, Trickler, self_signed
from tests.test_onetablet import BODY, ORDER
from tests.test_pusher import CALLERS, made_by

by_caller = pytest.mark.parametrize("caller", CALLERS, ids="-".join)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    host = OtherHost()
    yield host
    host.close()


def redirect_to(onetablet: Sandbox, other_host: OtherHost) -> str:
    target = f"{other_host.url}/elsewhere"
    onetablet.responder = lambda _: (302, {"Location": target}, {"moved": True})
    return target


@by_caller
def test_a_redirect_fails_the_call_and_is_not_followed(
    onetablet: Sandbox, other_host: OtherHost, caller: tuple[str, str]
) -> None:
    """A 302 to another host is a refusal naming its Location; nothing goes there."""
    target = redirect_to(onetablet, other_host)
    with made_by(caller, onetablet.url, API_KEY) as c, pytest.raises(Rejected) as info:
        c.delivery_status("o-1", BODY, "k")
    assert info.value.status == 302 and target in str(info.value)
    assert other_host.seen == []


def test_order_commands_fail_on_a_redirect(
    cli: Cli, tmp_path: Path, onetablet: Sandbox, other_host: OtherHost
) -> None:
    """`order submit` and `order cancel` answered 302 exit 1 naming the Location, not retried,
    and send nothing to the other host."""
    target = redirect_to(onetablet, other_host)
    (tmp_path / "o.json").write_bytes(ORDER)
    for args in (("submit", "o.json"), ("cancel", "o-1", "--reason", "KITCHEN_BUSY")):
        r = cli("order", *args)
        assert r.code == 1 and "302" in r.err and target in r.err, r
        assert "Traceback" not in r.err
    assert len(onetablet.requests()) == 2 and other_host.seen == []


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("path", ["@127.0.0.1:{port}/o", "http://127.0.0.1:{port}/o", "x"])
def test_the_key_goes_only_to_onetablets_origin(
    onetablet: Sandbox, other_host: OtherHost, client: str, path: str
) -> None:
    """A path that would lead elsewhere (user-info, a whole URL, no slash) is refused
    before anything is sent, with the key or without."""
    port = other_host.url.rsplit(":", 1)[1]

    async def attempt() -> None:
        http = OneTabletHttp(onetablet.url, API_KEY, deadline_s=5, max_connections=1, client=client)
        try:
            await call(http, path.format(port=port), "o-1", b"{}", None, time.time)
        finally:
            await http.close()

    with pytest.raises(Rejected, match="refused"):
        asyncio.run(attempt())
    assert other_host.seen == [] and onetablet.requests() == []


@given(
    st.sampled_from(
        [
            "http://127.0.0.1:8080",
            "https://ot.example.com",
            "https://ot.example.com/api/v1",
            "http://[::1]:9000/x",
            "https://user@ot.example.com:8443",
        ]
    ),
    st.text(),
)
def test_a_path_that_starts_with_a_slash_keeps_onetablets_origin(base: str, rest: str) -> None:
    """Why OneTabletHttp.post takes any path that starts with "/" (and refuses the rest):
    after base_url, it cannot lead to another origin, as the standard library parses
    the URL and as yarl (under aiohttp) does."""
    url = base + "/" + rest
    with contextlib.suppress(ValueError):  # the standard library refuses it: nothing sent
        assert origin_of(url) == origin_of(base)
    try:
        parsed = URL(url, encoded=True)
    except ValueError:  # yarl refuses it: the call fails, nothing is sent
        return
    expected = URL(base, encoded=True)
    assert (parsed.scheme, parsed.host, parsed.port) == (
        expected.scheme,
        expected.host,
        expected.port,
    )


@by_caller
def test_a_trickling_reply_is_cut_at_the_deadline(caller: tuple[str, str]) -> None:
    """Headers at once, then a byte every 0.5 s (30 s in all): the call gives up at its
    1.5 s deadline, though no single read is slow."""
    trickler = Trickler(every_s=0.5, length=60)
    try:
        with made_by(caller, trickler.url, API_KEY, timeout=1.5) as c:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="in time"):
                c.delivery_status("o-1", BODY, "k")
            assert time.monotonic() - started < 10
        assert trickler.connections == 1
    finally:
        trickler.close()


def test_every_call_is_cut_at_its_own_deadline_whenever_it_started(onetablet: Sandbox) -> None:
    """One client, a 1 s deadline: a call that hangs, started while an earlier call's
    deadline was the one being waited for, is still cut at its own deadline (1 s after it
    started), while calls beside it are answered; a call its caller cancels ends
    cancelled, not as a timeout, and takes no other call with it."""
    release, second_in = threading.Event(), threading.Event()

    def hang(r: Request) -> None:  # "hang-*" never answered until released
        if (r.order_id or "").startswith("hang"):
            if r.order_id == "hang-2":
                second_in.set()
            release.wait(30)

    onetablet.responder = hang
    thread = LoopThread("deadline-test")
    http = OneTabletHttp.open_on(thread, onetablet.url, API_KEY, deadline_s=1.0, max_connections=8)

    def post(order: str) -> Future[Any]:
        path = f"/orders/{order}/delivery-status"
        coro = http.post(path, BODY.encode(), {"idempotency-key": order})
        return asyncio.run_coroutine_threadsafe(coro, thread.loop)

    try:
        assert post("quick-1").result(10).status == 200  # its deadline is waited for first
        time.sleep(0.3)  # not a wait for anything: the next call's deadline comes later
        started = time.monotonic()
        hung = post("hang-1")
        assert post("quick-2").result(10).status == 200  # answered beside the hung one
        with pytest.raises(NoAnswer) as cut:
            hung.result(10)
        assert cut.value.reason is None  # the deadline, not a connection error
        assert 0.9 <= time.monotonic() - started < 5

        async def cancel_one() -> str:  # the caller gives up: cancelled, not a timeout
            task = asyncio.create_task(
                http.post("/orders/hang-2/delivery-status", BODY.encode(), {})
            )
            assert await asyncio.to_thread(second_in.wait, 10)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            except NoAnswer as e:
                return f"no answer: {e}"
            return "answered"

        assert thread.run(cancel_one(), timeout=10) == "cancelled"
        assert post("quick-3").result(10).status == 200
    finally:
        release.set()
        with contextlib.suppress(Exception):
            thread.run(http.close(), timeout=5)
        thread.stop()


@by_caller
def test_a_huge_reply_body_is_cut_and_its_status_still_counts(caller: tuple[str, str]) -> None:
    """200 with a 256 MiB body: the push is delivered on its status, after reading at most
    `MAX_REPLY_BYTES` of it, and the connection is dropped rather than drained."""
    flood = Flood()
    try:
        with made_by(caller, flood.url, API_KEY, timeout=60) as c:
            reply = c.delivery_status("o-1", BODY, "k")
        assert reply.status == 200
        wait_until(lambda: flood.sent > 0, 10, "the flood started")
        # What loopback buffers hold beyond the cap is a few MiB, never the whole body.
        assert flood.sent < 64 << 20, flood.sent
    finally:
        flood.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_reply_cut_at_the_cap_leaves_nothing_behind(client: str) -> None:
    """A reply cut at `MAX_REPLY_BYTES`, then the client closed and its loop stopped at
    once (as the order commands stop theirs): no task destroyed while pending, nothing
    unclosed (aiohttp reports its sessions and connections to the loop too).
    httpx-aiohttp's body generators, left suspended inside the one closed, were closed
    by tasks of the loop's that the stopped loop destroyed."""
    flood = Flood()
    thread = LoopThread("cap-test")
    problems: list[str] = []
    thread.loop.set_exception_handler(lambda _, context: problems.append(context["message"]))

    async def once() -> tuple[int, int]:
        http = OneTabletHttp(flood.url, API_KEY, deadline_s=60, max_connections=1, client=client)
        try:
            answer = await http.post("/orders/o-1/delivery-status", BODY.encode(), {})
        finally:
            await http.close()
        return answer.status, len(answer.content)

    try:
        assert thread.run(once(), timeout=60) == (200, MAX_REPLY_BYTES)
    finally:
        thread.stop()
        flood.close()
    thread.loop.close()
    gc.collect()  # a task, session or connection left behind says so to its loop's handler
    assert problems == []


@pytest.mark.parametrize("client", CLIENTS)
def test_a_reply_both_chunked_and_of_a_stated_length_is_no_surprise(
    onetablet: Sandbox, client: str
) -> None:
    """A reply that states a length and says it is chunked (a broken proxy's, say) is
    read or refused as the library sees fit, but never escapes as a library's own error:
    over httpx-aiohttp, aiohttp's parser error went past the client's list of failures."""
    onetablet.responder = lambda _: (200, {"Transfer-Encoding": "chunked"}, b"0\r\n\r\n")
    thread = LoopThread("framing-test")

    async def once() -> int | str:
        http = OneTabletHttp(
            onetablet.url, API_KEY, deadline_s=30, max_connections=1, client=client
        )
        try:
            return (await http.post("/orders/o-1/delivery-status", BODY.encode(), {})).status
        except NoAnswer:
            return "no answer"
        finally:
            await http.close()

    try:
        assert thread.run(once(), timeout=60) in (200, "no answer")
    finally:
        thread.stop()


def test_order_submit_gives_up_on_a_trickling_reply(cli: Cli, tmp_path: Path) -> None:
    """`order submit` against a reply trickling in: each attempt ends at timeout_s, then
    exit 1 saying so (each read is quick: a per-read timeout would wait 30 s a try)."""
    (tmp_path / "o.json").write_bytes(ORDER)
    trickler = Trickler(every_s=0.5, length=60)
    try:
        started = time.monotonic()
        r = cli(
            "order",
            "submit",
            "o.json",
            env={
                "COURIERD_ONETABLET__BASE_URL": trickler.url,
                "COURIERD_ONETABLET__TIMEOUT_S": "1",
                "COURIERD_ONETABLET__RETRY_SCHEDULE_S": "[0.05]",
            },
        )
        assert r.code == 1 and "in time" in r.err and "Traceback" not in r.err, r
        assert time.monotonic() - started < 20 and trickler.connections == 2
    finally:
        trickler.close()


def test_proxy_variables_rule_pushes_and_commands_alike(
    onetablet: Sandbox, other_host: OtherHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY carries the commands' and every push client's calls; NO_PROXY naming
    OneTablet's host takes them all off it."""
    proxy = other_host  # answers 200 to anything, absolute targets included
    for name in ("http_proxy", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    for caller in CALLERS:
        with made_by(caller, onetablet.url, API_KEY) as c:
            c.delivery_status("o-1", BODY, "k")
    target = f"{onetablet.url}/orders/o-1/delivery-status"
    assert [(s.target, s.api_key) for s in proxy.seen] == [(target, API_KEY)] * len(CALLERS)
    assert onetablet.requests() == []

    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    for caller in CALLERS:
        with made_by(caller, onetablet.url, API_KEY) as c:
            c.delivery_status("o-1", BODY, "k")
    assert len(proxy.seen) == len(CALLERS) and len(onetablet.requests()) == len(CALLERS)


# httpx-aiohttp (a bench/test client, not selectable in onetablet.client) hands a proxy's
# credentials to aiohttp through the BasicAuth and proxy_auth that aiohttp 3.x deprecates:
# its code, not ours, so only its two warnings, from its module, are silenced here.
@pytest.mark.filterwarnings(
    "ignore:BasicAuth is deprecated:DeprecationWarning:httpx_aiohttp",
    "ignore:The 'proxy_auth' parameter is deprecated:DeprecationWarning:httpx_aiohttp",
)
def test_a_proxy_urls_credentials_go_to_the_proxy_only(
    onetablet: Sandbox, other_host: OtherHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY with user-info: every caller gives the proxy Basic credentials (the
    user-info percent-decoded), the same from each library."""
    proxy = other_host
    for name in ("http_proxy", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    host_port = proxy.url.removeprefix("http://")
    monkeypatch.setenv("HTTP_PROXY", f"http://courier:p%40ss@{host_port}")
    for caller in CALLERS:
        with made_by(caller, onetablet.url, API_KEY) as c:
            c.delivery_status("o-1", BODY, "k")
    credentials = "Basic " + base64.b64encode(b"courier:p@ss").decode()
    assert [s.proxy_authorization for s in proxy.seen] == [credentials] * len(CALLERS)
    assert onetablet.requests() == []


def test_https_goes_through_a_connect_tunnel_for_every_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY: each caller asks the proxy for a tunnel to OneTablet's host and port
    (CONNECT) and speaks TLS to OneTablet inside it, its certificate verified; the
    proxy sees neither the key nor the path nor the body (aiohttp sent the key in the
    CONNECT while it was one of the session's default headers)."""
    cert, key = self_signed(tmp_path)
    host, proxy = OtherHost(tls=(cert, key)), ConnectProxy()
    try:
        for name in ("http_proxy", "https_proxy", "no_proxy", "NO_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        for caller in CALLERS:
            with made_by(caller, host.url, API_KEY) as c:
                assert c.delivery_status("o-1", BODY, "k").status == 200, caller
        assert proxy.targets == [host.url.removeprefix("https://")] * len(CALLERS)
        seen = [(s.target, s.api_key) for s in host.seen]
        assert seen == [("/orders/o-1/delivery-status", API_KEY)] * len(CALLERS)
        assert proxy.seen.count(b"CONNECT ") == len(CALLERS)  # and TLS records after each
        for secret in (API_KEY.encode(), b"/orders/o-1", b"delivery-status", BODY.encode()):
            assert secret not in proxy.seen, secret
    finally:
        proxy.close()
        host.close()


def test_tls_is_verified_alike_by_every_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate no trust store knows fails the commands and every push client alike,
    nothing sent; named in SSL_CERT_FILE, it is trusted by all of them."""
    cert, key = self_signed(tmp_path)
    host = OtherHost(tls=(cert, key))
    try:
        for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name, raising=False)
        for caller in CALLERS:
            with made_by(caller, host.url, API_KEY) as c, pytest.raises(Unavailable) as info:
                c.delivery_status("o-1", BODY, "k")
            assert "certificate" in str(info.value).lower(), (caller, info.value)
        assert host.seen == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        for caller in CALLERS:
            with made_by(caller, host.url, API_KEY) as c:
                assert c.delivery_status("o-1", BODY, "k").status == 200
        assert len(host.seen) == len(CALLERS)
    finally:
        host.close()


@pytest.mark.integration
def test_a_push_answered_302_is_parked_not_delivered(
    sqlite_rig: Rig, other_host: OtherHost, cli: Cli
) -> None:
    """Through the daemon: the redirected push is parked as failed with the Location in
    last_error; the other host never hears of it, and the next order's push goes out."""
    target = redirect_to(sqlite_rig.onetablet, other_host)
    sqlite_rig.onetablet.responder = lambda r: (
        (302, {"Location": target}, {}) if r.order_id == "moved" else None
    )
    daemon = sqlite_rig.daemon().start()
    pub = sqlite_rig.publisher()
    env = sqlite_rig.store_env
    try:
        pub.status("c1", "e1", "moved", "arrived_at_store")
        failed = wait_until(
            lambda: json.loads(cli("outbox", "failed", "--json", env=env).out),
            15,
            "the redirected push to be parked",
        )
        assert len(failed) == 1
        shown = json.loads(cli("order", "show", "moved", env=env).out)
        (push,) = [p for p in shown["pushes"] if p["state"] == "failed"]
        assert target in push["last_error"] and "302" in push["last_error"]
        assert push["delivered"] in (None, False, 0)
        pub.status("c2", "e2", "sentinel", "arrived_at_store")  # sent after: the sentinel
        assert sqlite_rig.onetablet.wait_for(lambda rs: any(r.order_id == "sentinel" for r in rs))
        assert other_host.seen == []
    finally:
        pub.close()
        daemon.stop()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    status=st.sampled_from([300, 301, 302, 303, 307, 308]),
    location=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=3000),
)
def test_any_redirect_reply_is_an_error_never_a_delivery(
    onetablet: Sandbox, status: int, location: str
) -> None:
    """Whatever a redirect's Location holds, the push is refused or retried, never taken
    as delivered, and its message stays short."""
    onetablet.responder = lambda _: (status, {"Location": location}, {})
    with Pusher(onetablet.url, API_KEY) as p, pytest.raises((Rejected, Unavailable)) as info:
        p.delivery_status("o-1", BODY, "k")
    assert len(str(info.value)) < 600
    if isinstance(info.value, Rejected):
        assert info.value.status == status and "not followed" in str(info.value)
