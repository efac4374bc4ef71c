"""A TCP proxy for fault tests: forwards, goes silent, or refuses (tests only).

`TcpProxy(upstream_port).start()` listens on a free port of 127.0.0.1 and forwards
every connection to 127.0.0.1:upstream_port. Then:

- `silence()`: stop forwarding, in both directions, without closing anything (a
  network partition: no RST, no FIN; what was sent waits). New connections are
  accepted and wait too. `resume()` lets everything flow again.
- `refuse()`: close every connection, and close each new one at once (the server is
  down). `resume()` forwards again.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from courierd.devtools.localbroker import free_port


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self._stopped = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def silence(self) -> None:
        self._flowing.clear()

    def refuse(self) -> None:
        with self._lock:
            self._refusing = True
            self._close_all()
        self._flowing.set()

    def resume(self) -> None:
        with self._lock:
            self._refusing = False
        self._flowing.set()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._close_all()
        self._flowing.set()
        self._listener.close()

    def _close_all(self) -> None:
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self._flowing.wait()  # silent: a new connection waits like the rest
        with self._lock:
            if self._refusing or self._stopped:
                client.close()
                return
            self._sockets.append(client)
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        with self._lock:
            self._sockets.append(server)
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # silent: hold what came in, send nothing
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
