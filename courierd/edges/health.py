"""The HTTP server on `http.listen`: `/healthz` and `/metrics`, and, given the
settings, the dispatch API, its OpenAPI document and the operator page (api.py).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from email.message import Message
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from courierd.config import HttpSettings, Settings
from courierd.edges.api import Api, LiveStatus, Reply, error_reply
from courierd.edges.http import JsonServer
from courierd.errors import ConfigError

HealthCheck = Callable[[], dict[str, Any]]


class HealthServer(JsonServer):
    """Serves health (200 when `check()` says ok, else 503) and Prometheus metrics, and,
    with `settings`, the dispatch API and the operator page (`live`: the daemon's
    health and dispatch stats, for the dashboard)."""

    def __init__(
        self,
        listen: str,
        check: HealthCheck,
        registry: CollectorRegistry,
        *,
        settings: Settings | None = None,
        live: LiveStatus | None = None,
    ) -> None:
        if settings is not None:
            check_exposure(settings.http)
        self.api = None if settings is None else Api(settings, live)
        self.check = check
        self.registry = registry
        super().__init__(listen, self._route, setting="http.listen", name="http")

    def _route(self, command: str, path: str, headers: Message, body: Callable[[], bytes]) -> Reply:
        bare = path.partition("?")[0]
        if bare in ("/healthz", "/metrics") and command not in ("GET", "HEAD"):
            return error_reply(405, "only GET here", (("allow", "GET, HEAD"),))
        if bare == "/healthz":
            report = self.check()
            status = 200 if report["status"] == "ok" else 503
            return Reply(status, json.dumps(report).encode(), "application/json", ())
        if bare == "/metrics":
            return Reply(200, generate_latest(self.registry), CONTENT_TYPE_LATEST, ())
        if self.api is not None:
            return self.api.handle(command, path, headers, body)
        return error_reply(404, f"no such endpoint: {bare[:200]}")

    def stop(self) -> None:
        super().stop()
        if self.api is not None:
            self.api.close()


def check_exposure(http: HttpSettings) -> None:
    """Refuse to serve the API beyond this machine without a token (startup, exit 2)."""
    if not http.listen or http.token is not None:
        return
    host = http.listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"invalid setting http.listen (COURIERD_HTTP__LISTEN): {http.listen} is not a "
            "loopback address (127.0.0.0/8, ::1, localhost), so http.token "
            "(COURIERD_HTTP__TOKEN) must be set: the dispatch API would be open to anyone"
        )
