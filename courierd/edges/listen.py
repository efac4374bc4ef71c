"""Where courierd's listeners listen: the sockets, the `Host` names they answer to, and
the rule that keeps a token-less API on loopback. Light on purpose: the MQTT process
binds the sockets (a taken port is exit 2 at startup) and hands them to the HTTP
process, without loading the web stack itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable

from courierd.config import HttpSettings
from courierd.errors import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def split_listen(listen: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def bind(listen: str, setting: str) -> list[socket.socket]:
    """Listening sockets for every address `listen` names (a name may have an IPv4 and
    an IPv6 one), or a ConfigError naming the setting. Bound here, served elsewhere:
    the supervisor binds (so a taken port is exit 2 at startup) and the HTTP process
    serves them."""
    host, port = split_listen(listen)
    env = "COURIERD_" + setting.upper().replace(".", "__")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as e:
        raise ConfigError(f"invalid setting {setting} ({env}): cannot resolve {host}: {e}") from e
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one port for every address of the name
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ConfigError(
            f"invalid setting {setting} ({env}): cannot listen on {listen}: {e.strerror}"
        ) from None
    return sockets


def allowed_names(listen: str, extra: Iterable[str]) -> frozenset[str]:
    """The `Host` names a listener answers to: loopback, its own address, `extra`."""
    host = split_listen(listen)[0].lower()
    names = set(LOOPBACK_NAMES) | {h.lower() for h in extra}
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:
            host = ""  # 0.0.0.0 or :: is no name a client uses
    if host:
        names.add(host)
    return frozenset(names)


def host_of(header: str) -> str:
    """The name in a `Host` header, as config.host_name writes names: no port, lower
    case, no brackets or trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0].rstrip(".")


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
