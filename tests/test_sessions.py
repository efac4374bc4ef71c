"""A cluster's MQTT sessions (daemon/sessions.py) against a real Mosquitto: fencing
tokens and acks travel with each message, and a grant that ran out is never outlived."""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from courierd.config import MqttSettings
from courierd.daemon.ipc import Grant
from courierd.daemon.sessions import RECONNECT_AFTER_S, SHARED_KINDS, Sessions
from courierd.edges import mqtt
from courierd.edges.mqtt import CLOSE_WAIT_S, Message, PlainEdgeClient
from tests.harness import Broker, Publisher, wait_until
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(url: str, inbox: queue.SimpleQueue[Message], clock: Clock) -> Sessions:
    """A cluster instance's sessions (client id "fleet"), on the test's clock."""
    return Sessions(
        MqttSettings(url=url, client_id="fleet"),
        inbox,
        receive_max=10,
        subscriptions=SHARED_KINDS,
        unsubscriptions=(),
        shared=True,
        monotonic=clock,
    )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Broker, Sessions, queue.SimpleQueue[Message], Clock]]:
    # Every packet in its log (`broker_log`), for a failure to show what the broker did.
    broker = Broker(tmp_path / "broker", listener_options="log_type all\n").start()
    inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
    clock = Clock()
    sessions = fleet(broker.url, inbox, clock)
    try:
        yield broker, sessions, inbox, clock
    finally:
        sessions.stop()
        broker.stop()


def broker_log(broker: Broker) -> str:
    return (broker.dir / "mosquitto.log").read_text(errors="replace")


def held_at(sessions: Sessions, clock: Clock, slots: dict[int, int]) -> None:
    sessions.grant(Grant(slots, clock.now + 30))
    wait_until(sessions.subscribed, 15, "the granted sessions subscribed")


def test_fences_and_acks_never_cross_connections(
    rig: tuple[Broker, Sessions, queue.SimpleQueue[Message], Clock],
) -> None:
    """A message carries the epoch and the connection it came through: once its slot is
    held under a new epoch, it is not committed under the new one, and its ack does not
    land on the new connection (the broker delivers it there again, until acked there)."""
    broker, sessions, inbox, clock = rig
    pub = Publisher(broker.port, "courier")
    held_at(sessions, clock, {0: 5})
    pub.status("c1", "e1", "o1", "dasher_confirmed")
    first = inbox.get(timeout=10)
    assert (first.slot, first.epoch) == (0, 5)
    held_at(sessions, clock, {0: 6})  # taken over again: a new connection
    again = inbox.get(timeout=10)  # unacked: the broker hands it to the session again
    assert (again.payload, again.epoch) == (first.payload, 6)
    assert again.generation != first.generation
    kept, fence = sessions.admit([first, again])
    assert kept == [again] and fence == {0: 6}
    sessions.ack_many([first])  # its connection is gone: acknowledges nothing
    held_at(sessions, clock, {0: 7})
    third = inbox.get(timeout=10)
    assert third.payload == first.payload and third.epoch == 7
    sessions.ack_many([third])
    held_at(sessions, clock, {0: 8})
    pub.status("c1", "sentinel", "o1", "arriving_at_store")
    assert b"sentinel" in inbox.get(timeout=10).payload  # acked: not delivered again
    pub.close()


