"""The systemd unit (verify, security score) and sd_notify over a real AF_UNIX socket."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from courierd.config import load_settings
from courierd.devtools.sandbox import Sandbox
from courierd.edges import systemd
from tests.conftest import API_KEY
from tests.harness import Broker, Daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "courierd.service"
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def local_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's courierd (verify checks it)."""
    exe = Path(sys.executable).parent / "courierd"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", UNIT.read_text(), flags=re.M)
    unit = tmp_path / "courierd.service"
    unit.write_text(text)
    return unit


@needs_systemd
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without warnings."""
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit(tmp_path))], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "courierd.service" not in proc.stderr, proc.stderr


@needs_systemd
def test_unit_security_exposure_at_most_1_5(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` scores the unit 1.5 or lower."""
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for courierd.service: ([\d.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 1.5


def test_unit_contract() -> None:
    """The unit is Type=notify with a watchdog, restarts on failure but not on exit 2."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StateDirectory=courierd",
        "EnvironmentFile=-/etc/courierd/courierd.env",
        "--config /etc/courierd/courierd.toml",
        "WatchdogSec=",
    ):
        assert line in text


def test_stop_deadline_fits_inside_the_units_stop_timeout() -> None:
    """The daemon's own stop deadline ends before systemd's TimeoutStopSec kills it."""
    match = re.search(r"^TimeoutStopSec=(\d+)$", UNIT.read_text(), flags=re.M)
    assert match, "TimeoutStopSec missing"
    assert load_settings().daemon.stop_timeout_s + 5 <= int(match.group(1))


def test_shipped_config_file_is_valid_and_states_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """config/courierd.toml parses and every value in it is the built-in default."""
    for key in [k for k in os.environ if k.startswith("COURIERD_")]:
        monkeypatch.delenv(key)
    assert load_settings(ROOT / "config" / "courierd.toml") == load_settings()


def test_notify_sends_datagrams_to_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify() writes to $NOTIFY_SOCKET, and is a no-op without it."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1\nSTATUS=hi") is True
        assert sock.recv(100) == b"READY=1\nSTATUS=hi"


def test_daemon_notifies_ready_watchdog_stopping(tmp_path: Path, onetablet: Sandbox) -> None:
    """Under systemd the daemon sends READY=1 once its database is open, WATCHDOG=1 pings,
    and STOPPING=1."""
    broker = Broker(tmp_path / "broker").start()
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        daemon = Daemon(
            tmp_path,
            {
                "COURIERD_MQTT__URL": broker.url,
                "COURIERD_ONETABLET__BASE_URL": onetablet.url,
                "COURIERD_ONETABLET__API_KEY": API_KEY,
                "NOTIFY_SOCKET": str(path),
                "WATCHDOG_USEC": "400000",
            },
        ).start()
        got: list[str] = []

        def received(what: str) -> bool:
            with contextlib.suppress(TimeoutError):
                got.append(sock.recv(200).decode())
            return any(what in m for m in got)

        wait_until(lambda: received("READY=1"), 10, "READY=1")
        wait_until(lambda: received("WATCHDOG=1"), 10, "WATCHDOG=1")
        assert daemon.stop() == 0
        wait_until(lambda: received("STOPPING=1"), 5, "STOPPING=1")
    broker.stop()
