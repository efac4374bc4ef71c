"""courierd benchmark: one command, one run, figures and ratios against baselines.

Starts its own Mosquitto on a free port, the OneTablet sandbox and the daemon, then
measures (every ratio is against a baseline measured in the same run, on the same
broker, so machine noise cancels out):

1. ingest: bare paho QoS 1 subscribers that only count, over MQTT 5 and over 3.1.1 (the
   ceiling is the faster), versus courierd's durable ingest (acked after commit,
   synchronous=FULL), all draining the same backlog from persistent sessions; for
   ping-heavy (95 %) and status-only traffic, courierd over MQTT 5 (the default) and
   over 3.1.1; and ping-heavy again with 10k active orders that have places (every
   ping then goes through the geofence rules), as a ratio to the ratio without places;
2. pushes from a filled outbox (a burst of orders): against the local sandbox, beside
   raw httpx and raw aiohttp POSTs/s at the same concurrency; against a sandbox 100 ms
   and 300 ms away (`--latency-ms`), beside the bound concurrency / latency; each with
   the dispatch process's CPU time per delivered push; and courierd's own OneTablet
   client on each library it can run on (aiohttp, httpx, httpx over aiohttp), beside
   raw aiohttp: the figures behind the default;
3. end to end: status events published to a running daemon until every one is pushed,
   beside raw httpx and aiohttp POSTs/s;
4. latency: publish → POST p50/p99 for status events while 2k msg/s flow (95 % pings),
   with courierd's own stage histograms (receive, commit, claim, send, reply, record)
   and the harness's publisher lag, counted apart; and (latency_page) the same phase
   beside the same phase run while a client reads /v1/dashboard 20 times a second;
5. PostgreSQL: ingest and pushes with one instance, ingest with two; and a cluster of
   two under a steady stream: the slowest order when a member joins and when one stops
   cleanly, and the takeover after kill -9 and after SIGSTOP;
6. memory and start: RSS/PSS and time to ready with 100k active orders and 1M history
   rows, beside the same figures on a nearly empty database;
7. the lifecycle: `decide` per event versus a python-statemachine instance per event;
8. replay: 1M accepted fixes through the writer, then replayed (a figure, goal ≤ 30 s),
   and the bytes each accepted fix takes on disk.

Each ratio (and the latency p99) is the median of --repeats runs (3).
Usage: scripts/bench [--quick] [--only PHASES] [--repeats N] [--out FILE].
Figures go to stdout and to a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp  # here, not in the raw client: its import is no CPU of a POST
import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from courierd.config import ClusterSettings, OneTabletSettings, StoreSettings
from courierd.devtools.localbroker import LocalBroker, free_port
from courierd.domain.lifecycle import CHAIN, idempotency_key, push_body
from courierd.domain.model import iso
from courierd.edges.onetablet import call
from courierd.edges.onetablet_http import CLIENTS, OneTabletHttp
from courierd.store import open_store

KEY = "bench-key"
STATUSES = [s.value for s in CHAIN]
CONCURRENCY = OneTabletSettings().max_concurrency  # the daemon's default, and the baselines'
RECEIVE_MAX = 1000


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- workloads ---------------------------------------------------------------------------


PING_COURIERS = 10_000  # a fleet: every courier pings every 4 s of fix time
PING_T0 = time.time() - 86400  # fixes a day old: never "in the future", always newer


def messages(n: int, ping_share: float, tag: str) -> list[tuple[str, bytes]]:
    """n messages: pings from PING_COURIERS couriers and status events walking orders
    (of 200 couriers) through the chain.

    Statuses go out step by step across orders (every order's confirm, then every
    arriving, ...), spread evenly between the pings. Each courier's fixes move a few
    metres per ping and are 4 s apart, so the geofence filters accept them all.
    """
    n_status = round(n * (1 - ping_share))
    orders = max(1, -(-n_status // len(STATUSES)))
    statuses = [
        (
            f"couriers/c{o % 200}/status",
            json.dumps(
                {
                    "event_id": f"{tag}-{o}-{s}",
                    "order_id": f"{tag}-o{o}",
                    "status": STATUSES[s],
                    "ts": "2026-01-01T00:00:00Z",
                }
            ).encode(),
        )
        for s in range(len(STATUSES))
        for o in range(orders)
    ][:n_status]
    pings = [
        (
            f"couriers/c{i % PING_COURIERS}/location",
            json.dumps(
                {
                    "ts": iso(PING_T0 + 4 * (i // PING_COURIERS)),
                    "lat": 40.7 + (i // PING_COURIERS) * 2e-4,
                    "lng": -74.0 + (i % PING_COURIERS) * 1e-5,
                    "accuracy_m": 5.0,
                    "speed_mps": 7.1,
                    "heading": 90,
                }
            ).encode(),
        )
        for i in range(n - n_status)
    ]
    keyed = [(i / len(pings), m) for i, m in enumerate(pings)]
    keyed += [(k / len(statuses), m) for k, m in enumerate(statuses)]
    return [m for _, m in sorted(keyed, key=lambda pair: pair[0])]


PROTOCOLS = ("5", "3.1.1")  # the bare ceiling is the faster of the two, measured each run


def client(port: int, client_id: str, *, session: bool, protocol: str = "5") -> paho.Client:
    """A paho client; with `session`, a persistent one (MQTT 5: an expiry interval and
    our Receive Maximum; 3.1.1: clean_session=False, in flight bounded by the broker's
    max_inflight_messages)."""
    if protocol == "3.1.1":
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=not session,
        )
    else:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    if protocol == "3.1.1":
        c.connect("127.0.0.1", port)
        return c
    props = None
    if session:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = RECEIVE_MAX
    c.connect("127.0.0.1", port, clean_start=not session, properties=props)
    return c


def publish_all(port: int, msgs: list[tuple[str, bytes]]) -> float:
    """Publish QoS 1 and wait for every PUBACK; returns msgs/s (for information)."""
    done = threading.Event()
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1
        if acked[0] == len(msgs):
            done.set()

    c = client(port, f"bench-pub-{uuid.uuid4().hex[:6]}", session=False)
    c.on_publish = on_publish
    c.loop_start()
    start = time.perf_counter()
    for topic, payload in msgs:
        c.publish(topic, payload, qos=1)
    if not done.wait(300):
        raise RuntimeError(f"publisher: only {acked[0]} of {len(msgs)} acknowledged")
    rate = len(msgs) / (time.perf_counter() - start)
    c.disconnect()
    c.loop_stop()
    return rate


def register_bare(port: int, client_id: str, protocol: str = "5") -> None:
    c = client(port, client_id, session=True, protocol=protocol)
    c.loop_start()
    subscribed = threading.Event()
    c.on_subscribe = lambda *_: subscribed.set()
    c.subscribe([("couriers/#", 1), ("dispatch/assignments", 1)])
    subscribed.wait(10)
    c.disconnect()
    c.loop_stop()


def forget_daemon_sessions(broker: LocalBroker, client_id: str, pg_url: str | None) -> None:
    """End a daemon's persistent sessions: its one, or a cluster's slots'."""
    forget_session(broker.port, client_id)
    for slot in range(ClusterSettings().slots if pg_url else 0):
        forget_session(broker.port, f"{client_id}-{slot}")


