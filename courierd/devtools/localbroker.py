"""A Mosquitto process of our own on a free loopback port: for the demo, tests and bench.

Configured like production where it matters for courierd (persistence with a 1 s
autosave, a large queue for offline sessions, an in-flight window above the batch size).
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path

from courierd.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class LocalBroker:
    """`start()` a Mosquitto in `workdir`; `stop()` it; the port survives restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = True,
        listener_options: str = "",
        anonymous: bool = True,
    ) -> None:
        exe = mosquitto_binary()
        if exe is None:
            raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
        self.exe = exe
        self.dir = workdir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{listener_options}"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            # Started as root, Mosquitto drops to user "mosquitto", which cannot write
            # its persistence file here: stay the user we are.
            f"user {getpass.getuser()}\n"
            f"persistence {'true' if persistence else 'false'}\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 2000000\n"
            "max_inflight_messages 2000\n"
            "persistent_client_expiration 1d\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> LocalBroker:
        with (self.dir / "mosquitto.log").open("ab") as log:  # the child has its own copy
            self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        try:
            while not port_open("127.0.0.1", self.port):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise ConfigError(f"mosquitto did not start (see {self.dir}/mosquitto.log)")
                time.sleep(0.02)
        except BaseException:  # timed out, or interrupted (Ctrl-C, SIGTERM): not left running
            self.kill()
            raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: whatever the last autosave did not write is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
