"""What every phase of the bench uses: the workloads and publishing helpers, paho
clients and sessions, the sandbox and the daemon as subprocesses (with their CPU and
memory), and the statistics (p99, the median run)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from courierd.config import ClusterSettings, OneTabletSettings, StoreSettings
from courierd.devtools.localbroker import LocalBroker, free_port
from courierd.domain.lifecycle import CHAIN
from courierd.domain.model import iso
from courierd.store import open_store

KEY = "bench-key"
STATUSES = [s.value for s in CHAIN]
CONCURRENCY = OneTabletSettings().max_concurrency  # the daemon's default, and the baselines'
RECEIVE_MAX = 1000


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Stops(Protocol):
    def stop(self) -> None: ...


_Stoppable = TypeVar("_Stoppable", bound=_Stops)


class RunFolder:
    """A run's working folder in /tmp (databases, the broker's state, the daemons' logs:
    up to hundreds of MB), removed when the `with` ends, unless the run failed: then it is
    kept, and named, for the logs. Failed: `failed` was set (a phase failed, a check
    found problems) or an error escaped; a run interrupted (Ctrl-C, SIGTERM as
    SystemExit) is removed. Whatever writes into it is stopped first: the processes
    handed to `started`, and every daemon the bench started, even when a signal or an
    error comes while they are still starting."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.failed = False
        self._stops = contextlib.ExitStack()

    def __enter__(self) -> RunFolder:
        return self

    def started(self, process: _Stoppable) -> _Stoppable:
        """`process`, to be stopped (last started, first stopped) when the `with` ends."""
        self._stops.callback(process.stop)
        return process

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            stop_every_daemon()
            self._stops.close()
        finally:
            if self.failed or (kind is not None and issubclass(kind, Exception)):
                say(f"the failed run's files are kept in {self.path}")
            else:
                shutil.rmtree(self.path, ignore_errors=True)


# -- workloads ---------------------------------------------------------------------------


PING_COURIERS = 10_000  # a fleet: every courier pings every 4 s of fix time
# Fixes a day old: never "in the future", always newer. COURIERD_BENCH_T0 (unix seconds)
# fixes it, so that instruction counts repeat from run to run (bench/profile_ingest.py).
PING_T0 = float(os.environ.get("COURIERD_BENCH_T0") or time.time() - 86400)


