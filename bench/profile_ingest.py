"""CPU per message of courierd's two ingest-side processes, each measured on its own.

Not the bench (`scripts/bench` runs the daemon whole); this isolates one process's
work, so that a change to it can be set against the code before it, in one run:

- `ingest`: the ingest process's work (reading the batch off its pipe: the raw
  messages and what the MQTT process parsed them into; `commit_messages`: plan, write,
  commit under synchronous=FULL) on a real SQLite file, in batches, for the bench's ping mix
  (95 % pings; `--pings 0`: statuses only) with and without 10k active orders that
  have places (every ping then runs the geofence rules). CPU µs per message of this
  process, each mix in turn, `--rounds` times, and the ratio of the two.
- `mqtt`: the MQTT process's receive path: a real Mosquitto of our own, a backlog
  published to a persistent session, then drained by courierd's own `MqttEdge` (paho,
  manual ack, each message parsed as it arrives) with a thread that acknowledges each
  batch as the batcher does after a commit, over MQTT 5 and over 3.1.1; beside a bare
  paho subscriber (auto ack) over each. CPU µs per message of this process while it drains.

`--profile FILE` writes a cProfile of the measured part (pstats format).
Usage: .venv/bin/python -m bench.profile_ingest ingest|mqtt [--messages N] [--rounds R]
To set a change against the code before it, run this file with PYTHONPATH pointing at a
copy of the old `courierd/` (`git archive HEAD courierd | tar -x -C /tmp/old`), from
outside the work tree, alternating with the new.

Instruction counts (`valgrind --tool=cachegrind`) repeat only with a fixed
`PYTHONHASHSEED` (0, and 1 to check) and a fixed start of the fixes' times,
`COURIERD_BENCH_T0` (unix seconds, a day or more ago; bench/common.py): e.g.
`PYTHONHASHSEED=0 COURIERD_BENCH_T0=1796000000 valgrind --tool=cachegrind
--cache-sim=no .venv/bin/python -m bench.profile_ingest ingest --rounds 1`. Set them
in the environment: a re-exec of itself would run outside valgrind.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pickle
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    PING_COURIERS,
    PING_T0,
    RunFolder,
    messages,
    process_cpu_s,
    publish_all,
)
from courierd.domain.model import iso


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def profiled(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(str(path))
        say(f"  profile written to {path}")


# -- the ingest process ------------------------------------------------------------------


SQL_TIMES: dict[str, float] = {}
# PROFILE_CACHE_KIB=N: the ingest connection with an N KiB page cache (SQLite: 2 MiB).
CACHE_KIB = int(os.environ.get("PROFILE_CACHE_KIB", "0"))


def time_sql(db: Any) -> None:
    """CPU time per statement (its first words) of this connection, in SQL_TIMES."""
    execute, executemany = db.execute, db.executemany

    def timed(run: Callable[..., Any]) -> Callable[..., Any]:
        def call(sql: str, params: Any = ()) -> Any:
            started = time.thread_time()
            result = run(sql, params)
            if hasattr(result, "fetchall"):
                rows = result.fetchall()
                key = " ".join(sql.split()[:6])[:60]
                SQL_TIMES[key] = SQL_TIMES.get(key, 0.0) + time.thread_time() - started
                return _Rows(rows)
            key = " ".join(sql.split()[:6])[:60]
            SQL_TIMES[key] = SQL_TIMES.get(key, 0.0) + time.thread_time() - started
            return result

        return call

    db.execute, db.executemany = timed(execute), timed(executemany)


class _Rows:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows
        self.rowcount = len(rows)

    def fetchall(self) -> list[Any]:
        return self._rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None


def ingest_cpu(
    root: Path,
    n: int,
    places: int,
    batch: int,
    profile: Path | None,
    sql: bool = False,
    pings: float = 0.95,
) -> float:
    """CPU µs per message of `commit_messages` over `n` messages of the ping mix."""
    from courierd.config import GeofenceSettings, StoreSettings
    from courierd.daemon.ingest import commit_messages
    from courierd.daemon.ipc import settle_gc
    from courierd.store import open_store

    folder = Path(tempfile.mkdtemp(dir=root))
    store = open_store(StoreSettings(path=folder / "courierd.db"), geofence=GeofenceSettings())
    settle_gc()  # as the ingest process does once its store is open
    if places:
        with store.db.transaction():
            store.db.executemany(
                "INSERT INTO orders (order_id, state, courier_id, updated_at, status_at, "
                "pickup_lat, pickup_lng, pickup_radius_m, dropoff_lat, dropoff_lng) "
                "VALUES (?, 'dasher_confirmed', ?, 'x', ?, 41.5, -73.0, 80, 41.6, -73.1)",
                ((f"geo{c}", f"c{c}", iso(PING_T0)) for c in range(places)),
            )
    # A first pass makes every courier's row (as a running daemon has them).
    warm = [(t, p, len(p)) for t, p in messages(PING_COURIERS, 1.0, "warm")]
    for i in range(0, len(warm), batch):
        commit_messages(store, warm[i : i + batch], time.time())
    raw = [(t, p, len(p)) for t, p in messages(n, pings, "m", first_round=1)]
    # Each batch as the MQTT process sends it (batcher.py): parsed there, as it arrived.
    reader = _reader()
    sent = [
        pickle.dumps((chunk, [reader(*m) for m in chunk], None))
        for chunk in (raw[i : i + batch] for i in range(0, len(raw), batch))
    ]
    if CACHE_KIB:
        store.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    if sql:
        SQL_TIMES.clear()
        time_sql(store.db)
    with profiled(profile):
        started = time.process_time()
        for request in sent:
            chunk, parsed, slots = pickle.loads(request)
            commit_messages(store, chunk, time.time(), slots=slots, parsed=parsed)
        used = time.process_time() - started
    store.close()
    shutil.rmtree(folder)  # each round's database goes once measured
    return used / n * 1e6


def _reader() -> Any:
    """The MQTT process's parser (batcher.Reader), told the clock's offset as the ingest
    process tells it on SQLite (0)."""
    from courierd.daemon.batcher import Reader

    reader = Reader("user")
    reader.set_clock(0.0)
    return reader


def _say_sql(label: str, n: int) -> None:
    say(f"  SQL of {label}, CPU µs per message:")
    for key, seconds in sorted(SQL_TIMES.items(), key=lambda kv: -kv[1]):
        say(f"    {seconds / n * 1e6:6.1f}  {key}")


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    with RunFolder("courierd-profile-") as work:  # the rounds' databases
        root = work.path
        plain: list[float] = []
        fenced: list[float] = []
        for r in range(args.rounds):
            plain.append(ingest_cpu(root, args.messages, 0, args.batch, None, args.sql, args.pings))
            if args.sql:
                _say_sql("plain", args.messages)
            profile = args.profile if r == args.rounds - 1 else None
            fenced.append(
                ingest_cpu(
                    root, args.messages, PING_COURIERS, args.batch, profile, args.sql, args.pings
                )
            )
            if args.sql:
                _say_sql("geofenced", args.messages)
            say(f"  round {r + 1}: plain {plain[-1]:.1f} µs/msg, geofenced {fenced[-1]:.1f} µs/msg")
    p, f = statistics.median(plain), statistics.median(fenced)
    say(
        f"ingest process, median: plain {p:.1f} µs/msg, geofenced {f:.1f}; "
        f"plain/geofenced {p / f:.2f}"
    )
    return {
        "plain_us_per_msg": round(p, 1),
        "geofenced_us_per_msg": round(f, 1),
        "rate_geofenced_over_plain": round(p / f, 3),
        "runs": {"plain": [round(x, 1) for x in plain], "geofenced": [round(x, 1) for x in fenced]},
    }


# -- the MQTT process ---------------------------------------------------------------------


def _edge(port: int, protocol: str, client_id: str, inbox: queue.SimpleQueue[Any]) -> Any:
    from courierd.config import MqttSettings
    from courierd.edges.mqtt import MqttEdge

    settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id=client_id, protocol=protocol)
    return MqttEdge(settings, inbox, receive_max=1000, interpret=_reader())


def _bare(port: int, protocol: str, client_id: str, on_message: Callable[..., None]) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    v5 = protocol == "5"
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else False,
    )
    c.max_inflight_messages_set(1000)
    props = None
    if v5:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 1000
    c.on_message = on_message
    c.connect("127.0.0.1", port, clean_start=False if v5 else 3, properties=props)
    return c


def _register(port: int, kind: str, protocol: str, client_id: str) -> None:
    """Make the persistent session (subscribed), then leave it to queue the backlog."""
    if kind == "edge":
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        edge = _edge(port, protocol, client_id, inbox)
        edge.start()
        if not edge.subscribed.wait(10):
            raise RuntimeError("the edge did not subscribe")
        edge.stop()
        return
    subscribed = threading.Event()
    c = _bare(port, protocol, client_id, lambda *_: None)
    c.on_subscribe = lambda *_: subscribed.set()
    c.loop_start()
    c.subscribe([("couriers/#", 1), ("dispatch/assignments", 1)])
    subscribed.wait(10)
    c.disconnect()
    c.loop_stop()


def _drain(port: int, kind: str, protocol: str, client_id: str, n: int) -> tuple[float, float]:
    """(msgs/s, CPU µs per message of this process) draining the session's backlog."""
    if kind == "bare":
        seen = [0]
        done = threading.Event()

        def on_message(*_: Any) -> None:
            seen[0] += 1
            if seen[0] >= n:
                done.set()

        c = _bare(port, protocol, client_id, on_message)
        cpu, wall = time.process_time(), time.perf_counter()
        c.loop_start()
        if not done.wait(300):
            raise RuntimeError(f"bare: {seen[0]} of {n}")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        c.disconnect()
        c.loop_stop()
        return n / wall, cpu / n * 1e6
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    edge = _edge(port, protocol, client_id, inbox)
    from courierd.daemon.batcher import take_batch

    got = [0]
    finished = threading.Event()
    failed: list[BaseException] = []
    stop = threading.Event()

    def acker() -> None:  # the batcher, with a commit that takes no time
        # As the batcher of the code measured does it: room made (`Room.made`; before
        # it, an Event set), a batch's acks in one call (older code: one at a time).
        ack_many, room = getattr(edge, "ack_many", None), getattr(edge, "room", None)
        make_room = getattr(room, "made", None) or getattr(room, "set", None)
        try:
            while got[0] < n and not stop.is_set():
                batch = take_batch(inbox, size=500, wait_s=0.0, timeout=0.2)
                if make_room is not None and batch:
                    make_room()
                payloads = [(m.topic, m.payload, m.size) for m in batch]
                del payloads
                if ack_many is not None:
                    ack_many(batch)
                else:
                    for message in batch:
                        edge.ack(message)
                got[0] += len(batch)
        except BaseException as e:  # said at once, not after the 300 s wait below
            failed.append(e)
        finally:
            finished.set()

    thread = threading.Thread(target=acker)
    cpu, wall = time.process_time(), time.perf_counter()
    thread.start()
    edge.start()
    try:
        if not finished.wait(300) or failed:
            raise RuntimeError(f"edge: {got[0]} of {n}") from (failed[0] if failed else None)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        stop.set()
        edge.stop()
        thread.join()
    return n / wall, cpu / n * 1e6


