"""Several `courierd run` instances on one PostgreSQL database behave as one daemon
(CONTRACT.md 10): real processes, the local PostgreSQL, a Mosquitto on a free port."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from courierd.devtools.sandbox import Sandbox
from courierd.domain.lifecycle import CHAIN
from tests import pg
from tests.harness import (
    API_KEY,
    Broker,
    Daemon,
    Publisher,
    all_dropped_off,
    delivered,
    start_together,
    stop_together,
    wait_until,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration
STATUSES = [s.value for s in CHAIN]
LEASE_S = 4  # short leases keep the test short; failover takes about this long
# A fault outlasts what it must bring about by this much: three leases, every lease
# (heartbeat, slots, the sessions of those gone silent) runs out on every side by then.
FAULT_MARGIN_S = 3 * LEASE_S


class Cluster:
    """Instances sharing one database, each with its own folder and health port."""

    def __init__(self, root: Path, broker: Broker, onetablet: Sandbox, url: str) -> None:
        self.root, self.broker, self.onetablet, self.url = root, broker, onetablet, url
        self.count = 0

    def instance(self, url: str | None = None, lease_s: float = LEASE_S) -> Daemon:
        """A new instance (not started); `url` reaches the database another way (a proxy)."""
        self.count += 1
        folder = self.root / f"instance-{self.count}"
        folder.mkdir()
        return Daemon(
            folder,
            {
                "COURIERD_MQTT__URL": self.broker.url,
                "COURIERD_MQTT__CLIENT_ID": "courierd-cluster",
                "COURIERD_ONETABLET__BASE_URL": self.onetablet.url,
                "COURIERD_ONETABLET__API_KEY": API_KEY,
                "COURIERD_ONETABLET__RETRY_SCHEDULE_S": "[0.1, 0.2, 0.4]",
                "COURIERD_STORE__URL": url or self.url,
                "COURIERD_CLUSTER__LEASE_S": str(lease_s),
            },
        )


@pytest.fixture
def cluster(tmp_path: Path, onetablet: Sandbox) -> Iterator[Cluster]:
    if (why := pg.available()) is not None:
        pytest.skip(why)
    broker = Broker(tmp_path / "broker").start()
    with pg.database() as url:
        yield Cluster(tmp_path, broker, onetablet, url)
        from tests.harness import stop_all

        stop_all()  # the instances, before their database is dropped


def slots(d: Daemon) -> set[int]:
    code, body = d.health()
    return set(body.get("slots", [])) if code else set()


def publish_orders(broker: Broker, orders: list[str], done: threading.Event) -> None:
    """Each order through the chain, orders interleaved, at a steady pace."""
    pub = Publisher(broker.port, "cluster-couriers")
    for step, status in enumerate(STATUSES):
        for n, order in enumerate(orders):
            pub.status(f"c{n % 7}", f"{order}-{step}", order, status)
            time.sleep(0.004)  # pacing: a stream over a few seconds, not one burst
    pub.close()
    done.set()


def check_pushes(onetablet: Sandbox, orders: list[str], disruptions: int) -> None:
    """Every order's statuses arrived complete and in chain order, repeats keeping their
    Idempotency-Key.

    Only an order's head push is claimable, so an instance killed or paused had at most
    one push per order in flight: each order is repeated at most once per disruption.
    """
    got = delivered(onetablet)
    for order in orders:
        seq = [r.json["delivery_status"] for r in got[order]]
        deduped = [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]
        assert deduped == STATUSES, (order, seq)
        keys: dict[str, str] = {}
        for r in got[order]:
            key = keys.setdefault(r.json["delivery_status"], r.headers["idempotency-key"])
            assert r.headers["idempotency-key"] == key
        assert len(seq) - len(STATUSES) <= disruptions, (order, seq)


def test_three_instances_survive_losing_one_for_good_and_restarting_another(
    cluster: Cluster,
) -> None:
    """Three instances on one database share the broker's sessions. One is killed (-9)
    for good mid-stream, another killed and restarted: the survivors take over the dead
    one's sessions (queued and in-flight messages) and claims well within 60 s, and every
    order's pushes arrive complete, in order, with few repeats."""
    cluster.onetablet.faults.latency_ms = 5  # keep pushes in flight when the kills land
    a, b, c = start_together(*(cluster.instance() for _ in range(3)))
    wait_until(lambda: slots(a) | slots(b) | slots(c) == {0, 1, 2, 3}, 30, "slots shared out")
    orders = [f"k{i}" for i in range(60)]
    done = threading.Event()
    threading.Thread(target=publish_orders, args=(cluster.broker, orders, done)).start()
    wait_until(lambda: len(cluster.onetablet.requests()) >= 40, 30, "pushes flowing")
    lost = slots(a)
    a.kill()  # for good
    killed_at = time.monotonic()
    wait_until(lambda: slots(b) | slots(c) == {0, 1, 2, 3}, 60, "the dead instance's slots")
    assert lost <= slots(b) | slots(c)
    assert time.monotonic() - killed_at < 60
    b.kill()
    b = cluster.instance().start()  # rejoins, as a new member
    assert done.wait(60)
    assert cluster.onetablet.wait_for(lambda _: all_dropped_off(cluster.onetablet, orders), 90)
    check_pushes(cluster.onetablet, orders, disruptions=2)
    wait_until(lambda: slots(b) | slots(c) == {0, 1, 2, 3} and slots(b), 30, "b rejoined")
    assert stop_together(b, c) == [0, 0]


