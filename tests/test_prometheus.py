"""The shipped Prometheus rules (config/prometheus/courierd-rules.yml) in a real
Prometheus, scraping a real courierd: the outbox alert fires when OneTablet is cut off,
and every courierd_* series the rules name is one courierd exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, Rig, delivered, free_port, wait_until

RULES = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "courierd-rules.yml"
pytestmark = pytest.mark.integration


def rules_for_a_test() -> str:
    """The shipped rules with every `for:` at 1 s and the outbox's 300 s limit at 1 s, so
    that a test sees them fire in seconds; everything else as shipped."""
    text = RULES.read_text()
    fast, n = re.subn(r"^(\s+for:) \S+$", r"\1 1s", text, flags=re.M)
    assert n >= 9, "the rules file changed shape: every alert has a for:"
    limit = "courierd_outbox_oldest_pending_age_seconds > "
    assert fast.count(limit + "300") == 1, "the outbox alert's expression changed"
    return fast.replace(limit + "300", limit + "1")


def series_named(text: str) -> set[str]:
    """Every courierd_* metric name in the rules' text (expressions and descriptions)."""
    return set(re.findall(r"\bcourierd_[a-z0-9_]+", text))


class Prometheus:
    """`prometheus` on a free loopback port, scraping one target every second."""

    def __init__(self, workdir: Path, target: str, rules: str) -> None:
        workdir.mkdir()
        (workdir / "rules.yml").write_text(rules)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(workdir / "rules.yml")],
            "scrape_configs": [{"job_name": "courierd", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=log,
            )

    def api(self, path: str, **params: str) -> Any:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["data"]

    def ready(self) -> bool:
        try:
            return bool(self.api("/api/v1/status/runtimeinfo"))
        except OSError:
            return False

    def alerts(self, name: str) -> list[dict[str, Any]]:
        found = self.api("/api/v1/alerts")["alerts"]
        return [a for a in found if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    """Starts a Prometheus scraping a daemon with the test's rules; stopped afterwards."""
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    started: list[Prometheus] = []

    def start(daemon: Daemon, rules: str) -> Prometheus:
        prom = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{daemon.http_port}", rules)
        started.append(prom)
        wait_until(prom.ready, 30, "prometheus to answer")
        return prom

    yield start
    for prom in started:
        prom.stop()


def test_the_outbox_alert_fires_in_prometheus_when_onetablet_is_cut_off(
    sqlite_rig: Rig, prometheus_for: Any
) -> None:
    """A real Prometheus with the shipped rules scrapes courierd: quiet while OneTablet
    answers, CourierdOutboxBehind once it is cut off; every courierd_* name the rules
    use is a series courierd exports."""
    rig = sqlite_rig
    daemon = rig.daemon(COURIERD_ONETABLET__RETRY_SCHEDULE_S="[0.2, 0.5, 1, 2, 5, 10]").start()
    prom = prometheus_for(daemon, rules_for_a_test())
    pub = rig.publisher()
    pub.status("c1", "p1", "fine", "dasher_confirmed")
    pub.publish("couriers/c1/status", b"not json")  # a dead letter: the rejected series
    assert rig.onetablet.wait_for(lambda _: "fine" in delivered(rig.onetablet), 10)
    # Rules loaded and evaluating without errors, on a scrape of a healthy courierd.
    up = 'courierd_mqtt_connected{job="courierd"} == 1'
    wait_until(lambda: prom.api("/api/v1/query", query=up)["result"], 30, "a healthy scrape")
    groups = prom.api("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = len(re.findall(r"^\s+- (alert|record):", RULES.read_text(), flags=re.M))
    assert len(rules) == shipped and all(r["health"] == "ok" for r in rules), rules
    assert prom.alerts("CourierdOutboxBehind") == []

    rig.onetablet.responder = lambda _: (503, {}, {"error": "Unavailable", "message": "down"})
    pub.status("c1", "p2", "stuck", "dasher_confirmed")
    firing = wait_until(
        lambda: [a for a in prom.alerts("CourierdOutboxBehind") if a["state"] == "firing"],
        60,
        "CourierdOutboxBehind to fire",
    )
    assert "oldest pending push" in firing[0]["annotations"]["summary"]
    assert 'README "What to watch"' in firing[0]["annotations"]["description"]

    for name in sorted(series_named(RULES.read_text())):
        query = f'{{__name__=~"{name}(_bucket)?", job="courierd"}}'
        assert prom.api("/api/v1/query", query=query)["result"], f"{name} is not on /metrics"
    pub.close()
