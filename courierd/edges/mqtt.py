"""The MQTT edge (paho-mqtt 2.x): connect, subscribe, hand messages over, ack later.

Callbacks run on paho's network thread and only convert, `interpret` (the daemon parses
there) and enqueue; paho reads the broker's stream in bulk (bulkread.py) and hands plain
messages to `_take`. Messages are acknowledged by the ingest thread with `ack()` after
the batch holding their effects has committed (manual ack). The session is persistent
(clean_start=False and a session expiry interval on MQTT 5; clean_session=False on
3.1.1), so the broker keeps queueing for us while we are down, and redelivers whatever
we had not acknowledged.
"""

from __future__ import annotations

import itertools
import logging
import queue
import select
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from courierd.config import MqttSettings
from courierd.domain.telemetry import MAX_PAYLOAD
from courierd.edges.bulkread import BulkReadClient
from courierd.edges.bulkread import usable as bulk_usable

log = logging.getLogger(__name__)

# Connection numbers, unique in the process: a message's ack goes to the connection that
# delivered it or nowhere, even when a slot's session is connected again by a new edge.
_CONNECTIONS = itertools.count(1)

# An oversized payload is a dead letter whatever it holds: only its start travels on
# (to be kept for operators), not megabytes through the queue, pickling and the pipe.
KEEP_OVERSIZED = 4096


# A PUBACK is its fixed header (type, remaining length 2) and the message id: 4 bytes,
# packed as one big-endian word. paho's own queue of outgoing packets (`ack_many`); None
# if this paho has no such method (then every message is acknowledged on its own).
_PUBACK_HEAD = (int(paho.PUBACK) << 24) | (2 << 16)
_PACKET_QUEUE: Callable[..., Any] | None = getattr(paho.Client, "_packet_queue", None)


# After its own DISCONNECT, how long an edge waits for the broker to close the connection
# (`GentleClose`); a broker that has not by then is left to notice the close itself.
CLOSE_WAIT_S = 1.0


class GentleClose(paho.Client):
    """paho's client, ending a connection it disconnects (`gentle`) only once the broker
    has: after DISCONNECT is written, what the broker still sends is read and dropped
    until it closes the connection (at most CLOSE_WAIT_S), then the socket is closed.

    A broker handles a connection's packets in order and closes it on DISCONNECT, so the
    PUBACKs written before are handled by then. paho closes at once, and a new
    connection of the same session (a slot held again under a new epoch, at once) could
    reach the broker first: Mosquitto 2.0 reads one packet per connection per round,
    takes the session over and closes the old connection with PUBACKs still unread, and
    the broker delivers those messages again (tests/test_sessions.py caught it). Read to
    the end, the socket also closes with nothing unread, not with a reset that would
    discard what it still had to send."""

    gentle = False  # set before `disconnect()`: a stop, not a lost connection

    def _sock_close(self) -> None:
        sock = self._sock
        if self.gentle and sock is not None:
            _read_until_closed(sock, CLOSE_WAIT_S)
        super()._sock_close()

    def __del__(self) -> None:
        # paho's closes the socket too: never with the wait, on whatever thread collects.
        self.gentle = False
        super().__del__()


def _read_until_closed(sock: Any, timeout: float) -> None:
    """Read and drop what `sock` receives until its peer closes it, an error, or `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        sock.setblocking(False)
        readable = select.poll()  # not select.select: it refuses a descriptor past 1023
        readable.register(sock, select.POLLIN)
        while True:
            try:
                if not sock.recv(65536):
                    return  # the broker closed it
                continue
            except (BlockingIOError, ssl.SSLWantReadError):
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable.poll(left * 1000)
    except (OSError, ValueError):
        return  # reset, or closed already: nothing more to wait for


class BulkEdgeClient(GentleClose, BulkReadClient):
    """The edge's client: bulk reads (bulkread.py), gentle stops."""


class PlainEdgeClient(GentleClose):
    """The edge's client where bulk reads are not usable: paho's own reader."""


class Room:
    """Room in the inbox: made by whoever takes messages out of it (the batcher),
    waited for by the paho threads that fill it (`MqttEdge._make_room`), one per slot a
    cluster instance holds. A Condition, so that no waiter misses a wake-up: a shared
    Event, cleared by one waiter, could leave another waiting out its timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.waiting = 0  # threads waiting now (for tests and their synchronisation)
        # Messages taken out of the inbox that still count in the window: the batch the
        # batcher sent behind the one being committed (daemon/batcher.py).
        self.held = 0

    def made(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def hold(self, held: int) -> None:
        """`held` messages out of the inbox still count in the window; room is made if
        that is fewer than before."""
        with self._cond:
            fewer = held < self.held
            self.held = held
            if fewer:
                self._cond.notify_all()

    def wait_for(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Until `ready()` (checked whenever room is made) or `timeout`: `ready()`."""
        with self._cond:
            self.waiting += 1
            try:
                return self._cond.wait_for(ready, timeout)
            finally:
                self.waiting -= 1