def test_a_batch_is_acknowledged_on_each_messages_own_connection(
    rig: tuple[Broker, Sessions, queue.SimpleQueue[Message], Clock],
) -> None:
    """`ack_many` of a batch from two sessions (and a message of a connection since
    gone) acknowledges each on its own connection: once both are connected again, the
    broker hands none of them over again, only what is new."""
    broker, sessions, inbox, clock = rig
    pub = Publisher(broker.port, "courier")
    held_at(sessions, clock, {0: 1, 1: 1})
    got: list[Message] = []
    n = 0
    while {m.slot for m in got} != {0, 1} or len(got) < 10:
        pub.status(f"c{n}", f"e{n}", f"o{n}", "dasher_confirmed")
        got.append(inbox.get(timeout=10))
        n += 1
    stale = got[0]._replace(generation=-1)  # a connection since gone: acknowledges nothing
    sessions.ack_many([stale, *got])
    held_at(sessions, clock, {0: 2, 1: 2})  # new connections: the unacked would come again
    seen: list[Message] = []
    while {m.slot for m in seen if b"sentinel" in m.payload} != {0, 1}:
        pub.status("c1", f"sentinel{len(seen)}", "o1", "arriving_at_store")
        seen.append(inbox.get(timeout=10))
    # Each connection redelivers what it holds unacked before anything new.
    again = [m.payload for m in seen if b"sentinel" not in m.payload]
    assert not again, f"{again}\nMosquitto's log:\n{broker_log(broker)}"
    pub.close()


def test_a_grant_that_ran_out_disconnects_and_never_reconnects(
    rig: tuple[Broker, Sessions, queue.SimpleQueue[Message], Clock],
) -> None:
    """While a grant holds, a lost session is connected again; once it has run out (the
    database has not confirmed the slot), every session is dropped, health says so, and
    a session another client took over is left with it."""
    broker, sessions, _, clock = rig
    held_at(sessions, clock, {1: 3})

    def usurp() -> paho.Client:
        # Not connected again by paho itself: its own reconnect, racing the test's, would
        # replace the connection while the end asserts it is connected.
        other = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id="fleet-1",
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        other.connect("127.0.0.1", broker.port)
        other.loop_start()
        return other

    usurper = usurp()
    try:
        wait_until(lambda: not sessions.connected(), 10, "our session kicked off")
        sessions.tick()
        clock.now += RECONNECT_AFTER_S
        sessions.tick()  # the grant still holds: connected again (kicking the other)
        wait_until(sessions.subscribed, 15, "our session back")
        wait_until(lambda: not usurper.is_connected(), 10, "the other kicked off")
        usurper.loop_stop()
        usurper = usurp()
        wait_until(lambda: not sessions.connected(), 10, "our session kicked off again")
        wait_until(usurper.is_connected, 10, "the other connected again")
        clock.now += 30  # the grant runs out
        sessions.tick()
        assert sessions.held() == []
        assert "dropped" in (sessions.problem() or "")
        clock.now += RECONNECT_AFTER_S
        sessions.tick()
        sessions.grant(Grant({1: 3}, clock.now - 1))  # a stale grant (waited in a pipe)
        assert sessions.held() == []
        assert usurper.is_connected()
    finally:
        usurper.disconnect()
        usurper.loop_stop()


@pytest.fixture
def eight_behind_a_silent_proxy(
    tmp_path: Path,
) -> Iterator[tuple[Sessions, Clock]]:
    """Eight sessions held through a TCP proxy, which then stops forwarding (a broker
    that no longer answers, without closing anything)."""
    broker = Broker(tmp_path / "broker").start()
    proxy = TcpProxy(broker.port).start()
    clock = Clock()
    sessions = fleet(f"mqtt://127.0.0.1:{proxy.port}", queue.SimpleQueue(), clock)
    try:
        held_at(sessions, clock, {slot: 1 for slot in range(8)})
        proxy.silence()
        yield sessions, clock
    finally:
        sessions.stop()
        proxy.stop()
        broker.stop()


def test_a_stop_waits_for_an_unanswering_broker_once_not_once_per_session(
    eight_behind_a_silent_proxy: tuple[Sessions, Clock],
) -> None:
    """Each session waits up to CLOSE_WAIT_S after its DISCONNECT for the broker to close
    the connection (so its last PUBACKs are handled first). With a broker that no longer
    answers, the stop of a daemon holding eight sessions waits for them together: about
    one CLOSE_WAIT_S, not eight, one after another (systemd's stop timeout is 45 s and a
    cluster may hold 64)."""
    sessions, _ = eight_behind_a_silent_proxy
    started = time.monotonic()
    sessions.stop()
    took = time.monotonic() - started
    assert took < 4 * CLOSE_WAIT_S, f"stopping 8 sessions took {took:.1f} s"


