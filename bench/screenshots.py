"""Screenshots of the operator page for the README: docs/operator-page.png (the front
view), docs/order-track.png (one order's view with its track), docs/order-replay.png
(the same order replayed with `?geofence.approach_m=300`) and docs/store-suggestions.png
(the stores' learned pickup points beside the registered ones).

Starts its own Mosquitto, the OneTablet sandbox and `courierd run` in a temporary
directory, plays a scripted afternoon (couriers at every stage of a delivery, GPS fixes
with a little noise, a courier whose app dropped, a submitted and a cancelled order,
some junk), then captures the page with Debian's headless Chromium through Selenium.

Usage: scripts/screenshots [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from courierd.config import OneTabletSettings, Settings, StoreSettings
from courierd.devtools.localbroker import LocalBroker, free_port
from courierd.devtools.sandbox import Sandbox
from courierd.domain.model import Place, iso
from courierd.services import orders
from courierd.store import open_store

KEY = "screenshots-key"
CENTRE = (52.5200, 13.4050)
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
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
Point = tuple[float, float]


def moved(point: Point, north_m: float, east_m: float) -> Point:
    lat, lng = point
    return lat + north_m / 111_320, lng + east_m / (111_320 * math.cos(math.radians(lat)))


def legs(*corners: tuple[float, float], step_m: float = 170) -> list[tuple[float, float]]:
    """Offsets (north, east) in metres along straight legs between corners: streets."""
    out: list[tuple[float, float]] = []
    for (n0, e0), (n1, e1) in itertools.pairwise(corners):
        steps = max(1, round(math.hypot(n1 - n0, e1 - e0) / step_m))
        out += [(n0 + (n1 - n0) * i / steps, e0 + (e1 - e0) * i / steps) for i in range(steps)]
    return [*out, corners[-1]]


class Courier:
    """One courier's fixes along a delivery: approach, wait at the store, ride, door."""

    def __init__(self, name: str, pickup: Point, dropoff: Point, seed: int) -> None:
        self.name, self.pickup, self.dropoff = name, pickup, dropoff
        rng = random.Random(seed)
        to_store = legs((-1400, -900), (-1400, -200), (-350, -200), (-350, 0), (-20, 0))
        wait = [(rng.uniform(-12, 12), rng.uniform(-12, 12)) for _ in range(6)]
        dn = (dropoff[0] - pickup[0]) * 111_320
        de = (dropoff[1] - pickup[1]) * 111_320 * math.cos(math.radians(pickup[0]))
        ride = legs((60, 0), (60, de * 0.55), (dn * 0.7, de * 0.55), (dn * 0.7, de), (dn, de))
        door = [(dn + rng.uniform(-8, 8), de + rng.uniform(-8, 8)) for _ in range(5)]
        self.stages = {"approach": to_store, "wait": wait, "ride": ride, "door": door}
        self.rng = rng

    def fixes(self, until: str, end: float) -> list[dict[str, Any]]:
        """Fixes 20 s apart, up to and including stage `until`, the last one at `end`."""
        path: list[tuple[float, float]] = []
        for stage, offsets in self.stages.items():
            path += offsets
            if stage == until:
                break
        out = []
        for i, (n, e) in enumerate(path):
            lat, lng = moved(self.pickup, n + self.rng.gauss(0, 3), e + self.rng.gauss(0, 3))
            ts = end - 20 * (len(path) - 1 - i)
            fix = {"ts": iso(ts), "lat": lat, "lng": lng, "accuracy_m": 6, "speed_mps": 8.5}
            out.append(fix)
        return out


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="screenshots", protocol=paho.MQTTv5
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def afternoon(pub: Publisher, settings: Settings) -> None:
    """Orders at every stage; the one for the track picture is o-1000, delivered."""
    now = time.time()
    stores = {
        "o-1000": moved(CENTRE, 0, 0),
        "o-1001": moved(CENTRE, 900, 1800),
        "o-1002": moved(CENTRE, -1500, 2600),
        "o-1003": moved(CENTRE, 2200, -1700),
    }
    stages = {"o-1000": "door", "o-1001": "ride", "o-1002": "wait", "o-1003": "approach"}
    for i, (order_id, pickup) in enumerate(stores.items()):
        name = f"c-{['fay', 'anna', 'ben', 'carla'][i]}"
        dropoff = moved(pickup, 1300 - 400 * i, 1500 + 200 * i)
        courier = Courier(name, pickup, dropoff, seed=i)
        pub.send(
            "dispatch/assignments",
            {
                "order_id": order_id,
                "courier_id": name,
                "pickup": {"lat": pickup[0], "lng": pickup[1], "radius_m": 70},
                "dropoff": {"lat": dropoff[0], "lng": dropoff[1], "radius_m": 40},
            },
        )
        fixes = courier.fixes(stages[order_id], now - 30 - 40 * i)
        start = fixes[0]["ts"]
        profile = {"full_name": name[2:].title(), "vehicle": {"make": "Vespa"}}
        pub.send(f"couriers/{name}/profile", profile)
        event = {"event_id": f"{order_id}-c", "order_id": order_id, "status": "dasher_confirmed"}
        pub.send(f"couriers/{name}/status", {**event, "ts": start})
        for fix in fixes:
            pub.send(f"couriers/{name}/location", fix)
    for order_id, name, status in [
        ("o-1004", "c-dev", "dasher_confirmed"),
        ("o-1005", "c-emil", "arrived_at_store"),
        ("o-0998", "c-gus", "dasher_confirmed"),
    ]:
        event = {"event_id": f"{order_id}-s", "order_id": order_id, "status": status}
        pub.send(f"couriers/{name}/status", event)
    pub.send("couriers/c-emil/lwt", b"connection lost")  # offline with o-1005
    pub.send("couriers/c-hal/status", b'{"event_id": "x1", "order_id": "o-9", "status": ')
    pub.send(
        "couriers/c-hal/status",
        {"event_id": "x2", "order_id": "o-9", "status": "teleported"},
    )
    pub.send("couriers/c-hal/location", {"ts": iso(now), "lat": 91.5, "lng": 13.4})
    document = {
        "id": "o-1006",
        "store": {"merchant_supplied_id": "store-7"},
        "delivery_address": {"street": "Torstr. 1", "lat": "52.5290", "lng": "13.4010"},
    }
    orders.submit(settings, json.dumps(document).encode(), "screenshots")
    orders.cancel(settings, "o-0998", "KITCHEN_BUSY", "oven broke down")


