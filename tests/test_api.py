"""The dispatch API on `http.listen`: auth rules, the error shape for everything a client
can get wrong (hostile bodies included), submit and cancel as the commands do them, the
reads against a running daemon with traffic, and schemathesis against /openapi.json."""

from __future__ import annotations

import gc
import http.client
import json
import math
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from courierd.config import GeofenceSettings, HttpSettings, OneTabletSettings, Settings
from courierd.config import StoreSettings as StoreCfg
from courierd.devtools.sandbox import Sandbox
from courierd.domain.model import (
    Assignment,
    CourierOffline,
    DeadLetter,
    LocationFix,
    Place,
    Status,
    StatusEvent,
    iso,
)
from courierd.edges.health import http_listener, registry_text
from courierd.edges.http import HttpServer
from courierd.edges.listen import check_exposure
from courierd.errors import ConfigError
from courierd.store import Store
from tests.conftest import API_KEY, Cli, open_path
from tests.harness import Publisher, Rig, wait_until

pytestmark = pytest.mark.integration
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PICKUP = (52.5200, 13.4050)


def moved(point: tuple[float, float], north_m: float, east_m: float) -> tuple[float, float]:
    lat, lng = point
    return lat + north_m / 111_320, lng + east_m / (111_320 * math.cos(math.radians(lat)))


DROPOFF = moved(PICKUP, 1500, 1200)


def drive(pub: Publisher, order_id: str, courier: str, t0: float) -> None:
    """Dispatch assigns the order with its places; the courier confirms in the app, then
    only sends fixes: to the store, a while in it, then away towards the customer."""
    pub.publish(
        "dispatch/assignments",
        {
            "order_id": order_id,
            "courier_id": courier,
            "pickup": {"lat": PICKUP[0], "lng": PICKUP[1], "radius_m": 60},
            "dropoff": {"lat": DROPOFF[0], "lng": DROPOFF[1], "radius_m": 40},
        },
    )
    pub.status(courier, f"{order_id}-confirmed", order_id, "dasher_confirmed", ts=iso(t0))
    route = [(t0 + 20 * i, moved(PICKUP, -1600 + 200 * i, 0)) for i in range(8)]
    route += [(t0 + 160 + 20 * i, moved(PICKUP, -20 + 5 * i, 3)) for i in range(6)]
    route += [(t0 + 280 + 20 * i, moved(PICKUP, 150 * (i + 1), 120 * (i + 1))) for i in range(5)]
    for t, (lat, lng) in route:
        fix = {"ts": iso(t), "lat": lat, "lng": lng, "accuracy_m": 5, "speed_mps": 9}
        pub.publish(f"couriers/{courier}/location", fix)


# -- a real HTTP server in this process, over a fresh store and the OneTablet stand-in --