def forget_session(port: int, client_id: str) -> None:
    """End a persistent session, so the broker stops queueing every later phase's
    messages for a subscriber that is gone (that load would skew the next figures)."""
    c = client(port, client_id, session=False)  # clean start, no expiry: ends at disconnect
    c.loop_start()
    c.disconnect()
    c.loop_stop()


def drain_bare(port: int, client_id: str, n: int, protocol: str = "5") -> float:
    """The ceiling: a QoS 1 subscriber that only counts, draining its queued backlog."""
    seen = [0]
    first = [0.0]
    done = threading.Event()

    def on_message(*_: Any) -> None:
        if seen[0] == 0:
            first[0] = time.perf_counter()
        seen[0] += 1
        if seen[0] >= n:
            done.set()

    c = client(port, client_id, session=True, protocol=protocol)
    c.on_message = on_message
    c.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"bare subscriber got {seen[0]} of {n}")
    elapsed = time.perf_counter() - first[0]
    c.disconnect()
    c.loop_stop()
    return (n - 1) / elapsed


# -- the sandbox and the daemon, each in its own process -------------------------------


class SandboxProc:
    """`courierd sandbox` in a subprocess, so no client shares its interpreter."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "courierd",
                "sandbox",
                "--port",
                str(self.port),
                "--api-key",
                KEY,
                *flags,
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.requests()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/requests?since={since}", timeout=30) as r:
            return list(json.loads(r.read()))

    def count(self) -> int:
        with urllib.request.urlopen(f"{self.url}/requests/count", timeout=10) as r:
            return int(json.loads(r.read())["count"])

    def wait_for_count(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


# -- the daemon as a subprocess ----------------------------------------------------------


class Courierd:
    running: list[Courierd] = []  # every daemon started, so main() can end them all

    def __init__(
        self,
        workdir: Path,
        broker: LocalBroker,
        onetablet_url: str,
        name: str,
        pg_url: str | None = None,
    ) -> None:
        self.dir = workdir
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COURIERD_")},
            "COURIERD_MQTT__URL": broker.url,
            "COURIERD_MQTT__CLIENT_ID": name,
            "COURIERD_ONETABLET__BASE_URL": onetablet_url,
            "COURIERD_ONETABLET__API_KEY": KEY,
            "COURIERD_STORE__PATH": str(workdir / "courierd.db"),
            "COURIERD_HTTP__LISTEN": f"127.0.0.1:{self.port}",
            "COURIERD_LOG__LEVEL": "WARNING",
        }
        if pg_url is not None:  # an instance of a cluster on PostgreSQL
            self.env["COURIERD_STORE__URL"] = pg_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait for /healthz 200; returns seconds from spawn to ready."""
        t0 = time.perf_counter()
        log = (self.dir / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "courierd", "run"], env=self.env, stdout=log, stderr=log
        )
        Courierd.running.append(self)
        while self.get("/healthz") is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"courierd exited; see {self.dir}/daemon.log")
            time.sleep(0.005)
        return time.perf_counter() - t0

    def get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def received(self) -> float:
        text = self.get("/metrics") or ""
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("courierd_messages_received_total")
        )

    def memory_mb(self) -> tuple[float, float]:
        """(RSS, PSS) of the daemon's processes added up: MQTT, ingest, dispatch and
        multiprocessing's resource tracker. PSS shares out the pages they have in
        common (the interpreter, libraries), so it is what the daemon really costs."""
        assert self.proc is not None
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        rss = pss = 0.0
        for pid in pids:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "Rss":
                    rss += int(value.split()[0]) / 1024
                elif key == "Pss":
                    pss += int(value.split()[0]) / 1024
        return rss, pss

    def cpu_s(self, name: str) -> float:
        """CPU seconds (user + system) used so far by the daemon's process named `name`
        (courierd, courierd-ingest, courierd-push: see daemon/ipc.py)."""
        used = self.cpu_by_process()
        if name not in used:
            raise RuntimeError(f"no process named {name}")
        return used[name]

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds used so far by each of the daemon's named processes."""
        used: dict[str, float] = {}
        for pid in self.tree():
            with contextlib.suppress(FileNotFoundError):  # a process that just ended
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                if name.startswith("courierd"):  # not multiprocessing's resource tracker
                    used[name] = process_cpu_s(pid)
        return used

    def tree(self) -> list[int]:
        """The daemon's processes: the MQTT process and its workers."""
        assert self.proc is not None
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def pause(self) -> None:
        for pid in self.tree():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.tree():
            os.kill(pid, signal.SIGCONT)

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(60)


def wait_for_shares(daemons: list[Courierd], timeout: float = 300) -> None:
    """Until every instance of a cluster holds MQTT slots (each its share)."""
    deadline = time.monotonic() + timeout
    while not all(json.loads(d.get("/healthz") or "{}").get("slots") for d in daemons):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster's instances did not share the slots out")
        time.sleep(0.5)


WARM_UP = 0.1  # the first tenth of a backlog overlaps the daemon's start: not counted


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain_courierd(
    daemons: list[Courierd], n: int, others: dict[str, int], *, resume: bool = False
) -> tuple[float, dict[str, int]]:
    """courierd's durable ingest rate over a queued backlog (counted after commit), by
    one daemon (started now) or a cluster's paused instances (`resume`d together), and
    the CPU µs per message of each process meanwhile: the daemon's and `others` (name →
    pid: the broker, the sandbox). The clock starts once a tenth is in: the worker
    processes' imports (about 1 s of CPU) are a cost of starting, not of ingest."""

    def cpu() -> Counter[str]:
        used: Counter[str] = Counter({name: process_cpu_s(pid) for name, pid in others.items()})
        for daemon in daemons:
            used.update(daemon.cpu_by_process())
        return used

    for daemon in daemons:
        daemon.resume() if resume else daemon.start()
    first_t, first_n = 0.0, 0.0
    first_cpu: Counter[str] = Counter()
    deadline = time.monotonic() + 600
    while True:
        got = sum(daemon.received() for daemon in daemons)
        now = time.perf_counter()
        if got >= WARM_UP * n and not first_t:
            first_t, first_n, first_cpu = now, got, cpu()
        if got >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"courierd ingested {got} of {n}")
        time.sleep(0.1)  # scraping /metrics costs the daemon CPU: not too often
    used = cpu()
    used.subtract(first_cpu)
    per_msg = {name: round(seconds / (n - first_n) * 1e6) for name, seconds in used.items()}
    return (n - first_n) / (now - first_t), per_msg


# -- measurements ------------------------------------------------------------------------