class LeanProperties(Properties):
    """paho's `Properties`, at a fraction of the cost to make and to read into.

    paho decodes every MQTT 5 PUBLISH into a new `Properties`. Its constructor builds
    the tables of all 27 property names and types, each assignment through its own
    validating `__setattr__`, and `unpack` first deletes each of the 27 names it might
    hold: about 70 % of the MQTT process's own decoding of a message over MQTT 5, and
    most of what MQTT 5 costs it over 3.1.1 (README "Performance"). This one shares one
    copy of the tables (paho only reads them) and clears only the names it holds;
    reading, validating and everything else are paho's own.
    """

    _tables: tuple[Any, Any, Any] | None = None
    _compressed: tuple[str, ...] = ()

    def __init__(self, packetType: int) -> None:
        tables = LeanProperties._tables
        if tables is None:
            base = Properties(packetType)  # type: ignore[no-untyped-call]
            tables = LeanProperties._tables = (base.types, base.names, base.properties)
            LeanProperties._compressed = tuple(n.replace(" ", "") for n in base.names)
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", tables[0])
        object.__setattr__(self, "names", tables[1])
        object.__setattr__(self, "properties", tables[2])

    def clear(self) -> None:
        held = vars(self)
        for name in LeanProperties._compressed:
            if name in held:
                delattr(self, name)


def use_lean_properties() -> bool:
    """Have paho decode incoming packets into `LeanProperties`; False (and paho left as
    it is) if this paho does not look like the one it was written for."""
    try:
        from paho.mqtt import _packet  # paho 2.2's packet decoding (pyproject pins 2.2)
    except ImportError:
        return False
    if getattr(_packet, "Properties", None) is LeanProperties:
        return True
    if getattr(_packet, "Properties", None) is not Properties:
        return False
    try:
        probe = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if not (
            isinstance(probe.types, list)
            and isinstance(probe.names, dict)
            and isinstance(probe.properties, dict)
        ):
            return False
    except Exception:
        return False
    _packet.Properties = LeanProperties  # type: ignore[attr-defined]
    return True


class Message(NamedTuple):
    """One received message, with what is needed to acknowledge it later.

    A NamedTuple, not a dataclass: one is built per message on paho's thread, the
    busiest in the process, and a tuple is the cheapest value to build there.
    """

    topic: str
    payload: bytes  # only the first KEEP_OVERSIZED bytes of a payload over MAX_PAYLOAD
    mid: int
    qos: int
    generation: int  # which connection delivered it (unique in the process): acks never
    # cross connections
    size: int  # the payload's real size
    slot: int = 0  # which of the daemon's MQTT sessions delivered it
    received: float = 0.0  # time.monotonic() when paho read it off the socket
    epoch: int = 0  # a cluster: the slot's epoch (fencing token) it was delivered under
    parsed: object = None  # what `interpret` made of it on arrival (None: nothing did)


_new_message = tuple.__new__


