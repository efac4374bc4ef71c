"""The operator page in a real browser (Debian's headless Chromium, driven by Selenium)
against a running daemon with traffic: the dashboard, live updates, one order's view
with its SVG track, and the token prompt."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Rig
from tests.test_api import TOKEN, with_traffic

pytestmark = pytest.mark.integration
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
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
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


def test_dashboard_shows_active_orders_states_and_problems(
    sqlite_rig: Rig, browser: WebDriver
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
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []  # no script error, nothing the page's CSP had to block


def test_order_view_draws_transitions_pushes_and_track(sqlite_rig: Rig, browser: WebDriver) -> None:
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
        (c.get_attribute("data-place"), c.get_attribute("data-kind")): float(c.get_attribute("r"))
        for c in svg.find_elements(By.CSS_SELECTOR, "circle.place")
    }
    assert places == {
        ("pickup", "radius"): 60,
        ("pickup", "exit"): 120,
        ("dropoff", "radius"): 40,
        ("dropoff", "exit"): 80,
    }
    route = svg.find_element(By.CSS_SELECTOR, "polyline.route").get_attribute("points")
    assert len(route.split()) == 19
    markers = svg.find_elements(By.CSS_SELECTOR, "circle.status-marker")
    assert {m.get_attribute("data-status") for m in markers} >= {
        "arriving_at_store",
        "arrived_at_store",
        "dasher_out_for_delivery",
    }
    assert browser.find_element(By.ID, "order-state").text == "out for delivery"


def test_page_asks_for_the_token_once(sqlite_rig: Rig, browser: WebDriver) -> None:
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
