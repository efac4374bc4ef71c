"""The operator page in a real browser (Debian's headless Chromium, driven by Selenium)
against a running daemon with traffic: the dashboard, live updates, one order's view
with its SVG track, its what-if replay with a geofence override, the stores' learned
pickup points, and the token prompt."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import SecretStr

from courierd.config import OneTabletSettings, Settings, StoreSettings
from courierd.domain.model import Place, iso
from courierd.services import orders
from tests.conftest import API_KEY
from tests.harness import Rig, delivered, wait_until
from tests.test_api import TOKEN, with_traffic
from tests.test_replay import STORE, a_delivery, moved

pytestmark = pytest.mark.integration
T = TypeVar("T")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1280,1000",
)

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile; always quit, even when the test failed."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def severe(browser: webdriver.Chrome) -> list[str]:
    """The messages of the browser console's errors (script errors, CSP refusals)."""
    # Selenium leaves Chromium's get_log unannotated.
    entries: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


def attribute(element: WebElement, name: str) -> str:
    """An attribute the page always sets (None, for one missing, fails the test)."""
    value = element.get_attribute(name)
    assert value is not None, name
    return value


def wait(driver: WebDriver, css: str, text: str | None = None, timeout: float = 15) -> None:
    """Until an element matching `css` shows (containing `text`, if given)."""

    def found(d: WebDriver) -> bool:
        for element in d.find_elements(By.CSS_SELECTOR, css):
            if text is None or text in element.text:
                return True
        return False

    # The page re-renders its tables as it polls: an element found a moment ago may be
    # gone when its text is read. That is "not yet", and the next poll looks again.
    WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(found, f"{css} {text or ''} did not show")


def settled(driver: WebDriver, read: Callable[[WebDriver], T], timeout: float = 15) -> T:
    """`read(driver)`, read again while the page re-renders under it: an element it
    found may be replaced (stale) before its attributes are read, on a busy machine."""
    waiting = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    return waiting.until(lambda d: (read(d),), "the page kept re-rendering")[0]


def test_dashboard_shows_active_orders_states_and_problems(
    sqlite_rig: Rig, browser: webdriver.Chrome
) -> None:
    """The front page lists active orders with their states, counts, offline couriers and
    dead letters, and follows new events by itself."""
    port = with_traffic(sqlite_rig, token=None)
    browser.get(f"http://127.0.0.1:{port}/")
    wait(browser, '#active-orders tr[data-order-id="o-geo"] td.state', "out for delivery")
    wait(browser, '#active-orders tr[data-order-id="o-app"] td.state', "confirmed")
    counts = {
        e.get_attribute("data-state"): e.find_element(By.CSS_SELECTOR, ".n").text
        for e in browser.find_elements(By.CSS_SELECTOR, "#orders-by-state [data-state]")
    }
    assert counts["dasher_out_for_delivery"] == "1" and counts["dasher_confirmed"] == "1"
    assert "c-app" in browser.find_element(By.ID, "couriers-offline").text
    assert "bad_json" in browser.find_element(By.ID, "dead-letters").text
    assert "pending pushes" in browser.find_element(By.ID, "outbox").text
    assert "accepted" in browser.find_element(By.ID, "auth").text
    pub = sqlite_rig.publisher()
    pub.status("c-app", "app-2", "o-app", "arrived_at_store")  # no reload: the page polls
    pub.close()
    wait(browser, '#active-orders tr[data-order-id="o-app"] td.state', "at store")
    errors = severe(browser)
    assert errors == []  # no script error, nothing the page's CSP had to block


def test_order_view_draws_transitions_pushes_and_track(
    sqlite_rig: Rig, browser: webdriver.Chrome
) -> None:
    """One order's view: each transition with its source, its pushes, and an SVG map of the
    courier's track with the pickup and dropoff circles and a marker per status."""
    port = with_traffic(sqlite_rig, token=None)
    browser.get(f"http://127.0.0.1:{port}/")
    wait(browser, '#active-orders a[href="#/orders/o-geo"]')
    browser.find_element(By.CSS_SELECTOR, '#active-orders a[href="#/orders/o-geo"]').click()
    wait(browser, '#transitions tr[data-status="dasher_out_for_delivery"]', "geofence")
    rows = browser.find_elements(By.CSS_SELECTOR, "#transitions tbody tr")
    assert [r.get_attribute("data-status") for r in rows] == [
        "dasher_confirmed",
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
    ]
    assert all("geofence" in r.text and "52.5" in r.text for r in rows[1:])  # and where
    wait(browser, '#pushes tr[data-status="dasher_out_for_delivery"]', "delivered")
    svg = browser.find_element(By.CSS_SELECTOR, "#track svg#track-svg")
    places = {
        (c.get_attribute("data-place"), c.get_attribute("data-kind")): float(attribute(c, "r"))
        for c in svg.find_elements(By.CSS_SELECTOR, "circle.place")
    }
    assert places == {
        ("pickup", "radius"): 60,
        ("pickup", "exit"): 120,
        ("dropoff", "radius"): 40,
        ("dropoff", "exit"): 80,
    }
    route = attribute(svg.find_element(By.CSS_SELECTOR, "polyline.route"), "points")
    assert len(route.split()) == 19
    markers = svg.find_elements(By.CSS_SELECTOR, "circle.status-marker")
    assert {m.get_attribute("data-status") for m in markers} >= {
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
    }
    assert browser.find_element(By.ID, "order-state").text == "out for delivery"


