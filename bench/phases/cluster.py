"""Phase cluster: two instances under a steady stream; the slowest order around a join
and a clean stop, the takeover after kill -9 and after SIGSTOP."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    STATUSES,
    Courierd,
    SandboxProc,
    client,
    forget_daemon_sessions,
    say,
    stop_every_daemon,
)
from courierd.config import ClusterSettings
from courierd.devtools.localbroker import LocalBroker


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

        def shared(o: Courierd = other) -> bool:  # bound now (the loop's variable: B023)
            return holding(first) + holding(o) == slots and holding(o) > 0

        until(shared)
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