# Registered stores, and where their couriers actually wait (metres north, east of the
# registered point): one whose pickup shelf is round the corner, one the registry has right.
STORES = {
    "store-3": (moved(CENTRE, -600, -2200), (10, 60)),
    "store-5": (moved(CENTRE, 1700, 700), (-6, 4)),
}
STAYS = 4


def register_stores(settings: Settings) -> None:
    store = open_store(settings.store)
    try:
        store.registry.import_stores(
            [(sid, Place(*point, 100.0)) for sid, (point, _) in STORES.items()], time.time()
        )
    finally:
        store.close()


def store_deliveries(pub: Publisher, settings: Settings) -> list[str]:
    """Orders of the registered stores (their pickup from the registry), delivered
    earlier today, each courier waiting where that store's couriers do."""
    now, done = time.time(), []
    for s, (sid, (point, (north, east))) in enumerate(STORES.items()):
        for n in range(STAYS):
            order_id, name = f"o-{sid}-{n}", f"c-{sid}-{n}"
            dropoff = moved(point, 900 + 150 * n, 1100 - 300 * n)
            courier = Courier(name, moved(point, north, east), dropoff, seed=100 + 10 * s + n)
            document = {
                "id": order_id,
                "store": {"merchant_supplied_id": sid},
                "delivery_address": {"lat": f"{dropoff[0]:.6f}", "lng": f"{dropoff[1]:.6f}"},
            }
            orders.submit(settings, json.dumps(document).encode(), "screenshots")
            pub.send("dispatch/assignments", {"order_id": order_id, "courier_id": name})
            fixes = courier.fixes("door", now - 5400 + 900 * n + 300 * s)
            event = {
                "event_id": f"{order_id}-c",
                "order_id": order_id,
                "status": "dasher_confirmed",
            }
            pub.send(f"couriers/{name}/status", {**event, "ts": fixes[0]["ts"]})
            for fix in fixes:
                pub.send(f"couriers/{name}/location", fix)
            done.append(order_id)
    return done


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def wait_for(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        time.sleep(0.1)


def browser(profile: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(
        service=Service("/usr/bin/chromedriver", log_output=os.devnull), options=options
    )


def capture(driver: WebDriver, path: Path, width: int = 1280) -> None:
    """The whole page, as tall as its content."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    path.write_bytes(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"screenshots: wrote {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SE_OFFLINE", "true")
    with tempfile.TemporaryDirectory(prefix="courierd-screenshots-") as tmp:
        work = Path(tmp)
        broker = LocalBroker(work / "broker", persistence=False).start()
        sandbox = Sandbox("127.0.0.1", 0, KEY).start()
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")},
            "COURIERD_MQTT__URL": broker.url,
            "COURIERD_ONETABLET__BASE_URL": sandbox.url,
            "COURIERD_ONETABLET__API_KEY": KEY,
            "COURIERD_STORE__PATH": str(work / "courierd.db"),
            "COURIERD_HTTP__LISTEN": f"127.0.0.1:{port}",
            "COURIERD_GEOFENCE__AUTO_DROPOFF": "true",
        }
        log = (work / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "courierd", "run"], env=env, stdout=log, stderr=log, cwd=work
        )
        base = f"http://127.0.0.1:{port}"
        driver = None
        try:
            wait_for("the daemon", lambda: _ok(base + "/healthz"))
            settings = Settings(
                store=StoreSettings(path=work / "courierd.db"),
                onetablet=OneTabletSettings(base_url=sandbox.url, api_key=SecretStr(KEY)),
            )
            register_stores(settings)
            pub = Publisher(broker.port)
            earlier = store_deliveries(pub, settings)
            afternoon(pub, settings)
            pub.close()
            wait_for(
                "the stores' deliveries to be dropped off",
                lambda: all(get(f"{base}/v1/orders/{o}")["state"] == "dropoff" for o in earlier),
            )
            wait_for(
                "o-1000 to be dropped off",
                lambda: get(base + "/v1/orders/o-1000")["state"] == "dropoff",
            )
            wait_for(
                "the pushes to go out",
                lambda: (
                    get(base + "/v1/dashboard")["outbox"]["pending"] == 0
                    and get(base + "/v1/dashboard")["couriers_offline"]
                ),
            )
            driver = browser(work / "chromium")
            driver.get(base + "/")
            WebDriverWait(driver, 15).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#active-orders [data-order-id]")
            )
            capture(driver, args.out / "operator-page.png")
            driver.get(base + "/#/orders/o-1000")
            WebDriverWait(driver, 15).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#track-svg circle.status-marker")
            )
            capture(driver, args.out / "order-track.png")
            driver.get(base + "/?geofence.approach_m=300#/orders/o-1000")
            WebDriverWait(driver, 15).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#track-svg .would-be-marker")
            )
            capture(driver, args.out / "order-replay.png")
            driver.get(base + "/#/stores")
            WebDriverWait(driver, 30).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#stores tr[data-store-id]")
            )
            capture(driver, args.out / "store-suggestions.png")
        finally:
            if driver is not None:
                driver.quit()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(40)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
            sandbox.stop()
            broker.stop()
    return 0


def _ok(url: str) -> bool:
    try:
        return bool(get(url)["status"] == "ok")
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