def test_a_grant_running_out_drops_the_sessions_together(
    eight_behind_a_silent_proxy: tuple[Sessions, Clock],
) -> None:
    """The same when the grant runs out (the network, often, is what failed): the
    sessions are dropped with their waits overlapping, because meanwhile the lock they
    are dropped under holds back acknowledgements, fences and health."""
    sessions, clock = eight_behind_a_silent_proxy
    clock.now += 30  # past the grant
    started = time.monotonic()
    sessions.tick()
    took = time.monotonic() - started
    assert sessions.held() == []
    assert took < 4 * CLOSE_WAIT_S, f"dropping 8 sessions took {took:.1f} s"


@contextlib.contextmanager
def descriptors_past_1023() -> Iterator[None]:
    """Descriptors 0-1023 taken (copies of /dev/null), so that the next socket is past
    what `select.select` takes; the soft limit raised for them if need be."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip("cannot open 1100 files here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    null = os.open(os.devnull, os.O_RDONLY)
    taken = [null]
    try:
        while taken[-1] < 1023:
            taken.append(os.dup(null))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_stop_waits_for_the_broker_on_a_descriptor_past_1023(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edge client's socket past descriptor 1023: its gentle close still waits for
    the broker to close the connection (with `select.select` it gave up at once, the
    PUBACKs before free to be overtaken). The broker silent, the close waits; let
    through, the broker closes, and the close ends then, well before its deadline. (paho's own
    loop selects with `select.select` too, so the client is driven without its thread:
    `disconnect()` then writes the DISCONNECT and closes on the calling thread.)"""
    # A long wait, so that a busy machine's slow hop through the proxy is not taken for
    # a close that gave up at its deadline.
    monkeypatch.setattr(mqtt, "CLOSE_WAIT_S", 5.0)
    broker = Broker(tmp_path / "broker").start()
    proxy = TcpProxy(broker.port).start()
    try:
        with descriptors_past_1023():
            client = PlainEdgeClient(CallbackAPIVersion.VERSION2, client_id="far")
            client.connect("127.0.0.1", proxy.port)
            sock = client.socket()
            assert sock is not None and sock.fileno() > 1023
            wait_until(lambda: (client.loop_read(), client.is_connected())[1], 10, "connected")
            proxy.silence()
            client.gentle = True
            stopping = threading.Thread(target=client.disconnect)
            started = time.monotonic()
            stopping.start()
            stopping.join(1.0)
            assert stopping.is_alive(), "the close did not wait for the broker"
            proxy.resume()  # the DISCONNECT reaches the broker, which closes
            stopping.join(10)
            took = time.monotonic() - started
            assert not stopping.is_alive() and took < 4.0, took
            assert client.socket() is None
    finally:
        proxy.stop()
        broker.stop()


def test_a_client_collected_with_a_stop_begun_does_not_wait(tmp_path: Path) -> None:
    """paho's `__del__` closes the socket too: the garbage collector's close never waits
    for the broker (on whatever thread collects), only an explicit stop does."""
    broker = Broker(tmp_path / "broker").start()
    try:
        client = PlainEdgeClient(CallbackAPIVersion.VERSION2, client_id="dropped")
        client.connect("127.0.0.1", broker.port)  # open, no DISCONNECT: the broker keeps it
        client.gentle = True  # a stop begun, its DISCONNECT never written
        gone = weakref.ref(client)
        started = time.monotonic()
        del client  # the last reference: paho's __del__ runs here
        took = time.monotonic() - started
        assert gone() is None
        assert took < CLOSE_WAIT_S / 2, took
    finally:
        broker.stop()