def test_a_paused_instance_is_fenced_off(cluster: Cluster) -> None:
    """An instance stopped (SIGSTOP) longer than its leases loses its sessions and claims
    to the other; continued, it commits nothing of what is no longer its share (no
    transition twice) and gives the sessions back, while every order completes in order."""
    a, b = start_together(cluster.instance(), cluster.instance())
    wait_until(lambda: slots(a) and slots(b), 30, "both holding slots")
    orders = [f"s{i}" for i in range(40)]
    done = threading.Event()
    threading.Thread(target=publish_orders, args=(cluster.broker, orders, done)).start()
    wait_until(lambda: len(cluster.onetablet.requests()) >= 20, 30, "pushes flowing")
    assert a.proc is not None
    tree = [a.proc.pid, *a.workers().values()]
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: slots(b) == {0, 1, 2, 3}, 30, "b taking a's sessions over")
    finally:
        for pid in tree:
            os.kill(pid, signal.SIGCONT)
    assert done.wait(60)
    assert cluster.onetablet.wait_for(lambda _: all_dropped_off(cluster.onetablet, orders), 90)
    check_pushes(cluster.onetablet, orders, disruptions=1)
    from courierd.config import StoreSettings
    from courierd.store import open_store

    store = open_store(StoreSettings(url=cluster.url), instance="check")
    counts = store.db.rows("SELECT order_id, count(*) FROM transitions GROUP BY order_id")
    store.close()
    assert {o: n for o, n in counts if o in orders} == {o: len(STATUSES) for o in orders}
    wait_until(lambda: slots(a) and slots(a) | slots(b) == {0, 1, 2, 3}, 60, "a back")
    assert not slots(a) & slots(b)
    assert stop_together(a, b) == [0, 0]


class Stream:
    """A steady stream of orders: one whole chain published every `every_s`, each order
    with the time its first status went out, until `stop()`."""

    def __init__(self, broker: Broker, prefix: str, every_s: float = 0.2) -> None:
        self.broker, self.prefix, self.every_s = broker, prefix, every_s
        self.published: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream")

    def start(self) -> Stream:
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(30)
        return list(self.published)

    def _run(self) -> None:
        pub = Publisher(self.broker.port, f"stream-{self.prefix}")
        n = 0
        while not self._stop.is_set():
            order, started = f"{self.prefix}{n}", time.time()
            for step, status in enumerate(STATUSES):
                pub.status(f"c{n % 7}", f"{order}-{step}", order, status)
            self.published[order] = started
            n += 1
            self._stop.wait(self.every_s)
        pub.close()


def done_within(onetablet: Sandbox, stream: Stream) -> dict[str, float]:
    """Seconds from each order's first publish to its first dropoff push."""
    got = delivered(onetablet)
    return {
        order: min(r.at for r in got[order] if r.json["delivery_status"] == "dropoff") - at
        for order, at in stream.published.items()
    }


def lines(d: Daemon, word: str) -> list[str]:
    return [ln for ln in d.log.read_text().splitlines() if word in ln]


def shared_out(*instances: Daemon) -> bool:
    """Every slot held, each by one instance, and every instance holding one."""
    held = [slots(d) for d in instances]
    return all(held) and sorted(s for h in held for s in h) == [0, 1, 2, 3]


def test_joining_scaling_out_and_a_rolling_restart_stall_nothing(cluster: Cluster) -> None:
    """Under a steady stream, two instances join one (scale-out), then all three are
    restarted one at a time (SIGTERM, start): shares are handed over at once, so every
    order is pushed complete, in order, within 5 s of being published; no session is
    ever kicked off the broker, and no instance logs an error."""
    cluster.onetablet.faults.latency_ms = 20
    first = cluster.instance(lease_s=15).start()
    wait_until(lambda: slots(first) == {0, 1, 2, 3}, 30, "the first instance holding all")
    stream = Stream(cluster.broker, "j").start()
    members = [first]
    try:
        for _ in range(2):  # scale-out
            members.append(cluster.instance(lease_s=15).start())
            wait_until(lambda: shared_out(*members), 30, "the newcomer's share")
        for i in range(3):  # a rolling restart
            assert members[i].stop() == 0
            members[i] = cluster.instance(lease_s=15).start()
            wait_until(lambda: shared_out(*members), 30, "the restarted instance's share")
    finally:
        orders = stream.stop()
    assert cluster.onetablet.wait_for(lambda _: all_dropped_off(cluster.onetablet, orders), 60)
    check_pushes(cluster.onetablet, orders, disruptions=3)
    took = done_within(cluster.onetablet, stream)
    slow = {o: round(t, 1) for o, t in took.items() if t > 5.0}
    assert not slow, (slow, len(took))
    everyone = [first, *members]
    assert not [ln for d in everyone for ln in lines(d, "ERROR")]
    assert not [ln for d in everyone for ln in lines(d, "mqtt.disconnected")]
    assert stop_together(*members) == [0, 0, 0]