def test_health_shows_on_every_view(sqlite_rig: Rig, browser: webdriver.Chrome) -> None:
    """The health pill is filled on the order and stores views too, opened directly
    (not through the dashboard), and follows the daemon's health there: the broker
    stopped, the order view's pill turns unhealthy, saying why, without a reload."""
    port = with_traffic(sqlite_rig, token=TOKEN)  # /healthz needs no token: not even asked
    for view in ("#/orders/o-geo", "#/stores"):
        browser.get(f"http://127.0.0.1:{port}/{view}")
        browser.refresh()  # a fresh page on this view (only the # changed)
        wait(browser, "#health.ok", "healthy")
    browser.get(f"http://127.0.0.1:{port}/#/orders/o-geo")
    browser.refresh()
    wait(browser, "#health.ok", "healthy")
    sqlite_rig.broker.stop()
    wait(browser, "#health.bad", "unhealthy", timeout=30)
    assert "mqtt" in (browser.find_element(By.ID, "health").get_attribute("title") or "")
    errors = severe(browser)
    expected = (
        "/healthz - Failed to load resource: the server responded with a status of 503",
        "401 (Unauthorized)",
    )
    assert all(any(x in e for x in expected) for e in errors), errors  # no script error


def test_page_asks_for_the_token_once(sqlite_rig: Rig, browser: webdriver.Chrome) -> None:
    """With http.token set the page asks for it, says when it is wrong, then keeps it for
    the tab (sessionStorage) and sends it with every request."""
    port = with_traffic(sqlite_rig, token=TOKEN)
    browser.get(f"http://127.0.0.1:{port}/#/orders/o-geo")
    wait(browser, "#login:not([hidden])")
    field = browser.find_element(By.ID, "token-input")
    field.send_keys("not-the-token-at-all")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(browser, "#login-error", "refused")
    browser.find_element(By.ID, "token-input").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait(browser, "#track svg circle.status-marker")
    assert browser.execute_script("return sessionStorage.getItem('courierd.token')") == TOKEN
    browser.get(f"http://127.0.0.1:{port}/")  # the same tab: not asked again
    wait(browser, '#active-orders tr[data-order-id="o-geo"]')
    assert browser.find_element(By.ID, "login").get_attribute("hidden") is not None


def replay_rows(driver: WebDriver) -> dict[str, dict[str, str | None]]:
    """The what-if table: per status, its was and would-be cells and its change."""
    out: dict[str, dict[str, str | None]] = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#replay tbody tr"):
        cell = {c: row.find_element(By.CSS_SELECTOR, "td." + c) for c in ("was", "would-be")}
        out[row.get_attribute("data-status") or ""] = {
            "was": cell["was"].get_attribute("title"),
            "would_be": cell["would-be"].get_attribute("title"),
            "changed": row.get_attribute("data-changed"),
            "shift": row.get_attribute("data-shift"),
        }
    return out


def centre(element: Any) -> tuple[float, float]:
    """An SVG marker's centre (a circle's, or a rotated square's) in the map's metres."""
    if element.tag_name == "circle":
        return float(element.get_attribute("cx")), float(element.get_attribute("cy"))
    half = float(element.get_attribute("width")) / 2
    return float(element.get_attribute("x")) + half, float(element.get_attribute("y")) + half


