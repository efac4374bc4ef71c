"""`courierd sandbox`, `courierd simulate` and `courierd demo`: try courierd with nothing else.

The demo starts the OneTablet sandbox, uses the local Mosquitto (or starts one when
none answers and the `mosquitto` binary is installed), runs the daemon with its
database in ./var, and a simulator feeding it, until Ctrl-C. Its couriers are of both
kinds: half send every status from their app, half are given their places by dispatch
and send GPS fixes (courierd's geofence infers the statuses in between), with a little
of every kind of noise.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from courierd.config import Settings
from courierd.devtools.localbroker import LocalBroker, mosquitto_binary, port_open
from courierd.devtools.sandbox import Faults, Sandbox
from courierd.devtools.simulate import Noise, Simulation, mqtt_publisher, progress_line
from courierd.errors import ConfigError

log = logging.getLogger(__name__)

SANDBOX_PORT = 8765
SANDBOX_KEY = "sandbox-key"


def run_sandbox(host: str, port: int, api_key: str, faults: Faults) -> int:
    """Serve the sandbox in the foreground until Ctrl-C or SIGTERM."""
    # The handlers before it listens: a Ctrl-C as soon as it answers is a clean stop, not
    # a KeyboardInterrupt (exit 130) in the moment before they would be in place.
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        sandbox = Sandbox(host, port, api_key, faults).start()
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    print(
        f"OneTablet sandbox on {sandbox.url} (x-api-key: {api_key}); request log at {sandbox.url}/",
        file=sys.stderr,
    )
    while not stop.wait(0.5):
        pass
    sandbox.stop()
    return 0


# The demo's couriers: both kinds, a little of every noise (a phone that drops out now
# and then; per message, and telemetry couriers send a fix every few seconds).
DEMO_NOISE = Noise(duplicates=0.05, reorder=0.05, offline=0.002, junk=0.01, glitches=0.02)


def run_simulate(host: str, port: int, args: Any) -> int:
    """Publish as `args.couriers` couriers until done, `args.duration`, or Ctrl-C.

    On stderr a progress line; at the end, on stdout, one JSON object: the mode, how many
    couriers of each kind ran, the orders done and the messages sent by kind
    (`assignment`, `location`, `status`, `profile`, and the noise: `duplicate`, `junk`...).
    """
    if not port_open(host, port):
        raise ConfigError(f"no MQTT broker answers at {host}:{port} (set --mqtt-url)")
    client, publish = mqtt_publisher(host, port, f"courierd-sim-{int(time.time())}")
    noise = Noise(args.duplicates, args.reorder, args.offline, args.junk, args.glitches)
    sim = Simulation(
        publish,
        couriers=args.couriers,
        speed=args.speed,
        orders=args.orders,
        noise=noise,
        seed=args.seed,
        mode=args.mode,
        on_progress=progress_line,
    )
    stop = threading.Event()
    _stop_on_signals(stop)
    if args.duration:
        threading.Timer(args.duration, stop.set).start()
    sent = sim.run(stop)
    client.loop_stop()
    client.disconnect()
    sys.stderr.write("\n")
    summary = {
        "mode": sim.mode,
        "couriers": sim.kinds(),
        "orders_done": sim.orders_done,
        "sent": dict(sorted(sent.items())),
    }
    print(json.dumps(summary))
    return 0


def run_demo(settings: Settings) -> int:
    """Sandbox + broker + daemon + simulator, wired together, until Ctrl-C."""
    from courierd.daemon.supervisor import run_daemon

    port = SANDBOX_PORT if not port_open("127.0.0.1", SANDBOX_PORT) else 0
    sandbox = Sandbox("127.0.0.1", port, SANDBOX_KEY).start()
    broker = _broker(settings)
    mqtt_url = broker[0]
    demo_settings = settings.model_copy(
        update={
            "mqtt": settings.mqtt.model_copy(
                update={"url": mqtt_url, "client_id": "courierd-demo"}
            ),
            "onetablet": settings.onetablet.model_copy(
                update={"base_url": sandbox.url, "api_key": _secret(SANDBOX_KEY)}
            ),
        }
    )
    host, port_ = demo_settings.mqtt.host, demo_settings.mqtt.port
    stop = threading.Event()
    client, publish = mqtt_publisher(host, port_, "courierd-demo-couriers")
    sim = Simulation(publish, couriers=8, speed=60, mode="mixed", noise=DEMO_NOISE)
    kinds = sim.kinds()
    print(
        f"courierd demo\n  MQTT broker   {mqtt_url}\n  OneTablet     {sandbox.url} "
        f"(request log: {sandbox.url}/)\n  database      {settings.store.path}\n"
        f"  operator page http://{settings.http.listen}/  (API: /v1/..., /openapi.json)\n"
        f"  health        http://{settings.http.listen}/healthz\n"
        f"  couriers      {kinds['status']} send every status from their app; "
        f"{kinds['telemetry']} send GPS fixes only\n"
        "                (dispatch gives them the store and the customer; courierd's geofence\n"
        "                infers arriving, arrived and out for delivery)\n"
        "Transitions appear below as couriers move; the request log labels each status\n"
        "with its source (app, geofence or fill). Ctrl-C stops.\n",
        file=sys.stderr,
    )
    simulator = threading.Thread(target=sim.run, args=(stop,), daemon=True, name="simulator")
    try:
        # Couriers start once the daemon is subscribed: a first run has no session yet.
        return run_daemon(demo_settings, on_subscribed=simulator.start)
    finally:
        stop.set()
        client.loop_stop()
        sandbox.stop()
        if broker[1] is not None:
            broker[1].stop()


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _broker(settings: Settings) -> tuple[str, LocalBroker | None]:
    """The configured broker if it answers, else a Mosquitto of our own in ./var."""
    if port_open(settings.mqtt.host, settings.mqtt.port):
        return settings.mqtt.url, None
    if mosquitto_binary() is None:
        raise ConfigError(
            f"no MQTT broker answers at {settings.mqtt.url} and mosquitto is not installed "
            "(apt-get install mosquitto, or set COURIERD_MQTT__URL)"
        )
    broker = LocalBroker(Path("var/mosquitto")).start()
    return broker.url, broker


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set `stop`, from a thread of their own: set in the handler, the
    Event would take its lock, which the main thread may hold inside `stop.wait` when
    the signal lands, and wait on itself for good (courierd run's supervisor likewise)."""

    def handler(_signum: int, _frame: object) -> None:
        threading.Thread(target=stop.set, name="signal", daemon=True).start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
