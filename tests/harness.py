"""Real processes for integration tests: Mosquitto on a free port, the daemon, a publisher."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker, free_port
from courierd.devtools.sandbox import Request, Sandbox
from courierd.store import Store, open_store

API_KEY = "test-key-5f2c"

__all__ = [
    "API_KEY",
    "Broker",
    "Daemon",
    "Publisher",
    "Rig",
    "all_dropped_off",
    "delivered",
    "free_port",
    "open_path",
    "start_together",
    "statuses",
    "stop_all",
    "stop_together",
    "wait_until",
]

# Every broker and daemon a test starts, so that the test's teardown ends them even when
# the test failed half way (tests/conftest.py; a process left over fails the suite).
_STARTED: list[Broker | Daemon] = []


def stop_all() -> None:
    """Stop every daemon (SIGTERM, then SIGKILL) and broker the current test started."""
    while _STARTED:
        proc = _STARTED.pop()
        try:
            if isinstance(proc, Daemon):
                if proc.proc is not None and proc.proc.poll() is None:
                    try:
                        proc.stop(timeout=40)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            else:
                proc.stop()
        except Exception:  # the guard in conftest kills whatever is still there
            pass


def wait_until(condition: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `condition` until truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def tmpfs(mount: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of our own at `mount`, so a disk can really fill up (root only: the
    test is skipped without, which CI allows by this reason, tests/conftest.py)."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def port_outside_the_ephemeral_range() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 up on Linux).

    A broker the test stops and starts again must get its port back. A port from the
    ephemeral range can be taken meanwhile: by anything binding port 0 (other tests on a
    busy CI box), or by courierd's own reconnect, whose outgoing socket may get that very
    port and connect to itself. Below the range, only another random pick can collide.
    """
    low, _ = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class Broker(LocalBroker):
    """The test broker: a LocalBroker with persistence, restartable on the same port."""

    def __init__(self, workdir: Path, **options: Any) -> None:
        super().__init__(workdir, **options)
        port = port_outside_the_ephemeral_range()
        old, new = (f"listener {p} 127.0.0.1\n" for p in (self.port, port))
        self.conf.write_text(self.conf.read_text().replace(old, new))
        self.port = port

    def start(self, timeout: float = 10.0) -> Broker:
        if self not in _STARTED:
            _STARTED.append(self)
        super().start(timeout)
        return self


class Daemon:
    """`courierd run` as a subprocess, configured through the environment."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.dir = workdir
        self.http_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")},
            "COURIERD_HTTP__LISTEN": f"127.0.0.1:{self.http_port}",
            "COURIERD_STORE__PATH": str(workdir / "courierd.db"),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "daemon.log"
        self._log_from = 0  # where this run's lines begin (the log is shared by restarts)

    def start(self, wait_ready: bool = True) -> Daemon:
        if self not in _STARTED:
            _STARTED.append(self)
        with self.log.open("ab") as out:  # the daemon has its own copy
            self._log_from = out.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "courierd", "run"],
                env=self.env,
                cwd=self.dir,
                stdout=out,
                stderr=out,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        wait_until(lambda: self.health()[0] == 200, timeout, "daemon health to turn ok")

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=2
            ) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            with e:  # the reply it holds, closed
                return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as r:
            body: bytes = r.read()
            return body.decode()

    def metric(self, name: str) -> float:
        """The value of one sample line (name with labels), 0 if absent."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def metric_total(self, name: str) -> float:
        """The sum of a metric's samples over all its labels, 0 if absent."""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics().splitlines()
            if line.startswith(name + "{")
        )

    def send(self, sig: int = signal.SIGTERM) -> None:
        """`sig` to the daemon, if it still runs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.send(sig)
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def workers(self, timeout: float = 20) -> dict[str, int]:
        """{"ingest": pid, "dispatch": pid} of this run's workers, from its own ready line.
        Waits for that line: /healthz answers before the daemon logs it, and the log also
        holds earlier runs' lines, whose pids are gone."""

        def ready_line() -> str | None:
            with self.log.open("rb") as f:
                f.seek(self._log_from)
                lines = f.read().decode(errors="replace").splitlines()
            return next((ln for ln in lines if "daemon.ready" in ln), None)

        line = wait_until(ready_line, timeout, "this run's daemon.ready line")
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        return {"ingest": int(fields["ingest_pid"]), "dispatch": int(fields["dispatch_pid"])}