def test_order_view_replays_with_a_geofence_override_from_the_url(
    sqlite_rig: Rig, browser: webdriver.Chrome
) -> None:
    """`?geofence.approach_m=300` in the page's address: o-geo (driven through the
    daemon) shows arriving_at_store would fire later and nearer the store than it did,
    drawn beside the live marker; the other statuses are unchanged. A value replay
    refuses is shown as its 400 message, from the page's own form."""
    port = with_traffic(sqlite_rig, token=None)
    browser.get(f"http://127.0.0.1:{port}/?geofence.approach_m=300#/orders/o-geo")
    wait(browser, '#replay tr[data-status="dasher_out_for_delivery"]')
    title = browser.find_element(By.CSS_SELECTOR, "#replay h2").get_attribute("textContent")
    assert "geofence.approach_m=300" in (title or "")
    rows = settled(browser, replay_rows)
    assert set(rows) == {"arriving_at_store", "arrived_at_store", "dasher_out_for_delivery"}
    arriving = rows.pop("arriving_at_store")
    assert arriving["changed"] == "true" and float(arriving["shift"] or 0) > 0
    assert (arriving["would_be"] or "") > (arriving["was"] or "~")  # later (RFC 3339 UTC)
    for status, row in rows.items():
        assert row["changed"] == "false" and row["was"] == row["would_be"], status
        assert row["was"]

    def markers(d: WebDriver) -> tuple[list[str | None], float, float, bool]:
        svg = d.find_element(By.ID, "track-svg")
        would = svg.find_elements(By.CSS_SELECTOR, "rect.would-be-marker")
        live = svg.find_element(By.CSS_SELECTOR, '.status-marker[data-status="arriving_at_store"]')
        pickup = svg.find_element(By.CSS_SELECTOR, 'circle.place.pickup[data-kind="radius"]')
        off_would = math.dist(centre(pickup), centre(would[0])) if would else math.inf
        return (
            [m.get_attribute("data-status") for m in would],
            math.dist(centre(pickup), centre(live)),
            off_would,
            bool(svg.find_elements(By.CSS_SELECTOR, "line.would-be-shift")),
        )

    would, off_live, off_would, shift_drawn = settled(browser, markers)
    assert would == ["arriving_at_store"]
    assert off_would < 300 < off_live  # metres from the store, on the drawing
    assert shift_drawn

    browser.find_element(By.ID, "override-value").send_keys("-5")
    browser.find_element(By.CSS_SELECTOR, "#override-form button").click()
    wait(browser, "#replay-error", "greater than 0")
    assert "geofence.approach_m=-5" in browser.execute_script("return location.hash")
    errors = severe(browser)
    assert all("400" in e for e in errors), errors  # the refused replay's request, nothing else


def test_store_view_shows_the_suggested_pickup_point(
    sqlite_rig: Rig, browser: webdriver.Chrome
) -> None:
    """Three deliveries through the daemon from store s-back, whose couriers wait 60 m
    east of its registered point: the store view shows the suggested point ~60 m from
    the registered one (within 25 m), with its three stays, drawn beside it."""
    store = sqlite_rig.store()
    try:
        store.registry.import_stores([("s-back", Place(*STORE, 100.0))], time.time())
    finally:
        store.close()
    port = sqlite_rig.daemon().start().http_port
    settings = Settings(
        store=StoreSettings(path=sqlite_rig.dir / "courierd.db"),
        onetablet=OneTabletSettings(base_url=sqlite_rig.onetablet.url, api_key=SecretStr(API_KEY)),
    )
    pub = sqlite_rig.publisher()
    wait_at = moved(STORE, 0, 60)
    for n in range(3):
        oid, courier = f"o-back-{n}", f"c-back-{n}"
        document = {"id": oid, "store": {"merchant_supplied_id": "s-back"}}
        orders.submit(settings, json.dumps(document).encode(), "the test")
        pub.publish("dispatch/assignments", {"order_id": oid, "courier_id": courier})
        pub.status(courier, f"{oid}-c", oid, "dasher_confirmed")
        for t, lat, lng in a_delivery(time.time() - 3600 + 600 * n, wait_at):
            fix = {"ts": iso(t), "lat": lat, "lng": lng, "accuracy_m": 5}
            pub.publish(f"couriers/{courier}/location", fix)
    pub.close()
    wait_until(
        lambda: all(
            len(delivered(sqlite_rig.onetablet).get(f"o-back-{n}", [])) == 4 for n in range(3)
        ),
        30,
        "the three deliveries out for delivery",
    )
    browser.get(f"http://127.0.0.1:{port}/")
    browser.find_element(By.ID, "stores-link").click()
    wait(browser, '#stores tr[data-store-id="s-back"]')
    row = browser.find_element(By.CSS_SELECTOR, '#stores tr[data-store-id="s-back"]')
    moved_m = float(attribute(row.find_element(By.CSS_SELECTOR, "td.moved"), "data-moved-m"))
    assert 35 <= moved_m <= 85, moved_m
    assert row.find_element(By.CSS_SELECTOR, "td.visits").text == "3"
    registered = row.find_element(By.CSS_SELECTOR, "td.registered").text
    assert registered.startswith(f"{STORE[0]:.6f}, {STORE[1]:.6f}")
    points = settled(
        browser,
        lambda d: {
            c.get_attribute("data-point"): centre(c)
            for c in d.find_elements(By.CSS_SELECTOR, "#store-s-back svg circle[data-point]")
        },
    )
    off = math.dist(points["suggested"], (points["registered"][0] + 60, points["registered"][1]))
    assert off < 25, points  # 60 m east of the registered point, on the drawing
    errors = severe(browser)
    assert errors == []
