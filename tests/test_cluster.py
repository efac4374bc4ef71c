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
    wait_until,
)

pytestmark = pytest.mark.integration
STATUSES = [s.value for s in CHAIN]
LEASE_S = 4  # short leases keep the test short; failover takes about this long


class Cluster:
    """Instances sharing one database, each with its own folder and health port."""

    def __init__(self, root: Path, broker: Broker, onetablet: Sandbox, url: str) -> None:
        self.root, self.broker, self.onetablet, self.url = root, broker, onetablet, url
        self.count = 0

    def instance(self) -> Daemon:
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
                "COURIERD_STORE__URL": self.url,
                "COURIERD_CLUSTER__LEASE_S": str(LEASE_S),
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
        keys = {}
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
    a, b, c = (cluster.instance().start() for _ in range(3))
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
    for d in (b, c):
        assert d.stop() == 0


def test_a_paused_instance_is_fenced_off(cluster: Cluster) -> None:
    """An instance stopped (SIGSTOP) longer than its leases loses its sessions and claims
    to the other; continued, it commits nothing of what is no longer its share (no
    transition twice) and gives the sessions back, while every order completes in order."""
    a, b = cluster.instance().start(), cluster.instance().start()
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
    for d in (a, b):
        assert d.stop() == 0