def geofenced_orders(settings: StoreSettings, n: int) -> None:
    """One active order per pinging courier, with a pickup and a dropoff: every ping is
    screened and run through that order's geofence rules (the couriers stay far from
    the store, so nothing fires: the cost measured is the evaluation itself)."""
    store = open_store(settings)
    db = store.db
    with db.transaction():
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at, status_at, "
            "pickup_lat, pickup_lng, pickup_radius_m, dropoff_lat, dropoff_lng) "
            "VALUES (?, 'dasher_confirmed', ?, 'x', ?, 41.5, -73.0, 80, 41.6, -73.1)",
            ((f"geo{c}", f"c{c}", iso(PING_T0)) for c in range(n)),
        )
    store.close()


def ingest(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    n: int,
    ping_share: float,
    label: str,
    places: int = 0,
    pg_url: str | None = None,
    instances: int = 1,
    protocol: str | None = None,
) -> dict[str, float]:
    more = f", {places:,} active orders with places" if places else ""
    where = "" if pg_url is None else f", PostgreSQL x{instances}"
    over = f", courierd over MQTT {protocol}" if protocol else ""
    say(f"ingest ({label}): {n} messages, {ping_share:.0%} pings{more}{where}{over}")
    bare_ids = {p: f"bench-bare-{label}-{p}" for p in PROTOCOLS}
    for p, bare_id in bare_ids.items():
        register_bare(broker.port, bare_id, p)
    work = root / f"ingest-{label}"
    work.mkdir()
    assert broker.proc is not None
    others = {"mosquitto": broker.proc.pid, "sandbox": sandbox.proc.pid}
    daemons = []
    for i in range(instances):
        folder = work / f"instance-{i}"
        folder.mkdir()
        daemons.append(Courierd(folder, broker, sandbox.url, f"bench-courierd-{label}", pg_url))
    for daemon in daemons:
        daemon.env["COURIERD_CLUSTER__LEASE_S"] = "120"  # pauses below stay well inside it
        if protocol:
            daemon.env["COURIERD_MQTT__PROTOCOL"] = protocol
        daemon.start()  # registers its persistent sessions (a cluster: its slots')
    if places:
        store = StoreSettings(path=daemons[0].dir / "courierd.db")
        geofenced_orders(StoreSettings(url=pg_url) if pg_url else store, places)
    if instances == 1:
        daemons[0].stop()
        publish_rate = publish_all(broker.port, messages(n, ping_share, label))
        bare = {p: drain_bare(broker.port, bare_ids[p], n, p) for p in PROTOCOLS}
        rate, cpu_us = drain_courierd(daemons, n, others)
    else:
        # A cluster must share the backlog as it would in use: wait until every instance
        # holds its slots, then pause them all (SIGSTOP: the broker queues in their
        # sessions) while the backlog is published, and let them drain it together.
        wait_for_shares(daemons)
        for daemon in daemons:
            daemon.pause()
        publish_rate = publish_all(broker.port, messages(n, ping_share, label))
        bare = {p: drain_bare(broker.port, bare_ids[p], n, p) for p in PROTOCOLS}
        rate, cpu_us = drain_courierd(daemons, n, others, resume=True)
    for daemon in daemons:
        daemon.stop()
    for bare_id in bare_ids.values():
        forget_session(broker.port, bare_id)
    forget_daemon_sessions(broker, f"bench-courierd-{label}", pg_url)
    ceiling = max(bare.values())
    bares = ", ".join(f"MQTT {p} {r:,.0f}" for p, r in bare.items())
    say(f"  bare paho {bares} msg/s; courierd {rate:,.0f} msg/s ({rate / ceiling:.2f}x)")
    say("  CPU µs per message: " + ", ".join(f"{k} {v}" for k, v in sorted(cpu_us.items())))
    return {
        "messages": n,
        "publish_rate": round(publish_rate),
        **{f"bare_mqtt{p.replace('.', '')}_msgs_per_s": round(r) for p, r in bare.items()},
        "ceiling_msgs_per_s": round(ceiling),
        "courierd_msgs_per_s": round(rate),
        "cpu_us_per_msg": cpu_us,
        "ratio": round(rate / ceiling, 3),
    }


def fill_outbox(settings: StoreSettings, orders: int, prefix: str) -> int:
    """Commit `orders` x 5 pending pushes straight into a database, as ingest would."""
    from courierd.domain.model import Status, StatusEvent

    store = open_store(settings)
    events = [
        StatusEvent(f"{prefix}{o}-{s}", f"{prefix}{o}", "c1", Status(STATUSES[s]))
        for s in range(len(STATUSES))
        for o in range(orders)
    ]
    for i in range(0, len(events), 5000):
        store.writer.commit(events[i : i + 5000], now=time.time())
    store.close()
    return len(events)


@dataclass(frozen=True)
class RawPosts:
    """Bare POSTs: how many per second, and the client's CPU ms per POST."""

    per_s: float
    cpu_ms: float


def raw_posts(url: str, n: int, concurrency: int, kind: str) -> RawPosts:
    """Bare delivery-status POSTs at `concurrency`: sync httpx on as many threads, or
    aiohttp on one asyncio loop. The baselines of the push figures, rate and CPU (this
    process does nothing else meanwhile: its CPU time is the client's)."""
    cpu0 = time.process_time()
    rate = _raw_rate(url, n, concurrency, kind)
    return RawPosts(rate, (time.process_time() - cpu0) / n * 1000)


def _raw_rate(url: str, n: int, concurrency: int, kind: str) -> float:
    body = push_body(CHAIN[0], {"full_name": "Bench Courier"})
    tag = uuid.uuid4().hex[:6]
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, limits=limits) as c:

            def post(i: int) -> None:
                key = idempotency_key(f"raw{tag}{i}", CHAIN[0])
                c.post(
                    f"/orders/raw{tag}{i}/delivery-status",
                    content=body,
                    headers={"idempotency-key": key},
                )

            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(post, range(n)))
            return n / (time.perf_counter() - start)

    async def run() -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(headers={"x-api-key": KEY}, connector=connector) as s:
            gate = asyncio.Semaphore(concurrency)

            async def post(i: int) -> None:
                key = idempotency_key(f"raw{tag}{i}", CHAIN[0])
                async with (
                    gate,
                    s.post(
                        f"{url}/orders/raw{tag}{i}/delivery-status",
                        data=body,
                        headers={"idempotency-key": key, "content-type": "application/json"},
                    ) as r,
                ):
                    await r.read()

            start = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(n)))
            return n / (time.perf_counter() - start)

    return asyncio.run(run())


