"""What `http.listen` serves: `/healthz` and `/metrics`, and, given the settings, the
dispatch API, its OpenAPI document and the operator page (api.py).

The facts behind both come from the MQTT process (daemon/web.py brings them over):
`check()` asks it for its health report, `metrics()` for the Prometheus text.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from courierd.config import Settings
from courierd.edges.api import Api
from courierd.edges.http import Incoming, Listener, Reply, error_reply
from courierd.edges.listen import check_exposure

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
MetricsText = Callable[[], Awaitable[bytes]]


def registry_text(registry: CollectorRegistry) -> MetricsText:
    """`metrics` for a registry in this very process."""

    async def text() -> bytes:
        return generate_latest(registry)

    return text


def http_listener(
    settings: Settings,
    check: HealthCheck,
    metrics: MetricsText,
    *,
    api: bool = True,
    listen: str | None = None,
) -> tuple[Listener, Api | None]:
    """The `http.listen` listener (with the dispatch API unless `api` is false), and
    its Api, to be closed when the server stops. `listen` overrides the setting."""
    if api:
        check_exposure(settings.http)
    dispatch = Api(settings, check) if api else None

    async def route(request: Incoming) -> Reply:
        bare = request.target.partition("?")[0]
        if bare in ("/healthz", "/metrics") and request.method not in ("GET", "HEAD"):
            return error_reply(405, "only GET here", (("allow", "GET, HEAD"),))
        if bare == "/healthz":
            report = await check()
            status = 200 if report["status"] == "ok" else 503
            return Reply(status, json.dumps(report).encode(), "application/json", ())
        if bare == "/metrics":
            return Reply(200, await metrics(), CONTENT_TYPE_LATEST, ())
        if dispatch is not None:
            return await dispatch.handle(request)
        return error_reply(404, f"no such endpoint: {bare[:200]}")

    listener = Listener(
        listen or settings.http.listen,
        route,
        setting="http.listen",
        allowed_hosts=settings.http.allowed_hosts,
        deadline_s=settings.http.request_timeout_s,
    )
    return listener, dispatch
