"""Small real servers for the OneTablet client policy tests: a host that is not
OneTablet (records what reaches it, answers 200 to anything: also a forward proxy),
and a OneTablet that trickles its reply in a byte at a time."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the other host saw it: the request line's target (absolute when
    it came as to a proxy) and the API key, if any."""

    method: str
    target: str
    api_key: str | None


class OtherHost:
    """A real HTTP server on 127.0.0.1 that records every request and answers 200 `{}`;
    over TLS with `tls` (certificate file, key file)."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.seen: list[Seen] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                seen.append(Seen(self.command, self.path, self.headers.get("x-api-key")))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = do_PUT = _any

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Trickler:
    """Answers every request with headers at once, then one body byte per `every_s`:
    each read is quick, only the whole reply is slow."""

    def __init__(self, every_s: float = 0.5, length: int = 60) -> None:
        self.every_s, self.length = every_s, length
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request: its content is not the point here
                head = f"HTTP/1.1 200 OK\r\ncontent-length: {self.length}\r\n\r\n"
                conn.sendall(head.encode())
                for _ in range(self.length):
                    if self._stop.wait(self.every_s):
                        return
                    conn.sendall(b" ")
            except OSError:
                return  # the client gave up: what the tests wait for

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


class Flood:
    """Answers every request 200 with a body of `length` bytes (far more than any real
    reply), sent as fast as the client reads it; counts what it managed to send."""

    def __init__(self, length: int = 256 << 20) -> None:
        self.length = length
        self.sent = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        chunk = b"x" * 65536
        with conn:
            try:
                conn.recv(65536)
                head = f"HTTP/1.1 200 OK\r\ncontent-length: {self.length}\r\n\r\n"
                conn.sendall(head.encode())
                while self.sent < self.length:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                return  # the client stopped reading and closed: what the test wants

    def close(self) -> None:
        self._listener.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate (and its key) for 127.0.0.1 that no trust store knows."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
