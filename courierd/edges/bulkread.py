"""paho's client, reading the broker's stream in bulk: `BulkReadClient`.

paho 2.2 reads one packet per wake-up of its network thread: a `select()`, then a
`recv()` of the packet's first byte, one per byte of its length and one of the rest
(and a last one that fails with EAGAIN), then per PUBLISH a `MQTTMessage` (with a
`threading.Condition` of its own), a look through the `message_callback_add` filters,
the callback under two locks, and a debug line formatted for a logger we do not set.
Draining a backlog, that is most of the MQTT process's own work per message.

This client reads whatever the socket holds (up to RECV_BYTES) in one `recv()` and
cuts it into packets itself. A QoS 0 or 1 PUBLISH (what the couriers' apps send, and
what the broker forwards of it) goes straight to `deliver` with its topic (bytes),
payload, packet id and QoS, in the order it came; MQTT 5 properties are skipped by
their length, unread (courierd reads none: a property block paho would refuse for
what it holds, within its length, does not drop the connection here). Everything else
(CONNACK, SUBACK, PINGRESP, DISCONNECT, QoS 2, a PUBLISH with an empty topic or a
malformed or overrunning properties length, anything malformed) is handed to paho's
own `_packet_handle` exactly as paho's reader would have, so paho decides and answers
as it always did. Acknowledging is not touched: with manual acks, a message is
acknowledged when its owner says so.

Only paho's reading is replaced (`loop_read`); connecting, writing, keepalive and
reconnecting are paho's. `usable()` says whether this paho has the internals it relies
on (pyproject pins paho 2.2.x); if not, the edge uses paho's plain client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

# One read takes up to this much of what the broker sent (Linux's loopback and a busy
# TCP connection typically hold more): a few hundred pings' worth per wake-up.
RECV_BYTES = 256 * 1024


Deliver = Callable[[bytes, bytes, int, int, float], None]


def _after_properties(data: bytes, at: int, stop: int) -> int:
    """Where an MQTT 5 PUBLISH's properties starting at `at` end (their length, a
    variable byte integer of 1-4 bytes, and as many bytes); past `stop` if the packet
    has no room for them or the length is malformed (the packet is then paho's)."""
    length = shift = 0
    while at < stop and shift < 28:
        byte = data[at]
        at += 1
        length |= (byte & 127) << shift
        if byte < 128:
            return at + length
        shift += 7
    return stop + 1


def usable() -> bool:
    """This paho has what `BulkReadClient` builds on (paho 2.2's client internals).

    The bulk reader hands messages to `deliver`, not to `on_message`: filters set with
    `message_callback_add` are not consulted for them (courierd sets none)."""
    needed = ("_packet_handle", "_loop_rc_handle", "_sock_recv", "_easy_log", "loop_read")
    return all(callable(getattr(paho.Client, name, None)) for name in needed)


class BulkReadClient(paho.Client):
    """A paho client whose network thread reads the socket in bulk (module text).

    `deliver(topic, payload, mid, qos, received)` is called on paho's thread for each
    plain PUBLISH, as `on_message` would be; `received` is time.monotonic() when the
    bytes holding it were read. A message that paho decodes itself reaches
    `on_message`, as with paho's client. Not under paho's callback lock (which paho
    takes so that a callback's publish is not written from inside it when there is no
    network thread): `deliver` publishes nothing, and `between_packets` needs it free
    (from `on_message`, under the lock, `between_packets` does nothing). A connection
    lost while `deliver` ran (its `between_packets`) ends the read there.
    """

    def __init__(self, *args: Any, deliver: Deliver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deliver = deliver
        self._v5 = self._protocol == paho.MQTTv5
        # What was read and not yet handled: the start of a packet whose rest has not
        # arrived, in pieces (joined once it is whole), `_need` bytes long if known.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._need = 0
        self._pending_sock: Any = None  # the connection they came from
        self._delivering = False  # in a `deliver` call of this reader (see between_packets)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """One read of what the socket holds, every whole packet in it handled."""
        sock = self._sock
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        if sock is not self._pending_sock:  # a new connection: nothing carries over
            self._pending, self._pending_len, self._need = [], 0, 0
            self._pending_sock = sock
        try:
            data = self._sock_recv(RECV_BYTES)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        except OSError as err:
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        if not data:
            return self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
        now = time.monotonic()
        with self._msgtime_mutex:
            self._last_bytes_received = now
        if self._pending:
            self._pending.append(data)
            self._pending_len += len(data)
            if self._pending_len < self._need:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # that packet is not whole yet
            data = b"".join(self._pending)
            self._pending, self._pending_len, self._need = [], 0, 0
        self._delivering = True  # `between_packets` may run (from `deliver`) until done
        try:
            rc = self._handle_all(sock, data, now)
        finally:
            self._delivering = False
        if rc:
            return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_all(self, sock: Any, data: bytes, now: float) -> MQTTErrorCode:
        """Every whole packet of `data`, in order; keeps an unfinished one for later."""
        end = len(data)
        pos = 0
        v5 = self._v5
        deliver = self._deliver
        while pos < end:
            # The fixed header: the type and flags, then the remaining length in 1-4
            # bytes of 7 bits each, the least significant first.
            start = pos
            header = data[pos]
            if pos + 1 >= end:
                return self._keep(data, start, 0)
            length = data[pos + 1]
            pos += 2
            if length > 127:
                length &= 127
                shift = 7
                while True:
                    if pos >= end:
                        return self._keep(data, start, 0)
                    byte = data[pos]
                    pos += 1
                    length |= (byte & 127) << shift
                    if byte < 128:
                        break
                    shift += 7
                    if shift == 28:  # more than 4 length bytes: not MQTT
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
            stop = pos + length
            if stop > end:
                return self._keep(data, start, stop - start)
            # PUBLISH at QoS 0 or 1 (0x30, 0x32; DUP and RETAIN masked off): topic
            # length, topic, packet id (QoS 1), properties (MQTT 5: their length as a
            # variable byte integer, 0 if none; skipped, courierd reads none), payload.
            # Anything else, a PUBLISH with an empty topic, and one whose properties'
            # length is malformed or overruns the packet, goes to paho.
            kind = header & 0xF6
            if kind in (0x32, 0x30) and length >= 2:
                topic_end = pos + 2 + (data[pos] << 8 | data[pos + 1])
                body = topic_end + 2 if kind == 0x32 else topic_end
                if v5:
                    if body < stop and data[body] < 128:
                        body += 1 + data[body]
                    else:
                        body = _after_properties(data, body, stop)
                if topic_end > pos + 2 and body <= stop:
                    try:
                        deliver(
                            data[pos + 2 : topic_end],
                            data[body:stop],
                            data[topic_end] << 8 | data[topic_end + 1] if kind == 0x32 else 0,
                            1 if kind == 0x32 else 0,
                            now,
                        )
                    except Exception as err:
                        self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                        if not self.suppress_exceptions:
                            raise
                    pos = stop
                    if self._sock is not sock:  # a wait for room found the connection lost
                        return MQTTErrorCode.MQTT_ERR_SUCCESS
                    continue
            # paho calls back under its callback lock, which a connection lost in
            # `between_packets` would take again: not from there.
            self._delivering = False
            rc = self._paho_handles(header, data[start + 1 : pos], data[pos:stop])
            self._delivering = True
            pos = stop
            if rc:
                return rc
            if self._sock is not sock:  # that packet ended the connection
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def between_packets(self) -> None:
        """For `deliver` when it has waited for room (see MqttEdge._make_room), on
        paho's thread: what paho's loop does between two packets.

        paho's own reader went back to its loop after every packet: it wrote what was
        queued (PUBACKs), sent a PINGREQ when one was due and, having just read,
        counted the connection as alive. This reader may be in the middle of a bulk
        read, so it does the same here: the packets still to be handed over count as
        just read, and a connection that has to wait for room stays alive as before.

        Nothing unless called from within this reader's `deliver`: anywhere else (a
        message paho decoded itself, its `on_message`) paho holds its callback lock,
        and a connection found lost here would have paho take that lock again
        (`on_disconnect`): its thread blocked for good, the edge never reconnecting.
        """
        if self._sock is None or not self._delivering:
            return
        with self._msgtime_mutex:
            self._last_bytes_received = time.monotonic()
        if self.want_write():
            self.loop_write()
        if self._sock is not None:
            self.loop_misc()
        if self._sock is not None and self.want_write():
            self.loop_write()

    def _keep(self, data: bytes, start: int, need: int) -> MQTTErrorCode:
        """The unfinished packet at `start`, `need` bytes long (0: not known yet)."""
        rest = data[start:]
        self._pending, self._pending_len, self._need = [rest], len(rest), need
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _paho_handles(self, header: int, length_bytes: bytes, packet: bytes) -> MQTTErrorCode:
        """One whole packet to paho's own handling, as paho's reader hands it over."""
        self._in_packet = {
            "command": header,
            "have_remaining": 1,
            "remaining_count": list(length_bytes),
            "remaining_mult": 128 ** len(length_bytes),
            "remaining_length": len(packet),
            "packet": bytearray(packet),
            "to_process": 0,
            "pos": 0,
        }
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {  # as paho's reader leaves it between packets
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        return rc