class Client:
    def __init__(self, port: int, onetablet: Sandbox, store_path: Path) -> None:
        self.port, self.onetablet, self.store_path = port, onetablet, store_path

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = TOKEN,
    ) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        conn.request(method, path, body=body, headers=sent)
        reply = conn.getresponse()
        data = reply.read()
        conn.close()
        doc = json.loads(data) if reply.getheader("content-type") == "application/json" else {}
        return reply.status, doc, reply

    def raw(self, request: bytes) -> tuple[int, dict[str, Any]]:
        """Bytes as written, the socket left open: the server must answer by itself."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    def sent(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.onetablet.requests()]


class Served(HttpServer):
    """A real server in this process; `stop()` closes its API too."""

    def __init__(self, settings: Settings, health: dict[str, Any]) -> None:
        async def check() -> dict[str, Any]:
            return health

        listener, self.api = http_listener(
            settings, check, registry_text(CollectorRegistry()), listen="127.0.0.1:0"
        )
        super().__init__([listener])

    def stop(self) -> None:
        super().stop()
        if self.api is not None:
            self.api.close()


def serve(
    tmp_path: Path,
    onetablet: Sandbox,
    token: str | None,
    deadline_s: float = 10,
    health: dict[str, Any] | None = None,
) -> Served:
    settings = Settings(
        store=StoreCfg(path=tmp_path / "courierd.db"),
        http=HttpSettings(
            token=None if token is None else SecretStr(token), request_timeout_s=deadline_s
        ),
        onetablet=OneTabletSettings(
            base_url=onetablet.url, api_key=SecretStr(API_KEY), retry_schedule_s=(0.05, 0.05)
        ),
        geofence=GeofenceSettings(radius_m=80, exit_factor=2.5),
    )
    server = Served(settings, {"status": "ok", "reasons": [], **(health or {})})
    server.start()
    return server


@pytest.fixture
def api(tmp_path: Path, onetablet: Sandbox) -> Iterator[Client]:
    """The API with a token, over a fresh store holding a few orders and dead letters."""
    store = open_path(tmp_path / "courierd.db")
    store.writer.commit(
        [
            StatusEvent("e1", "o-active", "c1", Status.ARRIVED_AT_STORE),
            StatusEvent("e2", "o-done", "c2", Status.DROPOFF),
            DeadLetter("couriers/c1/status", b"{", "bad_json", "payload is not JSON"),
        ],
        now=time.time(),
    )
    store.close()
    server = serve(tmp_path, onetablet, TOKEN, deadline_s=2, health={"onetablet": "unauthorized"})
    yield Client(server.port, onetablet, tmp_path / "courierd.db")
    server.stop()


def assert_error(status: int, doc: dict[str, Any], want: int, kind: str) -> None:
    assert (status, doc.get("error")) == (want, kind), doc
    assert set(doc) == {"error", "message"} and doc["message"]


def test_reads_need_the_token_health_and_metrics_never(api: Client) -> None:
    """Without the right Bearer token /v1 answers 401; /healthz, /metrics and the page don't ask."""
    for token in (None, "wrong-token-0123456789"):
        status, doc, reply = api.call("GET", "/v1/dashboard", token=token)
        assert_error(status, doc, 401, "Unauthorized")
        assert reply.getheader("www-authenticate", "").startswith("Bearer")
    status, doc, _ = api.call("GET", "/v1/dashboard", headers={"Authorization": "Basic eDp5"})
    assert_error(status, doc, 401, "Unauthorized")
    for path in ("/healthz", "/metrics", "/", "/page/app.js", "/page/app.css", "/openapi.json"):
        assert api.call("GET", path, token=None)[0] == 200, path
    status, doc, _ = api.call("GET", "/v1/dashboard")
    assert status == 200 and doc["auth_paused"] is True
    assert doc["orders_by_state"]["arrived_at_store"] == 1 and doc["active_total"] == 1
    assert [d["reason"] for d in doc["dead_letters"]] == ["bad_json"]


def test_writes_are_off_without_a_token(tmp_path: Path, onetablet: Sandbox) -> None:
    """With no http.token, submit and cancel answer 403 and send nothing; reads stay open."""
    open_path(tmp_path / "courierd.db").close()
    server = serve(tmp_path, onetablet, None)
    client = Client(server.port, onetablet, tmp_path)
    try:
        status, doc, _ = client.call("POST", "/v1/orders", b'{"id": "o-1"}', token=None)
        assert_error(status, doc, 403, "WritesDisabled")
        status, doc, _ = client.call("POST", "/v1/orders/o-1/cancel", b"{}", token=None)
        assert_error(status, doc, 403, "WritesDisabled")
        assert client.call("GET", "/v1/orders", token=None)[0] == 200
        assert client.sent() == []
    finally:
        server.stop()


def test_no_token_beyond_loopback_refuses_to_start(cli: Cli, tmp_path: Path) -> None:
    """`courierd run` listening beyond loopback without http.token exits 2 naming both keys."""
    result = cli("run", env={"COURIERD_HTTP__LISTEN": "0.0.0.0:8787"})
    assert result.code == 2, result.err
    assert "http.listen" in result.err and "COURIERD_HTTP__TOKEN" in result.err
    for listen in ("127.0.0.1:1", "127.9.9.9:1", "[::1]:1", "localhost:1", ""):
        check_exposure(HttpSettings(listen=listen))
    for listen in ("0.0.0.0:1", "[::]:1", "192.0.2.7:1", "courierd.example:1"):
        with pytest.raises(ConfigError, match=r"http\.token"):
            check_exposure(HttpSettings(listen=listen))
    check_exposure(HttpSettings(listen="0.0.0.0:1", token=SecretStr(TOKEN)))