def start_together(*daemons: Daemon) -> tuple[Daemon, ...]:
    """Start daemons at once, then wait until each is ready: several starts (each a few
    processes importing courierd) in about the time of one, or of all of them on a busy
    machine with fewer cores: one start's 20 s per daemon, shared by the waits."""
    for d in daemons:
        d.start(wait_ready=False)
    deadline = time.monotonic() + 20 * len(daemons)
    for d in daemons:
        d.wait_ready(max(0.0, deadline - time.monotonic()))
    return daemons


def stop_together(*daemons: Daemon, timeout: float = 30) -> list[int]:
    """SIGTERM to every daemon at once, then each one's exit code."""
    for d in daemons:
        d.send(signal.SIGTERM)
    return [d.proc.wait(timeout) for d in daemons if d.proc is not None]


class Publisher:
    """A courier-side MQTT client publishing QoS 1 and waiting for each PUBACK."""

    def __init__(
        self,
        port: int,
        client_id: str = "test-publisher",
        protocol: MQTTProtocolVersion = paho.MQTTv5,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(
        self, topic: str, payload: bytes | str | dict[str, Any], retain: bool = False
    ) -> None:
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=1, retain=retain)
        info.wait_for_publish(10)

    def status(self, courier: str, event_id: str, order: str, status: str, **extra: Any) -> None:
        self.publish(
            f"couriers/{courier}/status",
            {"event_id": event_id, "order_id": order, "status": status, **extra},
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def open_path(path: Path) -> Store:
    """A store on the SQLite file at `path` (created and migrated if new)."""
    return open_store(StoreSettings(path=path))


@dataclass
class Rig:
    """A broker, a OneTablet stand-in and a store (SQLite file, or a PostgreSQL URL) for
    daemons to run against."""

    broker: Broker
    onetablet: Sandbox
    dir: Path
    pg_url: str | None = None

    @property
    def backend(self) -> str:
        return "sqlite" if self.pg_url is None else "postgres"

    @property
    def store_env(self) -> dict[str, str]:
        """The environment that points courierd (daemon or command) at this store."""
        if self.pg_url is not None:
            # Short leases: a killed instance's successor takes its sessions back sooner
            # (test_cluster sets its own).
            return {"COURIERD_STORE__URL": self.pg_url, "COURIERD_CLUSTER__LEASE_S": "5"}
        return {"COURIERD_STORE__PATH": str(self.dir / "courierd.db")}

    def daemon(self, **env: str) -> Daemon:
        return Daemon(
            self.dir,
            {
                "COURIERD_MQTT__URL": self.broker.url,
                "COURIERD_MQTT__CLIENT_ID": "courierd-test",
                "COURIERD_ONETABLET__BASE_URL": self.onetablet.url,
                "COURIERD_ONETABLET__API_KEY": API_KEY,
                "COURIERD_ONETABLET__RETRY_SCHEDULE_S": "[0.1, 0.2, 0.4]",
                **self.store_env,
                **env,
            },
        )

    def publisher(self, name: str = "courier-app") -> Publisher:
        return Publisher(self.broker.port, name)

    def store(self) -> Store:
        if self.pg_url is not None:
            return open_store(StoreSettings(url=self.pg_url), instance="test")
        return open_path(self.dir / "courierd.db")


def delivered(onetablet: Sandbox) -> dict[str, list[Request]]:
    """2xx delivery-status requests per order, in the order OneTablet received them."""
    out: dict[str, list[Request]] = {}
    for r in onetablet.requests():
        if r.status == 200 and r.path.endswith("/delivery-status"):
            out.setdefault(r.order_id or "", []).append(r)
    return out


def statuses(requests: list[Request]) -> list[str]:
    return [r.json["delivery_status"] for r in requests]


def all_dropped_off(onetablet: Sandbox, orders: list[str]) -> bool:
    got = delivered(onetablet)
    return all(o in got and statuses(got[o])[-1:] == ["dropoff"] for o in orders)
