"""Real processes for integration tests: Mosquitto on a free port, the daemon, a publisher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from courierd.devtools.localbroker import LocalBroker, free_port

__all__ = ["Broker", "Daemon", "Publisher", "free_port", "stop_all", "wait_until"]

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


class Broker(LocalBroker):
    """The test broker: a LocalBroker with persistence, restartable on the same port."""

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

    def start(self, wait_ready: bool = True) -> Daemon:
        out = self.log.open("ab")
        if self not in _STARTED:
            _STARTED.append(self)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "courierd", "run"],
            env=self.env,
            cwd=self.dir,
            stdout=out,
            stderr=out,
        )
        if wait_ready:
            wait_until(lambda: self.health()[0] == 200, 20, "daemon health to turn ok")
        return self

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthz", timeout=2
            ) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=2) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """The value of one sample line (name with labels), 0 if absent."""
        for line in self.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class Publisher:
    """A courier-side MQTT client publishing QoS 1 and waiting for each PUBACK."""

    def __init__(self, port: int, client_id: str = "test-publisher") -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
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