def messages(n: int, ping_share: float, tag: str, first_round: int = 0) -> list[tuple[str, bytes]]:
    """n messages: pings from PING_COURIERS couriers and status events walking orders
    (of 200 couriers) through the chain.

    Statuses go out step by step across orders (every order's confirm, then every
    arriving, ...), spread evenly between the pings. Each courier's fixes move a few
    metres per ping and are 4 s apart, so the geofence filters accept them all.
    `first_round` shifts the pings' time, so a later call's fixes are newer.
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
                    "ts": iso(PING_T0 + 4 * (first_round + i // PING_COURIERS)),
                    "lat": 40.7 + (first_round + i // PING_COURIERS) * 2e-4,
                    "lng": -74.0 + (i % PING_COURIERS) * 1e-5,
                    "accuracy_m": 5.0,
                    "speed_mps": 7.1,
                    "heading": 90,
                }
            ).encode(),
        )
        for i in range(n - n_status)
    ]
    keyed = [(i / max(1, len(pings)), m) for i, m in enumerate(pings)]
    keyed += [(k / max(1, len(statuses)), m) for k, m in enumerate(statuses)]
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
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
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


def drain_bare(port: int, client_id: str, n: int, protocol: str = "5") -> tuple[float, float]:
    """The ceiling: a QoS 1 subscriber that only counts, draining its queued backlog.
    Its rate, and its CPU µs per message: this process's CPU over the same span (the
    main thread only waits meanwhile), a cost that moves with the host as courierd's
    does, so a ratio of the two holds on a fast host and a slow one alike."""
    seen = [0]
    first = [0.0, 0.0]
    done = threading.Event()

    def on_message(*_: Any) -> None:
        if seen[0] == 0:
            first[:] = time.perf_counter(), time.process_time()
        seen[0] += 1
        if seen[0] >= n:
            done.set()

    c = client(port, client_id, session=True, protocol=protocol)
    c.on_message = on_message
    c.loop_start()
    if not done.wait(300):
        raise RuntimeError(f"bare subscriber got {seen[0]} of {n}")
    elapsed, cpu = time.perf_counter() - first[0], time.process_time() - first[1]
    c.disconnect()
    c.loop_stop()
    return (n - 1) / elapsed, cpu / (n - 1) * 1e6


# -- the sandbox and the daemon, each in its own process -------------------------------


class SandboxProc:
    """`courierd sandbox` in a subprocess, so no client shares its interpreter; from the
    source tree `tree` if given (else the one this runs from)."""

    def __init__(self, *flags: str, tree: str | None = None) -> None:
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
            env=None if tree is None else os.environ | {"PYTHONPATH": tree},
        )
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    self.requests()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:  # timed out, or interrupted (SIGTERM): not left running
            self.proc.kill()
            self.proc.wait()
            raise

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
                body: bytes = r.read()
                return body.decode()
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


def ab_arguments(ap: argparse.ArgumentParser, rounds: int) -> None:
    """The options of an A/B run through `alternating_rounds`: `--tree NAME=PATH` (one
    per tree), `--env NAME:KEY=VALUE` (the daemon's environment in that tree's runs: one
    tree under two names compares settings), `--rounds`, `--json` and
    `--sandbox-per-tree`; `trees_of(args)` and `envs_of(args)` read them back."""
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--env", action="append", default=[], help="NAME:KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--sandbox-per-tree",
        action="store_true",
        help="each run's sandbox from the run's tree (else one, from this one's)",
    )


def trees_of(args: argparse.Namespace) -> dict[str, str]:
    """The `--tree NAME=PATH` options as NAME -> PATH, in the order given."""
    return dict(t.split("=", 1) for t in args.tree)


def envs_of(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    """The `--env NAME:KEY=VALUE` options as NAME -> {KEY: VALUE}, for every tree."""
    return name_key_values(args.env, trees_of(args))


def name_key_values(options: list[str], names: Iterable[str]) -> dict[str, dict[str, str]]:
    """`NAME:KEY=VALUE` options as NAME -> {KEY: VALUE}, with an entry for each of `names`."""
    found: dict[str, dict[str, str]] = {name: {} for name in names}
    for option in options:
        who, kv = option.split(":", 1)
        key, value = kv.split("=", 1)
        found.setdefault(who, {})[key] = value
    return found


def alternating_rounds(
    prefix: str,
    trees: dict[str, str],
    rounds: int,
    sandbox_per_tree: bool,
    run: Callable[[LocalBroker, SandboxProc, Path, str, int], dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """An A/B of source trees (NAME -> path): `rounds` rounds on one broker, the trees in
    turn (in order, then reversed, so neither always runs first), each against one
    sandbox shared by all or, with `sandbox_per_tree`, one from its own tree. `run(broker,
    sandbox, folder, name, round)` measures one; its figures are gathered per tree.
    Whatever ends the run, everything it started is stopped (`RunFolder`)."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with RunFolder(prefix) as work:
        broker = work.started(LocalBroker(work.path / "broker").start())
        shared = None if sandbox_per_tree else work.started(SandboxProc())
        for r in range(rounds):
            for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
                sandbox = shared or SandboxProc(tree=trees[name])
                try:
                    got = run(broker, sandbox, work.path, name, r)
                finally:
                    if shared is None:
                        sandbox.stop()
                say(f"{name} round {r}: {json.dumps(got)}")
                results[name].append(got)
    return results


def wait_for_shares(daemons: list[Courierd], timeout: float = 300) -> None:
    """Until every instance of a cluster holds MQTT slots (each its share)."""
    deadline = time.monotonic() + timeout
    while not all(json.loads(d.get("/healthz") or "{}").get("slots") for d in daemons):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster's instances did not share the slots out")
        time.sleep(0.5)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def p99_of(ordered: list[float]) -> float:
    """The 99th percentile of a sorted list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def stop_every_daemon() -> None:
    """Kill every daemon the bench started and has not stopped (paused ones too), its
    workers with it: a killed daemon's workers outlive it for a moment, and one still
    writing would put files back into a run folder being removed."""
    for daemon in Courierd.running:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with contextlib.suppress(OSError):
                daemon.resume()
            workers: list[int] = []
            with contextlib.suppress(OSError):
                workers = daemon.tree()[1:]
            daemon.stop(kill=True)
            for pid in workers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while any(Path(f"/proc/{pid}").exists() for pid in workers):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)


def median_run(runs: list[dict[str, Any]], key: str = "ratio") -> dict[str, Any]:
    """The run with the median `key`, plus every run's: one noisy run cannot decide."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], f"{key}s": [r[key] for r in runs]}