class MqttEdge:
    """A paho client feeding `inbox`; `connected` tells health whether the broker is there."""

    def __init__(
        self,
        settings: MqttSettings,
        inbox: queue.SimpleQueue[Message],
        receive_max: int,
        on_subscribed: Callable[[], None] = lambda: None,
        subscriptions: tuple[str, ...] = ("couriers/#", "dispatch/assignments"),
        unsubscriptions: tuple[str, ...] = (),
        slot: int = 0,
        client_id: str | None = None,
        epoch: int = 0,
        supervised: bool = False,
        room: Room | None = None,
        bulk_read: bool = True,
        interpret: Callable[[str, bytes, int], object] | None = None,
    ) -> None:
        self.slot = slot
        # Run on each message as it arrives (topic, payload, size), its result carried in
        # the Message: the daemon parses here, beside the ingest process's commits.
        self.interpret = interpret
        self.epoch = epoch
        # Supervised (a cluster's slot): never connect again by itself. Once the
        # connection is lost (or the first attempt fails), `ended` is set and the owner
        # decides, knowing whether the slot is still ours: reconnecting a slot that is
        # another instance's now would kick its new holder off the broker.
        self.supervised = supervised
        self.ended = threading.Event()
        self._on_subscribed = on_subscribed
        self.subscriptions = subscriptions
        # Filters a persistent session may still hold from an earlier configuration
        # (OwnTracks turned off): dropped on every connect, or they would keep flowing.
        self.unsubscriptions = unsubscriptions
        self.max_backlog = max(10_000, receive_max * 4)
        # The window, held on our side too (see `_make_room`); `room` is made by whoever
        # takes messages out of the inbox (the batcher), shared by the edges feeding it.
        self.max_inbox = receive_max
        self.room = room if room is not None else Room()
        self.dropped_qos0 = 0
        self.settings = settings
        self.inbox = inbox
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._generation = 0
        self._stopping = False
        self._acked = False  # PUBACKs queued since paho's thread last wrote (_make_room)
        v5 = settings.protocol == "5"
        if v5:
            use_lean_properties()
        options: dict[str, Any] = {
            "client_id": client_id or settings.client_id,
            "protocol": paho.MQTTv5 if v5 else paho.MQTTv311,
            "clean_session": None if v5 else False,
            "manual_ack": True,
            "reconnect_on_failure": not supervised,
        }
        # paho reading the socket in bulk, plain messages handed to `_take` directly
        # (bulkread.py); paho's own reader if this paho is not the one it knows (or
        # `bulk_read` is False: the tests run that way too).
        client: GentleClose = (
            BulkEdgeClient(CallbackAPIVersion.VERSION2, deliver=self._take, **options)
            if bulk_read and bulk_usable()
            else PlainEdgeClient(CallbackAPIVersion.VERSION2, **options)
        )
        # Without this, one exception in a callback kills paho's thread while
        # is_connected() keeps answering True.
        client.suppress_exceptions = True
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls:
            client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_connect_fail = self._on_connect_fail
        self._client = client
        self._v5 = v5
        self._receive_max = receive_max

    def start(self) -> None:
        """Connect in the background; paho reconnects with backoff on its own."""
        properties = None
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.settings.session_expiry_s
            # How many unacked QoS 1 messages the broker may have out to us at once:
            # ack-after-commit needs at least a batch's worth in flight.
            properties.ReceiveMaximum = self._receive_max
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client.loop_start()

    def begin_stop(self) -> None:
        """Send DISCONNECT and return; `stop()` then waits for the connection to end.
        Several edges stopping wait for their brokers together (Sessions.stop), not one
        CLOSE_WAIT_S after another when the broker does not answer."""
        if self._stopping:
            return
        self._stopping = True
        self.room.made()  # paho's thread may be waiting in `_make_room`
        self._client.gentle = True
        self._client.disconnect()

    def stop(self) -> None:
        # Returns once the broker has handled what was written before (GentleClose): a
        # connection of the same session made next cannot overtake the last PUBACKs.
        self.begin_stop()
        self._client.loop_stop()
        self.connected.clear()

    def ack(self, message: Message) -> None:
        """PUBACK a message whose effects are committed (no-op for QoS 0)."""
        if message.qos and message.generation == self._generation:
            self._client.ack(message.mid, message.qos)

    def ack_many(self, messages: Iterable[Message]) -> None:
        """PUBACK a committed batch's messages in one write to the broker.

        paho queues each `ack()` as a packet of its own: one wake-up of its thread, one
        send() and, at the broker, one read per message. A PUBACK is 4 bytes, the same in
        MQTT 3.1.1 and 5 (reason code "success" left out): a batch's PUBACKs in one
        buffer are what the broker would have read anyway, in one go. QoS 2 (which
        courierd never subscribes with) and a paho without this queue go one by one."""
        generation, queue_packet = self._generation, _PACKET_QUEUE
        mids = []
        for m in messages:
            if m.qos and m.generation == generation:
                if m.qos != 1 or queue_packet is None:
                    self._client.ack(m.mid, m.qos)
                else:
                    mids.append(m.mid)
        if mids:
            packet = struct.pack(f"!{len(mids)}I", *(_PUBACK_HEAD | mid for mid in mids))
            assert queue_packet is not None
            queue_packet(self._client, paho.PUBACK, packet, 0, 0)
            # paho's thread, if it waits for room, writes them now (`_make_room`)
            if isinstance(self._client, BulkReadClient):
                self._acked = True
                self.room.made()

    def _on_connect(self, client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("mqtt.refused reason=%r", str(reason))
            return
        self._generation = next(_CONNECTIONS)
        log.info(
            "mqtt.connected broker=%s:%s slot=%d session_present=%s",
            self.settings.host,
            self.settings.port,
            self.slot,
            flags.session_present,
        )
        # Subscribing here means a reconnect resubscribes, session or not.
        if self._v5:
            # Retained messages only when the subscription is new: a resumed session
            # already had them, so a reconnect does not replay every profile.
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe([(topic, options) for topic in self.subscriptions])
        else:
            client.subscribe([(topic, 1) for topic in self.subscriptions])
        if self.unsubscriptions:
            client.unsubscribe(list(self.unsubscriptions))
        self.connected.set()

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            log.error("mqtt.subscribe_refused reasons=%r", [str(r) for r in reasons])
        else:
            self.subscribed.set()
            self._on_subscribed()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        # Acks of this connection's messages are no use on the next one (the broker
        # resends them there), and paho could write them before its CONNECT.
        self._generation = next(_CONNECTIONS)
        self.connected.clear()
        self.subscribed.clear()
        if self.supervised:
            self.ended.set()
            if not self._stopping:
                log.warning("mqtt.disconnected slot=%d reason=%r", self.slot, str(reason))
        elif not self._stopping:
            log.warning("mqtt.disconnected reason=%r (reconnecting)", str(reason))

    def _on_connect_fail(self, client: paho.Client, _u: Any) -> None:
        if self.supervised:  # paho would retry: the owner decides instead
            self.ended.set()
            client.disconnect()

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        """A message paho decoded itself (see bulkread.py): as any other."""
        self._take(msg._topic, bytes(msg.payload), msg.mid, msg.qos, msg.timestamp)

    def _take(self, topic: bytes, payload: bytes, mid: int, qos: int, received: float) -> None:
        """On paho's thread: a message into the inbox, in the order it came."""
        # The connection that delivered it, read before any wait for room: a wait can
        # end with that connection lost (BulkReadClient.between_packets), and its ack
        # must not go to the next one.
        generation = self._generation
        name = topic.decode("utf-8", errors="replace")
        # QoS 1 inflow is bounded by the Receive Maximum (unacked messages); QoS 0 is not,
        # so a QoS 0 flood beyond what ingest keeps up with is dropped (QoS 0 allows it).
        if qos == 0 and self.inbox.qsize() > self.max_backlog:
            self.dropped_qos0 += 1
            return
        if self._full():
            self._make_room()
        size = len(payload)
        if size > MAX_PAYLOAD:
            payload = payload[:KEEP_OVERSIZED]
        interpret = self.interpret
        parsed = None if interpret is None else interpret(name, payload, size)
        self.inbox.put(
            _new_message(  # Message(...), without the call of its __new__ in Python
                Message,
                (
                    name,
                    payload,
                    mid,
                    qos,
                    generation,
                    size,
                    self.slot,
                    received,
                    self.epoch,
                    parsed,
                ),
            )
        )

    def _full(self) -> bool:
        """A window's worth waits for a batch: in the inbox, or sent behind the batch
        being committed (Room.held)."""
        return self.inbox.qsize() + self.room.held >= self.max_inbox

    def _make_room(self) -> None:
        """On paho's thread, with the inbox at the window: wait until the batcher takes
        a batch. The broker should never send more than the Receive Maximum unacked, but
        Mosquitto 2.0.11 overshoots it while acknowledgements flow (measured: 8,300
        queued here against a window of 1000), and over MQTT 3.1.1 the broker's own
        max_inflight_messages decides. Meanwhile the socket is not read, so TCP holds the
        broker back and the backlog stays in the broker, not here. The batcher drains the
        inbox without paho's thread (acks are only queued), so this ends with the next
        batch; if ingest is stalled, it lets one message in per quarter of the keepalive,
        so that paho's thread still keeps the connection alive. It waits on `room`,
        which the batcher makes whenever it takes a batch: woken at once, not polling."""
        if not self._full():
            return
        client = self._client
        if not isinstance(client, BulkReadClient):
            self.room.wait_for(
                lambda: not self._full() or self._stopping,
                self.settings.keepalive_s / 4,
            )
            return
        # paho's thread may be in the middle of a bulk read: after a wait (room made,
        # PUBACKs queued, or ingest stalled) it does what paho's loop did between two
        # packets: writes the PUBACKs queued meanwhile, sends a PINGREQ when one is due.
        # The batcher queues a batch's PUBACKs after it has taken the next batch (made
        # room): `ack_many` wakes this wait too, so they are not held for a commit.
        deadline = time.monotonic() + self.settings.keepalive_s / 4
        while True:
            self.room.wait_for(
                lambda: not self._full() or self._stopping or self._acked,
                max(0.0, deadline - time.monotonic()),
            )
            self._acked = False
            client.between_packets()
            # Room, a stop, or the connection found lost there (paho's thread reconnects).
            if not self._full() or self._stopping or client._sock is None:
                return
            if time.monotonic() >= deadline:
                return