HOSTILE = {
    "deep JSON": b"[" * 100_000 + b"]" * 100_000,
    "huge number": b'{"id": "o-1", "subtotal": 1' + b"0" * 5000 + b"}",
    "NaN": b'{"id": "o-1", "subtotal": NaN}',
    "lone surrogate": b'{"id": "\\ud800"}',
    "not UTF-8": b'{"id": "\xff\xfe"}',
    "not an object": b'["o-1"]',
    "wrong type": b'{"id": 7}',
    "no id": b'{"store": {}}',
    "empty": b"",
    "slash in id": b'{"id": "a/b"}',
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_order_bodies_get_a_clear_400(api: Client, body: bytes) -> None:
    """A submit body courierd cannot use is a 400 naming the problem; OneTablet sees nothing."""
    if len(body) > 64 * 1024:
        body = body[:60_000]  # still unbalanced, far too deep
    status, doc, _ = api.call("POST", "/v1/orders", body)
    assert_error(status, doc, 400, "BadRequest")
    assert api.sent() == []


def test_oversized_and_mis_sized_bodies(api: Client) -> None:
    """70 KB is a 413; a short (cut at the deadline: 408), a bogus or a chunked
    Content-Length is answered, never hung."""
    status, doc, _ = api.call("POST", "/v1/orders", b'{"id": "o-1", "x": "' + b"a" * 70_000 + b'"}')
    assert_error(status, doc, 413, "PayloadTooLarge")
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    started = time.monotonic()
    status, doc = api.raw(  # (a hang fails at raw's socket timeout)
        b"POST /v1/orders HTTP/1.1\r\nHost: localhost\r\n" + auth + b"Content-Length: 100\r\n\r\n{}"
    )
    assert_error(status, doc, 408, "RequestTimeout")
    assert time.monotonic() - started > 1.5  # held to the fixture's 2 s deadline, not cut early
    status, doc = api.raw(b"POST /v1/orders HTTP/1.1\r\n" + auth + b"Content-Length: -5\r\n\r\n")
    assert_error(status, doc, 400, "BadRequest")
    status, doc = api.raw(
        b"POST /v1/orders HTTP/1.1\r\nHost: localhost\r\n"
        + auth
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert_error(status, doc, 411, "LengthRequired")
    status, doc = api.raw(
        b"GET /v1/orders HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    )
    assert_error(status, doc, 431, "HeadersTooLarge")
    assert api.sent() == []


def test_wrong_paths_methods_and_parameters(api: Client) -> None:
    """Unknown paths 404, wrong methods 405 with Allow, bad query parameters and ids 400."""
    assert_error(*api.call("GET", "/v2/orders")[:2], 404, "NotFound")
    assert_error(*api.call("GET", "/v1/orders/nope")[:2], 404, "NotFound")
    assert_error(*api.call("GET", "/v1/orders/nope/track")[:2], 404, "NotFound")
    status, doc, reply = api.call("DELETE", "/v1/orders/o-active")
    assert_error(status, doc, 405, "MethodNotAllowed")
    assert reply.getheader("allow") == "GET, HEAD"
    for query in (
        "?colour=red",
        "?limit=0",
        "?limit=501",
        "?limit=+5",
        "?limit=1&limit=2",
        "?state=lost",
        "?cursor=bm9wZQ",
        "?cursor=%%%",
        "?courier_id=%ff",
        "?courier_id=a%00b",
    ):
        assert_error(*api.call("GET", "/v1/orders" + query)[:2], 400, "BadRequest")
    assert_error(*api.call("GET", "/v1/dashboard?x=1")[:2], 400, "BadRequest")
    assert_error(*api.call("GET", "/v1/orders/%ff")[:2], 400, "BadRequest")
    assert_error(*api.call("GET", "/v1/orders/" + "x" * 129)[:2], 400, "BadRequest")


def test_orders_page_newest_first_with_a_cursor(api: Client) -> None:
    """GET /v1/orders pages through every order once, newest update first, with filters."""
    store = open_path(api.store_path)
    for i in range(5):
        store.writer.commit(
            [StatusEvent(f"p{i}", f"o-page-{i}", "c9", Status.DASHER_CONFIRMED)], now=2e9 + i
        )
    store.close()
    seen, cursor = [], None
    while True:
        query = "?limit=2" + ("" if cursor is None else f"&cursor={cursor}")
        status, doc, _ = api.call("GET", "/v1/orders" + query)
        assert status == 200 and len(doc["orders"]) <= 2
        seen += [o["order_id"] for o in doc["orders"]]
        if (cursor := doc["next_cursor"]) is None:
            break
    assert seen[:5] == [f"o-page-{i}" for i in range(4, -1, -1)]
    assert sorted(seen) == sorted({*seen}) and {"o-active", "o-done"} <= set(seen)
    _, doc, _ = api.call("GET", "/v1/orders?state=active&courier_id=c9")
    assert {o["order_id"] for o in doc["orders"]} == {f"o-page-{i}" for i in range(5)}
    _, doc, _ = api.call("GET", "/v1/orders?state=dropoff")
    assert [o["order_id"] for o in doc["orders"]] == ["o-done"]


def test_submit_and_cancel_do_what_the_commands_do(api: Client) -> None:
    """POST /v1/orders forwards the document as written; cancel asks OneTablet, then cancels."""
    document = b'{"id": "o-new", "store": {"merchant_supplied_id": "s-1"}, "subtotal": 1250}'
    status, doc, _ = api.call("POST", "/v1/orders", document)
    assert status == 200 and doc == {"order_id": "o-new", "status": 200, "reply": {"ok": True}}
    assert api.onetablet.requests()[-1].body == document
    assert api.call("GET", "/v1/orders/o-new")[1]["state"] == "new"
    status, doc, _ = api.call(
        "POST", "/v1/orders/o-active/cancel", b'{"reason": "STORE_CLOSED", "details": "flood"}'
    )
    assert status == 200 and doc["cancelled"] is True and doc["dropped_pushes"] >= 0
    assert api.onetablet.requests()[-1].json == {
        "cancel_reason": "STORE_CLOSED",
        "cancel_details": "flood",
    }
    assert api.call("GET", "/v1/orders/o-active")[1]["cancelled"] is True
    assert api.call("POST", "/v1/orders/o-new/cancel")[0] == 200  # no body: reason OTHER
    assert api.onetablet.requests()[-1].json == {"cancel_reason": "OTHER"}
    for body in (b'{"reason": "BORED"}', b'{"why": "x"}', b'{"details": 5}', b"[]", b"{"):
        assert_error(*api.call("POST", "/v1/orders/o-new/cancel", body)[:2], 400, "BadRequest")
    status, doc, _ = api.call("POST", "/v1/orders/o-done/cancel")
    assert_error(status, doc, 409, "Conflict")
    assert "dropped off" in doc["message"]


def test_onetablet_refusing_is_a_502_with_its_message(api: Client) -> None:
    """When OneTablet refuses a submit or a cancel, the API says 502 and what OneTablet said."""
    api.onetablet.responder = lambda r: (
        (400, {}, {"error": "Bad Request", "message": "store s-1 is closed"})
        if r.path.startswith("/orders")
        else None
    )
    status, doc, _ = api.call("POST", "/v1/orders", b'{"id": "o-x"}')
    assert_error(status, doc, 502, "OneTabletError")
    assert "store s-1 is closed" in doc["message"]
    status, doc, _ = api.call("POST", "/v1/orders/o-active/cancel")
    assert_error(status, doc, 502, "OneTabletError")
    assert api.call("GET", "/v1/orders/o-active")[1]["cancelled"] is False


def test_a_stopped_server_leaves_nothing_for_the_garbage_collector(
    tmp_path: Path, onetablet: Sandbox
) -> None:
    """HttpServer.stop closes its loop: only stopped, the loop and its self-pipe (a
    socket pair) went to the garbage collector, which warned of each (ResourceWarning)
    in whatever test ran then."""
    gc.collect()  # what earlier tests left is not this test's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        server = serve(tmp_path, onetablet, TOKEN)
        try:
            assert get(server.port, "/healthz")[0] == 200
        finally:
            server.stop()
        server.stop()  # again: nothing more to do
        del server
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_database_unavailable_is_a_503(tmp_path: Path, onetablet: Sandbox) -> None:
    """When the database cannot be read, reads answer 503 with the reason."""
    server = serve(tmp_path / "missing", onetablet, TOKEN)
    try:
        client = Client(server.port, onetablet, tmp_path)
        for path in ("/v1/dashboard", "/v1/orders", "/v1/orders/o-1", "/v1/couriers"):
            assert_error(*client.call("GET", path)[:2], 503, "DatabaseUnavailable")
    finally:
        server.stop()


def test_the_reads_on_every_store(store: Store) -> None:
    """The API's reads give the same answers on SQLite and on PostgreSQL."""
    t0 = time.time() - 600
    pickup, dropoff = Place(*PICKUP, 60), Place(*DROPOFF)
    near = [moved(PICKUP, -900 + 200 * i, 0) for i in range(4)]
    store.writer.commit(
        [
            Assignment("o-1", "c-1", pickup=pickup, dropoff=dropoff),
            StatusEvent("e1", "o-1", "c-1", Status.DASHER_CONFIRMED, ts=iso(t0)),
            *(LocationFix("c-1", iso(t0 + 30 * (i + 1)), *p, 5.0, 8.0) for i, p in enumerate(near)),
            StatusEvent("e2", "o-2", "c-1", Status.DASHER_CONFIRMED, ts=iso(t0)),
            StatusEvent("e3", "o-3", "c-2", Status.DROPOFF, ts=iso(t0)),
            CourierOffline("c-2"),
            DeadLetter("couriers/c-9/status", b"{", "bad_json", "payload is not JSON"),
        ],
        now=time.time(),
    )
    q = store.queries
    page, last = q.order_page(state=None, courier_id=None, limit=2, after=None)
    rest, end = q.order_page(state=None, courier_id=None, limit=2, after=last)
    assert last is not None and end is None
    assert sorted(o["order_id"] for o in page + rest) == ["o-1", "o-2", "o-3"]
    active, _ = q.order_page(state="active", courier_id="c-1", limit=5, after=None)
    assert {o["order_id"] for o in active} == {"o-1", "o-2"}
    c1 = next(c for c in q.couriers_overview(10) if c["courier_id"] == "c-1")
    assert c1["active_order_ids"] == ["o-1", "o-2"]  # the one further along first
    assert c1["eta"]["order_id"] == "o-1" and c1["eta"]["to"] == "pickup"
    board = q.dashboard(time.time(), active_cap=1, dead_letters=5)
    assert board["orders_by_state"]["arriving_at_store"] == 1 and board["active_total"] == 2
    assert len(board["active_orders"]) == 1 and board["active_truncated"] is True
    assert [d["reason"] for d in board["dead_letters"]] == ["bad_json"]
    track = q.order_track("o-1", pickup_radius_m=100, dropoff_radius_m=50, exit_factor=2, limit=3)
    assert track is not None and track["truncated"] is True
    assert [p["ts"] for p in track["points"]] == [iso(t0 + 30 * i) for i in (2, 3, 4)]
    assert track["pickup"]["exit_radius_m"] == 120 and track["dropoff"]["radius_m"] == 50
    assert (
        q.order_track("nope", pickup_radius_m=1, dropoff_radius_m=1, exit_factor=1, limit=1) is None
    )


# -- against a running daemon --------------------------------------------------------


def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    reply = conn.getresponse()
    doc = json.loads(reply.read())
    conn.close()
    return reply.status, doc


def with_traffic(sqlite_rig: Rig, token: str | None = TOKEN) -> int:
    """A daemon (with `token`, if any), one geofenced delivery under way, a courier gone
    offline with an order, and a dead letter; returns the daemon's HTTP port."""
    daemon = sqlite_rig.daemon(**({"COURIERD_HTTP__TOKEN": token} if token else {})).start()
    pub = sqlite_rig.publisher()
    drive(pub, "o-geo", "c-geo", time.time() - 900)
    pub.status("c-app", "app-1", "o-app", "dasher_confirmed")
    pub.publish("couriers/c-app/lwt", b"gone")
    pub.publish("couriers/c-junk/status", b"{not json")
    pub.close()
    port = daemon.http_port
    wait_until(
        lambda: get(port, "/v1/orders/o-geo", token)[1].get("state") == "dasher_out_for_delivery",
        20,
        "the geofence to move o-geo out for delivery",
    )
    wait_until(
        lambda: get(port, "/v1/dashboard", token)[1]["couriers_offline"], 20, "c-app offline"
    )
    return port


def test_reads_of_a_running_daemon(sqlite_rig: Rig) -> None:
    """Dashboard, couriers and track show a live delivery: states, fixes, places and ETA."""
    port = with_traffic(sqlite_rig)
    status, dash = get(port, "/v1/dashboard")
    assert status == 200 and dash["health"]["status"] == "ok" and dash["auth_paused"] is False
    assert dash["orders_by_state"]["dasher_out_for_delivery"] == 1
    assert {o["order_id"]: o["state"] for o in dash["active_orders"]} == {
        "o-geo": "dasher_out_for_delivery",
        "o-app": "dasher_confirmed",
    }
    assert dash["couriers_offline"][0] | {"last_seen": None} == {
        "courier_id": "c-app",
        "last_seen": None,
        "order_ids": ["o-app"],
    }
    assert [d["reason"] for d in dash["dead_letters"]] == ["bad_json"]
    _, couriers = get(port, "/v1/couriers")
    geo = next(c for c in couriers["couriers"] if c["courier_id"] == "c-geo")
    assert geo["active_order_ids"] == ["o-geo"] and geo["offline"] is False
    assert geo["eta"]["order_id"] == "o-geo" and geo["eta"]["to"] == "dropoff"
    _, track = get(port, "/v1/orders/o-geo/track")
    assert track["pickup"] == {
        "lat": PICKUP[0],
        "lng": PICKUP[1],
        "radius_m": 60.0,
        "exit_radius_m": 120.0,
    }
    assert track["dropoff"]["radius_m"] == 40.0
    assert len(track["points"]) == 19  # every fix since dasher_confirmed, in time order
    assert [p["ts"] for p in track["points"]] == sorted(p["ts"] for p in track["points"])
    sources = {t["status"]: t["source"] for t in track["transitions"]}
    assert sources == {
        "dasher_confirmed": "app",
        "arriving_at_store": "geofence",
        "arrived_at_store": "geofence",
        "dasher_out_for_delivery": "geofence",
    }
    assert all(t["lat"] is not None for t in track["transitions"][1:])


def integral(doc: Any) -> Any:
    """`doc` with integral floats written as integers."""
    if isinstance(doc, dict):
        return {k: integral(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [integral(v) for v in doc]
    if isinstance(doc, float) and doc.is_integer() and abs(doc) < 1e39:
        return int(doc)
    return doc


def test_openapi_document_matches_the_live_daemon(sqlite_rig: Rig) -> None:
    """schemathesis: every response of a live daemon, writes included, fits /openapi.json."""
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.result import Err

    port = with_traffic(sqlite_rig)
    base = f"http://127.0.0.1:{port}"
    _, page = get(port, "/v1/orders?limit=1")
    schemathesis.openapi.format("courierd-cursor", st.just(page["next_cursor"]))
    config = SchemathesisConfig.from_dict(
        {"base-url": base, "auth": {"openapi": {"bearer": {"bearer": TOKEN}}}}
    )
    schema = schemathesis.openapi.from_url(base + "/openapi.json", config=config)

    @hypothesis.settings(
        max_examples=20,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(data=st.data())
    def check(strategy: Any, data: st.DataObject) -> None:
        case = data.draw(strategy)
        if isinstance(case.body, dict | list):  # JSON Schema's 1.0 is an integer; courierd's
            case.body = integral(case.body)  # not: it wants 1, as `order submit` does
        case.call_and_validate()

    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # an operation schemathesis could not read
        operations.append(result.ok())
    assert len(operations) == 9
    for operation in operations:
        strategies = [
            operation.as_strategy(),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        ]
        if "{order_id}" in operation.path:  # and an order that exists
            strategies.append(operation.as_strategy(path_parameters={"order_id": "o-geo"}))
        for strategy in strategies:
            check(strategy)
    assert any(r.path == "/orders" for r in sqlite_rig.onetablet.requests())


# -- what-if replays and learned pickup points -----------------------------------------


def with_a_replayable_delivery(store_path: Path) -> None:
    """o-replay: driven to the store from 3 km, a wait, away east (tests/test_replay.py);
    store s-replay, where four couriers waited 60 m east of its registered point."""
    from tests.test_replay import STORE, T0, a_delivery
    from tests.test_replay import moved as shifted

    store = open_path(store_path)
    try:
        store.registry.import_stores([("s-replay", Place(*STORE, 80.0))], T0)
        store.writer.commit(
            [
                Assignment("o-replay", "c-replay", pickup=Place(*STORE)),
                StatusEvent("r1", "o-replay", "c-replay", Status.DASHER_CONFIRMED, iso(T0)),
                *(LocationFix("c-replay", iso(t), y, x, 5.0) for t, y, x in a_delivery(T0)),
            ],
            now=T0 + 5000,
        )
        for n in range(4):
            oid, t0 = f"o-stay-{n}", T0 + (n + 1) * 3600
            store.db.execute(
                "INSERT INTO orders (order_id, state, updated_at, store_id) "
                "VALUES (?, 'new', ?, 's-replay')",
                (oid, iso(t0)),
            )
            fixes = a_delivery(t0, shifted(STORE, 0, 60))
            store.writer.commit(
                [
                    Assignment(oid, f"c-stay-{n}"),
                    *(LocationFix(f"c-stay-{n}", iso(t), y, x, 5.0) for t, y, x in fixes),
                ],
                now=t0 + 2000,
            )
    finally:
        store.close()


def test_replay_of_one_order_with_overrides(api: Client) -> None:
    """GET /v1/orders/{id}/replay: unchanged settings give back the live times and
    places; a smaller approach_m moves only arriving_at_store, later and elsewhere; an
    order without kept fixes has nothing to replay; an unknown one is a 404."""
    with_a_replayable_delivery(api.store_path)
    status, same, _ = api.call("GET", "/v1/orders/o-replay/replay")
    assert status == 200, same
    assert same["overrides"] == {} and same["changed"] is False and same["missing_fixes"] == 0
    assert same["fixes"] == 43
    assert [s["status"] for s in same["statuses"]] == [
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
    ]
    for s in same["statuses"]:
        assert s["was"] == s["would_be"] and s["was_at"] == s["would_be_at"] and s["shift_s"] == 0
        assert s["was_at"] is not None and s["changed"] is False

    status, tuned, _ = api.call("GET", "/v1/orders/o-replay/replay?geofence.approach_m=300")
    assert status == 200, tuned
    assert tuned["overrides"] == {"geofence.approach_m": 300} and tuned["changed"] is True
    got = {s["status"]: s for s in tuned["statuses"]}
    arriving = got.pop("arriving_at_store")
    assert arriving["shift_s"] == 40.0 and arriving["changed"] is True
    from tests.test_replay import STORE

    def off(at: dict[str, float]) -> float:
        return math.dist(STORE, (at["lat"], at["lng"])) * 111_320

    assert off(arriving["would_be_at"]) < 300 < off(arriving["was_at"]) < 1001
    assert all(s["was"] == s["would_be"] and not s["changed"] for s in got.values())

    status, none, _ = api.call("GET", "/v1/orders/o-active/replay?geofence.radius_m=150")
    assert status == 200 and none["fixes"] == 0 and none["statuses"] == []
    assert_error(*api.call("GET", "/v1/orders/nope/replay")[:2], 404, "NotFound")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("geofence.nope=1", "unknown"),
        ("radius_m=5", "unknown"),
        ("geofence.enabled=false", "unknown"),
        ("geofence.radius_m=", "geofence.radius_m"),
        ("geofence.radius_m=nan", "finite"),
        ("geofence.radius_m=-Infinity", "finite"),
        ("geofence.dwell_s=1e999", "finite"),
        ("geofence.radius_m=" + "9" * 1000, "finite"),
        ("geofence.min_fixes=" + "9" * 1000, "geofence.min_fixes"),
        ("geofence.min_fixes=1.5", "geofence.min_fixes"),
        ("geofence.exit_factor=0.5", "geofence.exit_factor"),
        ("geofence.auto_dropoff=maybe", "geofence.auto_dropoff"),
        ("geofence.radius_m=%ED%A0%80", "utf-8"),
        ("geofence.radius_m=1&geofence.radius_m=2", "twice"),
    ],
)
def test_bad_overrides_are_a_clear_400(api: Client, query: str, needle: str) -> None:
    """What `replay --set` refuses, the API refuses with a 400 naming it."""
    status, doc, _ = api.call("GET", "/v1/orders/o-active/replay?" + query)
    assert_error(status, doc, 400, "BadRequest")
    assert needle in doc["message"], doc


OVERRIDE_KEYS = [
    f"geofence.{k}" for k in GeofenceSettings.model_fields if k != "enabled"
]  # what replay --set takes


def hostile_values() -> Any:
    from hypothesis import strategies as st

    from tests.hostile import fragments

    return st.one_of(
        st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-0", "0", "1e-320"]),
        st.integers(1, 1000).map(lambda n: "9" * n),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["\ud800", "a\udfff", "\x00", "1\x00", "true", "yes", "2.0", " 5 "]),
        fragments,
        st.text(max_size=40),
    )


def test_hostile_overrides_are_a_400_never_a_500(api: Client) -> None:
    """Any keys (known, unknown, hostile) with any values (NaN, inf, huge numbers, lone
    surrogates, control characters, JSON fragments) through the real HTTP path, to the
    replay and the suggestions: an answer or a clear 400 in the API's error shape, never
    a 500."""
    from urllib.parse import quote

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    with_a_replayable_delivery(api.store_path)
    keys = st.one_of(st.sampled_from(OVERRIDE_KEYS), st.text(max_size=20))

    def encode(text: str) -> str:
        return quote(text.encode("utf-8", "surrogatepass"), safe="")

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(
        st.sampled_from(["/v1/orders/o-replay/replay", "/v1/stores/suggestions"]),
        st.lists(st.tuples(st.one_of(keys, st.just("min_orders")), hostile_values()), max_size=4),
    )
    def check(path: str, pairs: list[tuple[str, str]]) -> None:
        query = "&".join(f"{encode(k)}={encode(v)}" for k, v in pairs)
        status, doc, _ = api.call("GET", f"{path}?{query}")
        if status == 431:  # a request line over the server's limit: refused before the API
            assert_error(status, doc, 431, "HeadersTooLarge")
            return
        assert status in (200, 400), (status, doc)
        if status == 400:
            assert_error(status, doc, 400, "BadRequest")
            assert "\n" not in doc["message"]
        elif path.endswith("/replay"):
            assert set(doc["overrides"]) <= set(OVERRIDE_KEYS)
            assert {k for k, _ in pairs} <= set(OVERRIDE_KEYS)
            json.dumps(doc, allow_nan=False)  # finite numbers only
        else:
            assert {k for k, _ in pairs} <= {"min_orders"}
            assert all(s["visits"] >= int(v) for _, v in pairs for s in doc["stores"])

    check()


def test_store_suggestions(api: Client) -> None:
    """GET /v1/stores/suggestions: what `stores suggest --json` prints, with the
    registered point beside it; min_orders as the command's --min-orders."""
    with_a_replayable_delivery(api.store_path)
    status, doc, _ = api.call("GET", "/v1/stores/suggestions")
    assert status == 200, doc
    (found,) = doc["stores"]
    assert found["merchant_supplied_id"] == "s-replay" and found["visits"] == 4
    assert 40 <= found["moved_m"] <= 80
    assert found["registered"]["radius_m"] == 80
    assert api.call("GET", "/v1/stores/suggestions?min_orders=5")[1] == {"stores": []}
    # One reading serves every caller for 5 minutes: the stays gone, it is the same.
    with sqlite3.connect(api.store_path) as db:
        db.execute("DELETE FROM track_points")
    assert api.call("GET", "/v1/stores/suggestions")[1] == doc
    assert api.call("GET", "/v1/stores/suggestions?min_orders=4")[1] == {"stores": []}
    # The largest the schema allows is taken (four digits were, once).
    assert api.call("GET", "/v1/stores/suggestions?min_orders=10000")[:2] == (200, {"stores": []})
    for query in ("min_orders=0", "min_orders=10001", "min_orders=x", "min_orders=1e3", "other=1"):
        assert_error(*api.call("GET", "/v1/stores/suggestions?" + query)[:2], 400, "BadRequest")