def run_mqtt(args: argparse.Namespace) -> dict[str, Any]:
    from courierd.devtools.localbroker import LocalBroker

    results: dict[str, list[tuple[float, float]]] = {}
    brokers: dict[str, list[float]] = {}
    with RunFolder("courierd-profile-") as work:
        broker = LocalBroker(work.path / "broker", persistence=False).start()
        try:
            msgs = messages(args.messages, 0.95, "m")
            for r in range(args.rounds):
                for kind in args.kinds.split(","):
                    for protocol in args.protocols.split(","):
                        client_id = f"profile-{kind}-{protocol}-{r}"
                        _register(broker.port, kind, protocol, client_id)
                        publish_all(broker.port, msgs)
                        last = r == args.rounds - 1 and kind == "edge"
                        path = None
                        if last and args.profile is not None:
                            path = args.profile.with_suffix(f".{protocol}.pstats")
                        assert broker.proc is not None
                        broker_cpu = process_cpu_s(broker.proc.pid)
                        with profiled(path):
                            rate, us = _drain(broker.port, kind, protocol, client_id, len(msgs))
                        broker_us = (process_cpu_s(broker.proc.pid) - broker_cpu) / len(msgs) * 1e6
                        results.setdefault(f"{kind} {protocol}", []).append((rate, us))
                        brokers.setdefault(f"{kind} {protocol}", []).append(broker_us)
                        say(
                            f"  round {r + 1}: {kind} MQTT {protocol}: "
                            f"{rate:,.0f} msg/s, {us:.1f} µs/msg (the broker meanwhile, "
                            f"delivering: {broker_us:.1f} µs/msg)"
                        )
        finally:
            broker.stop()
    out = {}
    for key, runs in results.items():
        out[key] = {
            "msgs_per_s": round(statistics.median(r for r, _ in runs)),
            "cpu_us_per_msg": round(statistics.median(u for _, u in runs), 1),
            "broker_cpu_us_per_msg": round(statistics.median(brokers[key]), 1),
        }
        say(f"{key}: {out[key]['msgs_per_s']:,} msg/s, {out[key]['cpu_us_per_msg']} µs/msg")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("ingest", "mqtt"))
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="ingest: messages per commit")
    parser.add_argument("--profile", type=Path, help="cProfile output of the last round")
    parser.add_argument("--kinds", default="bare,edge", help="mqtt: bare and/or edge")
    parser.add_argument("--protocols", default="5,3.1.1", help="mqtt: 5 and/or 3.1.1")
    parser.add_argument("--sql", action="store_true", help="ingest: CPU time per statement")
    parser.add_argument(
        "--pings", type=float, default=0.95, help="ingest: the pings' share (0: statuses only)"
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C: the broker stopped, the working folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_ingest(args) if args.what == "ingest" else run_mqtt(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
