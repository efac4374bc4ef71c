"""`/healthz` and `/metrics` on `http.listen`, served by a small threaded HTTP server."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from courierd.errors import ConfigError

log = logging.getLogger(__name__)

HealthCheck = Callable[[], dict[str, Any]]


class HealthServer:
    """Serves health (200 when `check()` says ok, else 503) and Prometheus metrics."""

    def __init__(self, listen: str, check: HealthCheck, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server = ThreadingHTTPServer(
                (host.strip("[]"), int(port)), _handler(check, registry)
            )
        except OSError as e:
            raise ConfigError(
                f"invalid setting http.listen (COURIERD_HTTP__LISTEN): "
                f"cannot listen on {listen}: {e.strerror}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name="http",
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("http.listening port=%d", self.port)

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever on a server never started
            self._server.shutdown()
        self._server.server_close()


def _handler(check: HealthCheck, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/healthz":
                report = check()
                self._send(
                    200 if report["status"] == "ok" else 503,
                    "application/json",
                    json.dumps(report).encode(),
                )
            elif self.path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            else:
                self._send(404, "application/json", b'{"error": "not found"}')

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the log

    return Handler