def client_posts(url: str, n: int, concurrency: int, client: str) -> RawPosts:
    """`n` delivery-status calls through courierd's own client at `concurrency`:
    `OneTabletHttp` (the policy: origin check, whole-request deadline, no redirects) with
    `client` underneath, and the reading of each reply, on one asyncio loop."""
    body = push_body(CHAIN[0], {"full_name": "Bench Courier"}).encode()
    tag = uuid.uuid4().hex[:6]

    async def run() -> float:
        http = OneTabletHttp(url, KEY, deadline_s=30.0, max_connections=concurrency, client=client)
        gate = asyncio.Semaphore(concurrency)

        async def post(i: int) -> None:
            order = f"cl{tag}{i}"
            path = f"/orders/{order}/delivery-status"
            headers = {"idempotency-key": idempotency_key(order, CHAIN[0])}
            async with gate:
                await call(http, path, order, body, headers, time.time)

        try:
            start = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(n)))
            return n / (time.perf_counter() - start)
        finally:
            await http.close()

    cpu0 = time.process_time()
    rate = asyncio.run(run())
    return RawPosts(rate, (time.process_time() - cpu0) / n * 1000)


def transports(url: str, n: int, raw_aio: RawPosts) -> dict[str, dict[str, float]]:
    """courierd's client on each library it can run on (`onetablet_http.CLIENTS`), set
    against raw aiohttp measured in the same run: the figures behind the default.
    httpx's own transport is slow enough that a tenth of the calls tells its cost."""
    out: dict[str, dict[str, float]] = {}
    for client in CLIENTS:
        got = client_posts(url, max(n // 10, 50) if client == "httpx" else n, CONCURRENCY, client)
        over = got.cpu_ms / raw_aio.cpu_ms
        say(
            f"  client {client}: {got.per_s:,.0f}/s, {got.cpu_ms:.2f} ms CPU per call "
            f"({over:.2f}x raw aiohttp's {raw_aio.cpu_ms:.2f} ms)"
        )
        out[client] = {
            "per_s": round(got.per_s),
            "cpu_ms_per_call": round(got.cpu_ms, 3),
            "cpu_over_raw_aiohttp": round(over, 3),
        }
    return out


def deliver_backlog(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    n: int,
    label: str,
    pg_url: str | None = None,
) -> tuple[float, float]:
    """A daemon started on an outbox of `n` pending pushes (a burst of orders, five
    statuses each): (pushes/s from its first to its last call, the dispatch process's
    CPU ms per delivered push)."""
    work = root / f"pushes-{label}"
    work.mkdir()
    settings = StoreSettings(url=pg_url) if pg_url else StoreSettings(path=work / "courierd.db")
    total = fill_outbox(settings, n // len(STATUSES), label)
    before = sandbox.count()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-{label}", pg_url)
    daemon.start()
    cpu0 = daemon.cpu_s("courierd-push")
    if not sandbox.wait_for_count(before + total, 600):
        raise RuntimeError("courierd did not deliver every push")
    cpu = daemon.cpu_s("courierd-push") - cpu0
    daemon.stop()
    forget_daemon_sessions(broker, f"bench-courierd-{label}", pg_url)
    times = [r["at"] for r in sandbox.requests(before)]
    return (len(times) - 1) / (max(times) - min(times)), cpu / total * 1000


def pushes(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    n: int,
    label: str,
    pg_url: str | None = None,
) -> dict[str, float]:
    """A backlog of pushes against the local sandbox, next to bare POSTs at the same
    concurrency (sync httpx, the goal's baseline; aiohttp, the push path's client)."""
    where = "" if pg_url is None else ", PostgreSQL"
    say(f"pushes: {n} delivery-status calls, concurrency {CONCURRENCY}{where}")
    raw = raw_posts(sandbox.url, n, CONCURRENCY, "httpx")
    raw_aio = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
    clients = transports(sandbox.url, n, raw_aio) if pg_url is None else {}
    rate, cpu_ms = deliver_backlog(broker, sandbox, root, n, label, pg_url)
    return {"pushes": n, **against_bare_clients(rate, cpu_ms, raw, raw_aio), "clients": clients}


def against_bare_clients(
    rate: float, cpu_ms: float, raw: RawPosts, raw_aio: RawPosts
) -> dict[str, float]:
    """courierd's pushes/s and its dispatch process's CPU per push, set against bare
    httpx and aiohttp POSTs in the same run (the CPU goal, 0.5 ms, was set where raw
    httpx cost 1 ms; an absolute time moves with the shared machine's load, a ratio holds)."""
    say(
        f"  raw httpx {raw.per_s:,.0f}/s, raw aiohttp {raw_aio.per_s:,.0f}/s, "
        f"courierd {rate:,.0f}/s ({rate / raw.per_s:.2f}x httpx, "
        f"{rate / raw_aio.per_s:.2f}x aiohttp)"
    )
    say(
        f"  dispatch CPU {cpu_ms:.2f} ms/push; bare clients' CPU per POST: httpx "
        f"{raw.cpu_ms:.2f} ms, aiohttp {raw_aio.cpu_ms:.2f} ms "
        f"(dispatch = {cpu_ms / raw.cpu_ms:.2f}x httpx, {cpu_ms / raw_aio.cpu_ms:.2f}x aiohttp)"
    )
    return {
        "raw_httpx_per_s": round(raw.per_s),
        "raw_aiohttp_per_s": round(raw_aio.per_s),
        "courierd_per_s": round(rate),
        "ratio": round(rate / raw.per_s, 3),
        "ratio_to_aiohttp": round(rate / raw_aio.per_s, 3),
        "dispatch_cpu_ms_per_push": round(cpu_ms, 3),
        "raw_httpx_cpu_ms_per_post": round(raw.cpu_ms, 3),
        "raw_aiohttp_cpu_ms_per_post": round(raw_aio.cpu_ms, 3),
        "dispatch_cpu_over_httpx": round(cpu_ms / raw.cpu_ms, 3),
        "dispatch_cpu_over_aiohttp": round(cpu_ms / raw_aio.cpu_ms, 3),
    }


def remote_pushes(
    broker: LocalBroker, root: Path, n: int, latency_ms: int, label: str
) -> dict[str, float]:
    """A burst of orders against a OneTablet `latency_ms` away (`courierd sandbox
    --latency-ms`), next to bare aiohttp POSTs at the same concurrency, and the bound
    that concurrency sets (places in flight / latency)."""
    say(f"pushes to a OneTablet {latency_ms} ms away: {n} calls, concurrency {CONCURRENCY}")
    sandbox = SandboxProc("--latency-ms", str(latency_ms))
    try:
        raw = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
        clients = transports(sandbox.url, n // 4, raw)
        rate, cpu_ms = deliver_backlog(broker, sandbox, root, n, label)
    finally:
        sandbox.stop()
    bound = CONCURRENCY / (latency_ms / 1000)
    say(
        f"  bound {bound:,.0f}/s, raw aiohttp {raw.per_s:,.0f}/s, courierd {rate:,.0f}/s "
        f"({rate / raw.per_s:.2f}x); dispatch CPU {cpu_ms:.2f} ms/push "
        f"({cpu_ms / raw.cpu_ms:.2f}x raw aiohttp's {raw.cpu_ms:.2f} ms per POST)"
    )
    return {
        "pushes": n,
        "latency_ms": latency_ms,
        "bound_per_s": round(bound),
        "raw_aiohttp_per_s": round(raw.per_s),
        "courierd_per_s": round(rate),
        "ratio": round(rate / raw.per_s, 3),
        "dispatch_cpu_ms_per_push": round(cpu_ms, 3),
        "raw_aiohttp_cpu_ms_per_post": round(raw.cpu_ms, 3),
        "dispatch_cpu_over_aiohttp": round(cpu_ms / raw.cpu_ms, 3),
        "clients": clients,
    }


def together(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, n: int, label: str
) -> dict[str, float]:
    """Ingest and pushes at once: `n` status events (orders walking the chain) published
    as fast as the broker takes them to a running daemon, until every push is made;
    next to bare POSTs of as many calls at the same concurrency."""
    say(f"end to end: {n} status events published, ingested and pushed")
    raw = raw_posts(sandbox.url, n, CONCURRENCY, "httpx")
    raw_aio = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
    work = root / f"together-{label}"
    work.mkdir()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-{label}")
    daemon.start()
    msgs = messages(n, 0.0, label)
    before = sandbox.count()
    cpu0 = daemon.cpu_s("courierd-push")
    start = time.time()
    publish_all(broker.port, msgs)
    if not sandbox.wait_for_count(before + n, 600):
        raise RuntimeError("courierd did not push every status")
    cpu = daemon.cpu_s("courierd-push") - cpu0
    daemon.stop()
    forget_session(broker.port, f"bench-courierd-{label}")
    rate = n / (max(r["at"] for r in sandbox.requests(before)) - start)
    return {"statuses": n, **against_bare_clients(rate, cpu / n * 1000, raw, raw_aio)}


STAGES = ("receive", "commit", "claim", "send", "reply", "record")


def stage_quantiles(metrics: str, q: float) -> dict[str, float]:
    """Per stage, the q-quantile (ms) of courierd_latency_stage_seconds, interpolated
    within its buckets the way Prometheus' histogram_quantile does."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in metrics.splitlines():
        if not line.startswith("courierd_latency_stage_seconds_bucket{"):
            continue
        labels, value = line[line.index("{") + 1 :].split("} ")
        fields = dict(part.split("=", 1) for part in labels.split(","))
        le = float(fields["le"].strip('"'))
        buckets.setdefault(fields["stage"].strip('"'), []).append((le, float(value)))
    out = {}
    for stage, counts in buckets.items():
        counts.sort()
        total = counts[-1][1]
        if not total:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for le, count in counts:
            if count >= rank:
                upper = le if le != float("inf") else lower
                share = (rank - below) / (count - below) if count > below else 0.0
                out[stage] = round((lower + (upper - lower) * share) * 1000, 2)
                break
            lower, below = le, count
    return {stage: out[stage] for stage in STAGES if stage in out}


def p99_of(ordered: list[float]) -> float:
    """The 99th percentile of a sorted list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latency(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    seconds: float,
    label: str = "",
    rate: int = 2000,
    beside: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """publish → POST for status events while pings flow at `rate` msg/s in all; where
    the time goes, from courierd's own stage histograms; and how far the harness's
    publisher fell behind its schedule (not courierd's: delays start at the publish call).
    `beside(http_port)`, if given, runs around the publishing (a page reader)."""
    say(f"latency: {seconds:.0f} s at {rate} msg/s (95% pings), publish → POST")
    work = root / f"latency{label}"
    work.mkdir()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-latency{label}")
    daemon.start()
    c = client(broker.port, "bench-latency-pub", session=False)
    c.loop_start()
    around = beside(daemon.port) if beside else contextlib.nullcontext()
    around.__enter__()
    sent: dict[tuple[str, str], float] = {}
    lags: list[float] = []
    tick, per_tick = 0.01, rate // 100
    start = time.perf_counter()
    next_tick, i = start, 0
    before = sandbox.count()
    while time.perf_counter() - start < seconds:
        lags.append(time.perf_counter() - next_tick)
        for _ in range(per_tick):
            i += 1
            if i % 20 == 0:  # 5 % status events, each order walking the chain
                o, s = divmod(i // 20, len(STATUSES))
                order = f"lat{label}-{o}"
                payload = json.dumps(
                    {"event_id": f"lat-{i}", "order_id": order, "status": STATUSES[s]}
                ).encode()
                sent[(order, STATUSES[s])] = time.time()
                c.publish(f"couriers/c{o % 200}/status", payload, qos=1)
            else:
                c.publish(
                    f"couriers/c{i % 200}/location",
                    json.dumps({"ts": "2026-01-01T00:00:00Z", "lat": 40.7, "lng": -74.0}).encode(),
                    qos=1,
                )
        next_tick += tick
        time.sleep(max(0.0, next_tick - time.perf_counter()))
    achieved = i / (time.perf_counter() - start)
    around.__exit__(None, None, None)
    sandbox.wait_for_count(before + len(sent), 30)
    metrics = daemon.get("/metrics") or ""
    daemon.stop()
    forget_session(broker.port, f"bench-courierd-latency{label}")
    c.disconnect()
    c.loop_stop()
    arrivals = [
        ((r["order_id"], json.loads(r["body"])["delivery_status"]), r["at"])
        for r in sandbox.requests(before)
    ]
    delays = sorted((at - sent[key]) * 1000 for key, at in arrivals if key in sent)
    p50 = statistics.median(delays)
    p99 = p99_of(delays)
    lag_p99 = p99_of(sorted(lags)) * 1000
    stages50, stages99 = stage_quantiles(metrics, 0.5), stage_quantiles(metrics, 0.99)
    say(
        f"  {len(delays)} status pushes: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"(offered {achieved:,.0f} msg/s; harness behind schedule p99 {lag_p99:.1f} ms)"
    )
    say("  stages p50/p99 ms: " + ", ".join(f"{k} {stages50[k]}/{v}" for k, v in stages99.items()))
    return {
        "offered_msgs_per_s": round(achieved),
        "samples": len(delays),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "harness_lag_p99_ms": round(lag_p99, 2),
        "stages_p50_ms": stages50,
        "stages_p99_ms": stages99,
    }


class PageReader:
    """What an operator's page and dispatch tools do, harder: GET /v1/dashboard `rate`
    times a second, on a thread, for as long as it is entered."""

    def __init__(self, port: int, rate: float = 20) -> None:
        self.url, self.every = f"http://127.0.0.1:{port}/v1/dashboard", 1 / rate
        self.times: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-reader")

    def __enter__(self) -> PageReader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.perf_counter()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.times.append(time.perf_counter() - t0)
            except OSError:
                self.failed += 1
            due += self.every
            self._stop.wait(max(0.0, due - time.perf_counter()))


def latency_beside_page(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, seconds: float, label: str
) -> dict[str, Any]:
    """The latency phase alone, then again while a client reads /v1/dashboard 20 times a
    second: the HTTP process serves it, so ingest and pushes should not notice."""
    alone = latency(broker, sandbox, root, seconds, f"alone{label}")
    readers: list[PageReader] = []

    def reader(port: int) -> PageReader:
        readers.append(PageReader(port))
        return readers[-1]

    read = latency(broker, sandbox, root, seconds, f"page{label}", beside=reader)
    times = sorted(readers[0].times)
    say(
        f"  with the page reader: {len(times)} dashboards, p50 "
        f"{statistics.median(times) * 1000:.1f} ms, {readers[0].failed} failed"
    )
    return {
        "p99_ms_alone": alone["p99_ms"],
        "p99_ms_with_page": read["p99_ms"],
        "p50_ms_alone": alone["p50_ms"],
        "p50_ms_with_page": read["p50_ms"],
        "ratio": round(read["p99_ms"] / alone["p99_ms"], 3),
        "dashboards_read": len(times),
        "dashboard_p50_ms": round(statistics.median(times) * 1000, 2),
        "dashboard_failures": readers[0].failed,
        "goal": "p99 with the page reader within noise of without (ratio near 1)",
    }


def big_database(path: Path, active: int, history: int) -> None:
    """`active` orders mid-chain and `history` delivered transitions/pushes, by bulk SQL."""
    store = open_store(StoreSettings(path=path))
    done_orders = history // len(STATUSES)
    now = time.time()
    db = store.db
    with db.transaction():
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) VALUES (?, ?, ?, 'x')",
            ((f"a{o}", "arrived_at_store", f"c{o % 500}") for o in range(active)),
        )
        db.executemany(
            "INSERT INTO orders (order_id, state, courier_id, updated_at) "
            "VALUES (?, 'dropoff', ?, 'x')",
            ((f"d{o}", f"c{o % 500}") for o in range(done_orders)),
        )
        rows = ((f"d{o}", STATUSES[s]) for o in range(done_orders) for s in range(len(STATUSES)))
        db.executemany(
            "INSERT INTO transitions (order_id, status, inferred, event_id, at, recorded_at) "
            "VALUES (?, ?, 0, NULL, 'x', 'x')",
            rows,
        )
        rows = ((f"d{o}", STATUSES[s]) for o in range(done_orders) for s in range(len(STATUSES)))
        db.executemany(
            "INSERT INTO outbox (order_id, status, body, idempotency_key, state, attempts, "
            "next_attempt_at, created_at, delivered_at) "
            "VALUES (?1, ?2, '{}', ?1 || '/' || ?2, 'delivered', 1, 0, ?3, ?3)",
            ((o, s, now) for o, s in rows),
        )
        db.executemany(
            "INSERT INTO processed_events (order_id, event_id) VALUES (?, ?)",
            ((f"h{i}", f"h{i}") for i in range(history)),
        )
    store.close()


def memory_and_start(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, active: int, history: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, a, h in (("small", 1000, 5000), ("large", active, history)):
        work = root / f"mem-{label}"
        work.mkdir()
        say(f"memory/start ({label}): {a:,} active orders, {h:,} history rows")
        big_database(work / "courierd.db", a, h)
        daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-mem-{label}")
        ready = daemon.start()
        idle = daemon.memory_mb()
        # Move 5,000 of the active orders on and let the pushes go out.
        before = sandbox.count()
        msgs = [
            (
                f"couriers/c{o % 500}/status",
                json.dumps(
                    {"event_id": f"m-{label}-{o}", "order_id": f"a{o}", "status": "dropoff"}
                ).encode(),
            )
            for o in range(min(a, 2500))
        ]
        publish_all(broker.port, msgs)
        sandbox.wait_for_count(before + 2 * len(msgs), 120)
        busy = daemon.memory_mb()
        daemon.stop()
        forget_session(broker.port, f"bench-courierd-mem-{label}")
        say(
            f"  ready in {ready:.2f} s; RSS/PSS idle {idle[0]:.0f}/{idle[1]:.0f} MB, "
            f"after traffic {busy[0]:.0f}/{busy[1]:.0f} MB"
        )
        out |= {
            f"{label}_ready_s": round(ready, 3),
            f"{label}_rss_idle_mb": round(idle[0], 1),
            f"{label}_pss_idle_mb": round(idle[1], 1),
            f"{label}_rss_busy_mb": round(busy[0], 1),
            f"{label}_pss_busy_mb": round(busy[1], 1),
        }
    return out


def lifecycle_cost(events: int = 20_000) -> dict[str, float]:
    """µs per event: `decide` on the table read off the machine, versus binding a
    python-statemachine instance to the order and sending the event (what decide avoids)."""
    from courierd.domain.lifecycle import DeliveryLifecycle, decide
    from courierd.domain.model import Order, Status, StatusEvent

    say(f"lifecycle: {events:,} events through decide() and through the machine")
    statuses = [Status(STATUSES[i % len(STATUSES)]) for i in range(events)]

    class Model:
        state = "new"

    start = time.perf_counter()
    order = None
    for i, status in enumerate(statuses):
        d = decide(
            order,
            StatusEvent(f"e{i}", "o", "c", status),
            duplicate=False,
            profile=None,
            received_at="2026-01-01T00:00:00.000Z",
        )
        order = d.order if status is not CHAIN[-1] else Order("o")
    table_us = (time.perf_counter() - start) / events * 1e6
    start = time.perf_counter()
    for status in statuses:
        model = Model()
        model.state = "new" if status is CHAIN[0] else CHAIN[CHAIN.index(status) - 1].value
        DeliveryLifecycle(model=model, state_field="state").send("advance")
    machine_us = (time.perf_counter() - start) / events * 1e6
    say(
        f"  decide {table_us:.1f} µs/event, machine {machine_us:.1f} µs/event "
        f"({machine_us / table_us:.0f}x)"
    )
    return {
        "decide_us": round(table_us, 2),
        "machine_us": round(machine_us, 2),
        "ratio": round(machine_us / table_us, 1),
    }


def postgres_phases(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    scale: float,
    reps: range,
    server: str,
) -> dict[str, Any]:
    """One instance on PostgreSQL (ingest, pushes) and two instances (ingest), each run
    on a database of its own, made and dropped here."""
    import psycopg

    out: dict[str, Any] = {}
    admin = psycopg.connect(server, autocommit=True)

    def fresh(tag: str) -> str:
        name = f"courierd_bench_{int(time.time())}_{tag}"
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        made.append(name)
        return server.rsplit("/", 1)[0] + f"/{name}"

    made: list[str] = []
    try:
        n = int(40_000 * scale)
        out["ingest_pg"] = median_run(
            [ingest(broker, sandbox, root, n, 0.95, f"pg{i}", pg_url=fresh(f"i{i}")) for i in reps]
        )
        out["ingest_pg2"] = median_run(
            [
                ingest(
                    broker, sandbox, root, n, 0.95, f"pgx{i}", pg_url=fresh(f"x{i}"), instances=2
                )
                for i in reps
            ]
        )
        out["pushes_pg"] = median_run(
            [
                pushes(broker, sandbox, root, int(5_000 * scale), f"pp{i}", fresh(f"p{i}"))
                for i in reps
            ]
        )
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
        admin.close()
    return out


class OrderStream:
    """A steady stream of orders (a whole chain every `every_s`), each with the time its
    first status was published, on a thread of its own until `stop()`."""

    def __init__(self, port: int, label: str, every_s: float = 0.2) -> None:
        self.sent: dict[str, float] = {}
        self._stop = threading.Event()
        self._client = client(port, f"bench-stream-{label}", session=False)
        self._client.loop_start()
        self._label, self._every_s = label, every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            order, at = f"m{self._label}-{n}", time.time()
            for step, status in enumerate(STATUSES):
                payload = {"event_id": f"{order}-{step}", "order_id": order, "status": status}
                info = self._client.publish(
                    f"couriers/c{n % 50}/status", json.dumps(payload).encode(), qos=1
                )
                info.wait_for_publish(10)
            self.sent[order] = at
            n += 1
            self._stop.wait(self._every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.disconnect()
        self._client.loop_stop()


def cluster_membership(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, pg_url: str, label: str
) -> dict[str, float]:
    """Two instances on one database (default cluster settings) under a steady stream:
    the slowest order (publish of its first status → its dropoff push) published around
    a member joining and around a clean stop (SIGTERM), beside the median order before;
    and the takeover after kill -9 and after SIGSTOP (until the survivor holds every
    slot)."""
    work = root / f"cluster{label}"
    work.mkdir()
    slots = ClusterSettings().slots
    names = iter(range(100))

    def member() -> Courierd:
        d = Courierd(work / str(next(names)), broker, sandbox.url, "bench-cluster", pg_url)
        d.dir.mkdir()
        d.start()
        return d

    def holding(d: Courierd) -> int:
        return len(json.loads(d.get("/healthz") or "{}").get("slots", []))

    def until(condition: Callable[[], bool], timeout: float = 120) -> float:
        t0 = time.monotonic()
        while not condition():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("the cluster did not settle")
            time.sleep(0.05)
        return time.monotonic() - t0

    before = sandbox.count()
    first = member()
    until(lambda: holding(first) == slots)
    stream = OrderStream(broker.port, label)
    time.sleep(5)  # a baseline: orders before anything happens
    marks: dict[str, float] = {"join": time.time()}
    second = member()
    until(lambda: holding(first) + holding(second) == slots and holding(second) > 0)
    time.sleep(8)
    marks["stop"] = time.time()
    second.stop()
    time.sleep(8)
    takeover: dict[str, float] = {}
    for fault in ("kill", "sigstop"):
        other = member()
        until(lambda o=other: holding(first) + holding(o) == slots and holding(o) > 0)
        time.sleep(2)
        marks[fault] = time.time()
        other.pause() if fault == "sigstop" else other.stop(kill=True)
        takeover[fault] = until(lambda: holding(first) == slots)
        if fault == "sigstop":
            other.resume()
            other.stop()
    stream.stop()
    done: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(done) < len(stream.sent) and time.monotonic() < deadline:
        for r in sandbox.requests(before):
            if json.loads(r["body"])["delivery_status"] == "dropoff":
                done.setdefault(r["order_id"], r["at"])
        time.sleep(1)
    first.stop()
    forget_daemon_sessions(broker, "bench-cluster", pg_url)
    took = {o: done.get(o, float("inf")) - at for o, at in stream.sent.items()}
    baseline = statistics.median(t for o, t in took.items() if stream.sent[o] < marks["join"])

    def slowest(mark: str, window_s: float = 8.0) -> float:
        at = marks[mark]
        return max(t for o, t in took.items() if at - 1 <= stream.sent[o] <= at + window_s)

    out = {
        "order_median_s": round(baseline, 2),
        "join_slowest_s": round(slowest("join"), 2),
        "stop_slowest_s": round(slowest("stop"), 2),
        "kill_takeover_s": round(takeover["kill"], 1),
        "sigstop_takeover_s": round(takeover["sigstop"], 1),
    }
    say(f"  cluster{label}: {out}")
    return out


def cluster_phase(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, reps: range, server: str
) -> dict[str, Any]:
    """`cluster_membership`, each run on a database of its own; medians of the runs."""
    import psycopg

    say("cluster: stall on join and on a clean stop, takeover after kill -9 and SIGSTOP")
    runs = []
    with psycopg.connect(server, autocommit=True) as admin:
        for i in reps:
            name = f"courierd_bench_{int(time.time())}_m{i}"
            admin.execute(f'CREATE DATABASE "{name}"')
            try:
                url = server.rsplit("/", 1)[0] + f"/{name}"
                runs.append(cluster_membership(broker, sandbox, root, url, str(i)))
            finally:
                stop_every_daemon()
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {
        **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
        "runs": runs,
    }


def stop_every_daemon() -> None:
    """Kill every daemon the bench started and has not stopped (paused ones too)."""
    for daemon in Courierd.running:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with contextlib.suppress(OSError):
                daemon.resume()
            daemon.stop(kill=True)


def median_run(runs: list[dict[str, Any]], key: str = "ratio") -> dict[str, Any]:
    """The run with the median `key`, plus every run's: one noisy run cannot decide."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], f"{key}s": [r[key] for r in runs]}


def replay_cost(root: Path, fixes: int) -> dict[str, Any]:
    """`courierd replay` (CONTRACT.md 13): `fixes` accepted fixes of geofenced orders,
    200 per order (approach, wait, leave), committed through the real writer in batches
    of 500 fixes of 50 couriers; then every order replayed with the settings unchanged
    (read, rules, compare: the command without its printing). Also the bytes each
    accepted fix takes on disk: its track_points row and index entries (SQLite dbstat)."""
    from courierd.commands.replay import replay_orders
    from courierd.domain.geofence import GeofenceRules
    from courierd.domain.model import Assignment, Input, LocationFix, Place, Status, StatusEvent
    from courierd.store.replays import ReplayReads

    per_order, together = 200, 50
    orders = max(1, fixes // per_order)
    say(f"replay: {orders * per_order:,} accepted fixes of {orders:,} orders")
    store = open_store(StoreSettings(path=root / "replay.db"))
    t0 = PING_T0
    started = time.perf_counter()
    for first in range(0, orders, together):
        group = range(first, min(orders, first + together))
        setup: list[Input] = []
        for o in group:  # order ids as OneTablet's: UUIDs (the id is in every row)
            oid = str(uuid.UUID(int=o))
            setup += [
                Assignment(oid, f"rc{o}", pickup=Place(40.7, -74.0 + o * 1e-3)),
                StatusEvent(oid, oid, f"rc{o}", Status.DASHER_CONFIRMED, iso(t0)),
            ]
        store.writer.commit(setup, now=t0)
        batch: list[Input] = []
        for i in range(per_order):
            north = 3000 - 50 * i if i < 60 else (i % 3) * 5 if i < 140 else 0
            east = 0 if i < 140 else 50 * (i - 139)
            for o in group:
                lat, lng = 40.7 + north / 111_320, -74.0 + o * 1e-3 + east / 84_300
                batch.append(LocationFix(f"rc{o}", iso(t0 + 10 * i), lat, lng, 5.0))
            if len(batch) >= 500:
                store.writer.commit(batch, now=t0)
                batch = []
        store.writer.commit(batch, now=t0)
    write_s = time.perf_counter() - started
    stored = store.db.value("SELECT count(*) FROM track_points")
    on_disk = dict(
        store.db.rows(
            "SELECT name, sum(pgsize) FROM dbstat WHERE name = 'track_points' "
            "OR name LIKE 'track_points_%' GROUP BY name"
        )
    )
    store.close()
    readonly = open_store(StoreSettings(path=root / "replay.db"), readonly=True)
    reads = ReplayReads(readonly.db)
    started = time.perf_counter()  # the baseline: reading the same rows, no rules
    assert sum(len(h.fixes) for h in reads.histories(reads.order_ids())) == stored
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = reads.order_ids()
    results = list(replay_orders(reads, ids, GeofenceRules(), False))
    replay_s = time.perf_counter() - started
    readonly.close()
    changed = sum(r.changed for r in results)
    per_fix = {name: round(size / stored, 1) for name, size in on_disk.items()}
    total = round(sum(on_disk.values()) / stored, 1)
    million_s = replay_s * 1_000_000 / stored
    say(f"  written through the writer in {write_s:.1f} s; {stored:,} rows, {total} bytes/fix")
    say(f"  replayed in {replay_s:.1f} s ({stored / replay_s:,.0f} fixes/s, 1M: {million_s:.0f} s)")
    say(f"  reading the same rows alone: {read_s:.1f} s ({replay_s / read_s:.2f}x)")
    return {
        "fixes": stored,
        "orders": len(ids),
        "orders_changed": changed,  # with the settings unchanged: 0
        "write_s": round(write_s, 2),
        "replay_s": round(replay_s, 2),
        "read_only_s": round(read_s, 2),  # the baseline: the rows read, no rules run
        "replay_over_read": round(replay_s / read_s, 2),
        "fixes_per_s": round(stored / replay_s),
        "projected_1m_fixes_s": round(million_s, 1),
        "goal_1m_fixes_s": 30,
        "bytes_per_fix": total,
        "bytes_per_fix_by_part": per_fix,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke check")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/DATE.json)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL phases")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server where the bench may create (and drop) its databases",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each ratio; the median is reported (default 3)",
    )
    parser.add_argument(
        "--only", help="comma-separated phases to run (default all; see `phases` in main)"
    )
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    root = Path(tempfile.mkdtemp(prefix="courierd-bench-"))
    broker = LocalBroker(root / "broker", persistence=True).start()
    sandbox = SandboxProc()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    reps = range(args.repeats)
    ping_n, status_n = int(40_000 * scale), int(20_000 * scale)
    places = min(PING_COURIERS, int(10_000 * scale) or 1)
    phases: dict[str, Callable[[], Any]] = {
        "lifecycle": lambda: lifecycle_cost(int(20_000 * scale)),
        "ingest_pings": lambda: median_run(
            [ingest(broker, sandbox, root, ping_n, 0.95, f"pings{i}") for i in reps]
        ),
        "ingest_places": lambda: median_run(
            [ingest(broker, sandbox, root, ping_n, 0.95, f"places{i}", places) for i in reps]
        ),
        "ingest_status": lambda: median_run(
            [ingest(broker, sandbox, root, status_n, 0.0, f"status{i}") for i in reps]
        ),
        # courierd over the other protocol, against the same two bare ceilings
        "ingest_pings_311": lambda: median_run(
            [ingest(broker, sandbox, root, ping_n, 0.95, f"pv3{i}", protocol="3.1.1") for i in reps]
        ),
        "ingest_status_311": lambda: median_run(
            [
                ingest(broker, sandbox, root, status_n, 0.0, f"sv3{i}", protocol="3.1.1")
                for i in reps
            ]
        ),
        "pushes": lambda: median_run(
            [pushes(broker, sandbox, root, int(10_000 * scale), f"p{i}") for i in reps]
        ),
        "pushes_100ms": lambda: median_run(
            [remote_pushes(broker, root, int(20_000 * scale), 100, f"r{i}") for i in reps]
        ),
        "pushes_300ms": lambda: median_run(
            [remote_pushes(broker, root, int(10_000 * scale), 300, f"s{i}") for i in reps]
        ),
        "end_to_end": lambda: median_run(
            [together(broker, sandbox, root, int(15_000 * scale), f"t{i}") for i in reps]
        ),
        "postgres": lambda: postgres_phases(broker, sandbox, root, scale, reps, args.pg_url),
        "cluster": lambda: cluster_phase(broker, sandbox, root, reps, args.pg_url),
        "latency": lambda: median_run(
            [latency(broker, sandbox, root, 2 if scale < 1 else 15, f"{i}") for i in reps],
            key="p99_ms",
        ),
        "replay": lambda: replay_cost(root, int(1_000_000 * scale)),
        "latency_page": lambda: median_run(
            [
                latency_beside_page(broker, sandbox, root, 2 if scale < 1 else 15, f"{i}")
                for i in reps
            ]
        ),
        "memory": lambda: memory_and_start(
            broker, sandbox, root, int(100_000 * scale), int(1_000_000 * scale)
        ),
    }
    chosen = args.only.split(",") if args.only else list(phases)
    if args.no_postgres:
        chosen = [name for name in chosen if name not in ("postgres", "cluster")]
    unknown = set(chosen) - set(phases)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(phases)}")
    failed: list[str] = []
    try:
        for name in chosen:
            try:
                if name == "postgres":
                    results.update(phases[name]())
                else:
                    results[name] = phases[name]()
            except Exception as e:  # one failed phase must not lose the others' figures
                say(f"phase {name} failed: {e!r}")
                results[name] = {"error": repr(e)}
                failed.append(name)
                stop_every_daemon()  # what the phase left running would skew the next
        with_places, without = results.get("ingest_places", {}), results.get("ingest_pings", {})
        if "ratio" in with_places and "ratio" in without:  # both phases ran, neither failed
            results["geofence_cost"] = {
                # each against its own run's ceiling; and the plain rates, which do not
                # carry the ceilings' own run-to-run noise (they carry the machine's)
                "ratio_with_places_over_without": round(with_places["ratio"] / without["ratio"], 3),
                "rate_with_places_over_without": round(
                    with_places["courierd_msgs_per_s"] / without["courierd_msgs_per_s"], 3
                ),
                "goal": ">= 0.9",
            }
    finally:
        stop_every_daemon()
        sandbox.stop()
        broker.stop()
    out = args.out or _new_file(Path("bench/results"), results["date"][:10])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    say(f"written to {out}")
    if failed:
        say(f"failed phases: {', '.join(failed)}")
        return 1
    return 0


def _new_file(folder: Path, date: str) -> Path:
    """bench/results/DATE.json, or DATE-2.json, ...: never overwrite an earlier run."""
    out, n = folder / f"{date}.json", 1
    while out.exists():
        n += 1
        out = folder / f"{date}-{n}.json"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
