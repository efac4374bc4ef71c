"""Small real servers for the OneTablet client policy tests: a host that is not
OneTablet (records what reaches it, answers 200 to anything: also a forward proxy),
and a OneTablet that trickles its reply in a byte at a time."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the other host saw it: the request line's target (absolute when
    it came as to a proxy) and the API key, if any."""

    method: str
    target: str
    api_key: str | None
    proxy_authorization: str | None = None


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
                seen.append(
                    Seen(
                        self.command,
                        self.path,
                        self.headers.get("x-api-key"),
                        self.headers.get("proxy-authorization"),
                    )
                )
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


class _Listener:
    """A TCP server on `host` (127.0.0.1, or ::1), each connection served on a thread of
    its own (`_serve`, with the arguments `_accepted` gives), until `close()`. A subclass
    sets its own fields before calling `__init__`, which starts listening, and accepting
    unless `accepting` is False: connections then wait in the listen queue (`backlog`
    long) until `start_accepting()`, and once it is full the kernel drops further SYNs
    (a connect hangs, as to a server too busy to accept)."""

    def __init__(
        self, host: str = "127.0.0.1", *, backlog: int | None = None, accepting: bool = True
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=backlog)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self._accepting = threading.Event()
        if accepting:
            self._accepting.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def start_accepting(self) -> None:
        self._accepting.set()

    def _accept(self) -> None:
        self._accepting.wait()
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=self._accepted(conn), daemon=True).start()

    def _accepted(self, conn: socket.socket) -> tuple[Any, ...]:
        return (conn,)

    def _serve(self, *args: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._listener.close()
        self._accepting.set()  # the accept thread ends on the closed listener


class Trickler(_Listener):
    """Answers every request with headers at once, then one body byte per `every_s`:
    each read is quick, only the whole reply is slow."""

    def __init__(self, every_s: float = 0.5, length: int = 60) -> None:
        self.every_s, self.length = every_s, length
        self.connections = 0
        self._stop = threading.Event()
        super().__init__()

    def _accepted(self, conn: socket.socket) -> tuple[Any, ...]:
        self.connections += 1
        return (conn,)

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
        super().close()


class Flood(_Listener):
    """Answers every request 200 with a body of `length` bytes (far more than any real
    reply), sent as fast as the client reads it; counts what it managed to send."""

    def __init__(self, length: int = 256 << 20) -> None:
        self.length = length
        self.sent = 0
        super().__init__()

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


class Scripted(_Listener):
    """A raw HTTP/1.1 server whose replies are bytes as `answer(n)` gives them for the
    n-th request (from 0): `(reply, close)`, the connection closed after the reply when
    `close` (at once, without a reply, when `reply` is None). Each request is read whole
    (head, then content-length bytes). It counts connections: accepted, open now, the
    most open at once, and those the client closed. A reply waits `hold_s` (requests
    overlap), and while `gate` is given and not set (the test sets it once what it
    wants to see is there). `listen`: `_Listener`'s options."""

    def __init__(
        self,
        answer: Callable[[int], tuple[bytes | None, bool]],
        hold_s: float = 0.0,
        gate: threading.Event | None = None,
        **listen: Any,
    ) -> None:
        self.answer, self.hold_s, self.gate = answer, hold_s, gate
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head)
        self.connections = self.open = self.peak = self.closed_by_client = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        super().__init__(**listen)  # _Listener's host, backlog, accepting

    def _accepted(self, conn: socket.socket) -> tuple[Any, ...]:
        with self._lock:
            number = self.connections
            self.connections += 1
            self.open += 1
            self.peak = max(self.peak, self.open)
            self._conns.append(conn)
        return conn, number

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        with self._lock:
                            self.closed_by_client += 1
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer[length:]
                with self._lock:
                    n = len(self.requests)
                    self.requests.append((number, head))
                if self.hold_s:
                    time.sleep(self.hold_s)  # a slow server, so that requests overlap
                if self.gate is not None:
                    self.gate.wait(30)
                reply, close = self.answer(n)
                if reply is not None:
                    conn.sendall(reply)
                if close or reply is None:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self.open -= 1
            conn.close()

    def close(self) -> None:
        super().close()
        if self.gate is not None:
            self.gate.set()  # no reply left waiting for it
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


class ConnectProxy(_Listener):
    """A forward proxy for https:// that only tunnels: `CONNECT host:port`, answered
    200, then bytes both ways. Records each CONNECT's target, and every byte a client
    sent it (`seen`: the CONNECT's head, then what it carried in the tunnel)."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.seen = bytearray()
        self._seen_lock = threading.Lock()
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            self._saw(head)
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Only CONNECT\r\ncontent-length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as server:
                server.settimeout(None)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                back = threading.Thread(target=_pump, args=(server, client), daemon=True)
                back.start()
                _pump(client, server, self._saw)
                back.join(10)

    def _saw(self, data: bytes) -> None:
        with self._seen_lock:
            self.seen += data


def _pump(
    src: socket.socket, dst: socket.socket, record: Callable[[bytes], None] | None = None
) -> None:
    try:
        while data := src.recv(65536):
            if record is not None:
                record(data)
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
