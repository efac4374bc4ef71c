"""A second broker: courierd over NATS's MQTT server (nats-server, MQTT 3.1.1 only, its
sessions kept in JetStream), with exact delivery through a kill -9 and while down."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from courierd.devtools.localbroker import port_open
from courierd.devtools.sandbox import Sandbox
from courierd.domain.lifecycle import CHAIN
from tests.harness import (
    Publisher,
    Rig,
    all_dropped_off,
    delivered,
    free_port,
    statuses,
    wait_until,
)

STATUSES = [s.value for s in CHAIN]
pytestmark = pytest.mark.integration


class NatsBroker:
    """`nats-server` of our own on free loopback ports (never the machine's 4222), with
    JetStream (the MQTT listener needs it, and a server_name) and MQTT enabled."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.exe = exe
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # MQTT
        self.conf = self.dir / "nats.conf"
        self.conf.write_text(
            "server_name: courierd-test\n"
            f"listen: 127.0.0.1:{free_port()}\n"
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            f"mqtt {{ listen: 127.0.0.1:{self.port} }}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> NatsBroker:
        with (self.dir / "nats.log").open("ab") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_until(lambda: port_open("127.0.0.1", self.port), 20, "nats-server's MQTT listener")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def nats_rig(tmp_path: Path, onetablet: Sandbox) -> Iterator[Rig]:
    """A NATS broker, OneTablet stand-in and SQLite store (one instance: NATS has no
    shared subscriptions, which a PostgreSQL cluster reads through)."""
    if not (shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists()):
        pytest.skip("nats-server not installed (apt-get install nats-server)")
    broker = NatsBroker(tmp_path / "nats").start()
    try:
        yield Rig(broker, onetablet, tmp_path)  # type: ignore[arg-type]
    finally:
        from tests.harness import stop_all

        stop_all()  # the daemons, before their broker
        broker.stop()


def test_exact_delivery_through_a_kill_9_over_nats(nats_rig: Rig) -> None:
    """Over NATS's MQTT (3.1.1): every status arrives once and in order, through a
    SIGKILL mid-stream and with statuses published while courierd was down."""
    rig = nats_rig
    rig.onetablet.faults.latency_ms = 3  # keep pushes in flight when the kill lands
    v311 = {"COURIERD_MQTT__PROTOCOL": "3.1.1"}
    daemon = rig.daemon(**v311).start()
    pub = Publisher(rig.broker.port, "courier-app", protocol=paho.MQTTv311)
    orders = [f"n{i}" for i in range(20)]
    for step in (0, 1):
        for o in orders:
            pub.status("c1", f"{o}-{step}", o, STATUSES[step])
    wait_until(
        lambda: all(len(delivered(rig.onetablet).get(o, [])) >= 2 for o in orders),
        30,
        "the first two statuses of every order",
    )
    done = threading.Event()

    def publish_step_2() -> None:
        for o in orders:
            pub.status("c1", f"{o}-2", o, STATUSES[2])
        done.set()

    threading.Thread(target=publish_step_2, daemon=True).start()
    pushed = len(rig.onetablet.requests())
    wait_until(lambda: len(rig.onetablet.requests()) >= pushed + 5, 30, "some pushes")
    daemon.kill()  # mid-stream: NATS keeps the session's unacknowledged messages
    assert done.wait(30)
    for step in range(3, len(STATUSES)):  # published while courierd is down
        for o in orders:
            pub.status("c1", f"{o}-{step}", o, STATUSES[step])
    daemon = rig.daemon(**v311).start()
    assert rig.onetablet.wait_for(lambda _: all_dropped_off(rig.onetablet, orders), 60)
    keys: dict[tuple[str, str], str] = {}
    for order in orders:
        reqs = delivered(rig.onetablet)[order]
        seq = statuses(reqs)
        deduped = [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]
        assert deduped == STATUSES, (order, seq)  # nothing lost, nothing reordered
        for r in reqs:  # a push in flight at the kill may go twice: with the same key
            key = (order, r.json["delivery_status"])
            assert (
                keys.setdefault(key, r.headers["idempotency-key"]) == r.headers["idempotency-key"]
            )
    pub.close()
    assert daemon.stop() == 0