def test_silent_instances_are_taken_over_and_come_back_without_harm(cluster: Cluster) -> None:
    """Under a steady stream, one instance is stopped (SIGSTOP) and another's path to
    PostgreSQL goes silent (no RST, its MQTT still up), both until three leases after the
    third took every session over (within 60 s): back, they commit nothing that is no
    longer theirs and never kick its sessions off. Then PostgreSQL is down for all, three
    leases long (health 503 meanwhile, 200 after). Every order is pushed complete, in
    order."""
    cluster.onetablet.faults.latency_ms = 5
    base, _, dbname = cluster.url.rpartition("/")
    host, _, port = base.rpartition(":")  # the suite's own PostgreSQL (tests/pg.py)
    proxies = [TcpProxy(int(port)).start() for _ in range(3)]
    try:
        a, b, c = start_together(*(cluster.instance(f"{host}:{p.port}/{dbname}") for p in proxies))
        wait_until(lambda: shared_out(a, b, c), 30, "slots shared out")
        stream = Stream(cluster.broker, "q").start()
        try:
            wait_until(lambda: len(cluster.onetablet.requests()) >= 20, 30, "pushes flowing")
            assert a.proc is not None
            stopped = [a.proc.pid, *a.workers().values()]
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            proxies[2].silence()
            began = time.monotonic()
            try:
                wait_until(lambda: slots(b) == {0, 1, 2, 3}, 60, "b taking every slot over")
                took_over = time.monotonic() - began
                # The fault goes on while b works their shares (the silent ones' MQTT
                # clients meanwhile kicked off, trying to come back): three leases.
                time.sleep(FAULT_MARGIN_S)  # the fault's length, not a synchronisation
            finally:
                for pid in stopped:
                    os.kill(pid, signal.SIGCONT)
                proxies[2].resume()
            wait_until(lambda: shared_out(a, b, c), 60, "a and c back with a share")
            outage = time.monotonic()
            for p in proxies:
                p.refuse()
            try:
                wait_until(lambda: b.health()[0] == 503, 15, "health 503 without the database")
                # The outage's length (not a synchronisation): every lease runs out.
                time.sleep(max(0.0, outage + FAULT_MARGIN_S - time.monotonic()))
            finally:
                for p in proxies:
                    p.resume()
            for d in (a, b, c):

                def healthy(d: Daemon = d) -> bool:
                    return d.health()[0] == 200

                wait_until(healthy, 60, "health 200 again")
        finally:
            orders = stream.stop()
        assert took_over < 60
        assert cluster.onetablet.wait_for(lambda _: all_dropped_off(cluster.onetablet, orders), 90)
        check_pushes(cluster.onetablet, orders, disruptions=3)
        from courierd.config import StoreSettings
        from courierd.store import open_store

        with open_store(StoreSettings(url=cluster.url), instance="check") as store:
            counts = store.db.rows("SELECT order_id, count(*) FROM transitions GROUP BY order_id")
        assert {o: n for o, n in counts if o in orders} == {o: len(STATUSES) for o in orders}
        assert not lines(b, "mqtt.disconnected")  # nobody kicked b's sessions off
        assert stop_together(a, b, c) == [0, 0, 0]
    finally:
        for p in proxies:
            p.stop()


def test_an_instance_the_cluster_refuses_exits_saying_why(cluster: Cluster) -> None:
    """The slot manager ending (here: refused for another `cluster.slots`) never goes
    unnoticed: the instance exits 1 with the reason, the cluster goes on."""
    a = cluster.instance().start()
    wait_until(lambda: slots(a) == {0, 1, 2, 3}, 30, "a holding every slot")
    odd = cluster.instance()
    odd.env["COURIERD_CLUSTER__SLOTS"] = "3"
    odd.start(wait_ready=False)
    assert odd.proc is not None
    assert odd.proc.wait(60) == 1
    assert lines(odd, "cluster.slots is 4 for this database but 3 here")
    assert slots(a) == {0, 1, 2, 3} and a.stop() == 0
