"""Phase capacity: how many couriers one machine serves (issue 20).

PING_COURIERS (10k) couriers, each with an active order whose pickup and dropoff are
known, so every fix runs the geofence rules (`geofenced_orders`). A publisher in its own
process (paho, QoS 1) sends location fixes at rising rates, RATES msg/s for STEP_S
each, and every 20 ms a fresh order's `dasher_confirmed`. Latency is publish → OneTablet's
POST: the publisher notes time.time() just before each status's publish call and sends
the notes back over a pipe; the sandbox (its own process) notes time.time() when the POST
arrives. Same machine, same clock.

Beside it, the same ladder against a bare paho subscriber in its own process, on the same
broker, with a persistent QoS 1 session over MQTT 5 (courierd's default) that does
nothing but count (and note the arrival of each status: publish → its on_message). The
two ladders run one after the other (never at once: they would share the broker and the
cores), in alternating order from one repeat to the next.

Per step: the rate asked, the rate sent (acknowledged by the broker), p50 and p99, the
CPU of each process (% of one core: courierd's four, the broker, the publisher, the
sandbox, the bare subscriber) and of the whole machine (other work on a shared machine
shows there), and how long the step's backlog took to drain after its last publish.
A step held if p99 ≤ 100 ms, sent ≥ 0.95 of the rate, every status arrived, and the
backlog was gone within KEPT_UP_S of the step's end. Before the next step starts, the
backlog is drained (up to DRAIN_TIMEOUT_S; a step that started on an undrained backlog
says so). Each row is the median of the repeats, field by field.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import threading
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import (
    PING_COURIERS,
    PING_T0,
    Courierd,
    SandboxProc,
    client,
    forget_session,
    geofenced_orders,
    process_cpu_s,
    say,
)
from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker
from courierd.domain.model import iso

RATES = (2000, 4000, 6000, 8000, 10_000)
QUICK_RATES = (2000, 6000, 10_000)
STEP_S, QUICK_STEP_S = 15.0, 3.0
STATUS_EVERY_S = 0.02  # a fresh order's dasher_confirmed every 20 ms: 50 a second
P99_GOAL_MS = 100.0
SENT_GOAL = 0.95  # of the rate asked
KEPT_UP_S = 1.0  # the step's backlog gone within this of its last publish
DRAIN_TIMEOUT_S = 120.0
WARM_UP = (1000, 2.0)  # msg/s, seconds: before the ladder, not reported
TICK_S = 0.01
FULL_PCT = 90.0  # a process this busy (% of one core) is at its limit


# -- the publisher, in its own process ---------------------------------------------------


def fix_payloads(first: int, n: int) -> list[tuple[str, bytes]]:
    """The fleet's fixes `first` .. `first + n - 1`: courier i % PING_COURIERS, each
    courier's fixes 4 s apart (of fix time) and a few metres on, as in `messages`, so the
    filters accept them all and each runs its order's geofence rules."""
    out = []
    for i in range(first, first + n):
        courier, k = i % PING_COURIERS, i // PING_COURIERS
        payload = {
            "ts": iso(PING_T0 + 4 * k),
            "lat": 40.7 + k * 2e-4,
            "lng": -74.0 + courier * 1e-5,
            "accuracy_m": 5.0,
            "speed_mps": 7.1,
            "heading": 90,
        }
        out.append((f"couriers/c{courier}/location", json.dumps(payload).encode()))
    return out


def publisher_main(port: int, conn: Connection) -> None:
    """The publisher process: QoS 1 over MQTT 3.1.1, paho's network loop driven from this
    one thread (no loop_start): with paho's own network thread beside the publishing one,
    a publish cost about 120 µs of CPU against 44 (GIL hand-overs and a wake-up write
    per message), and the publisher, not the subscriber, would saturate first. Each
    command (rate, seconds, tag) is one step; it answers "started", "ended", then the
    step's figures once the broker acknowledged everything published (or 60 s passed).
    None ends it."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-cap-pub-{uuid.uuid4().hex[:6]}",
        protocol=paho.MQTTv311,
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = [0]

    def on_publish(*_: Any) -> None:
        acked[0] += 1

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not c.is_connected():
        if time.monotonic() > deadline:
            raise RuntimeError("the publisher could not connect")
        c.loop(timeout=0.1)
    published, next_fix, next_order = 0, 0, 0  # next_order: also the statuses so far
    try:
        while (command := conn.recv()) is not None:
            rate, seconds, tag = command
            fixes = fix_payloads(next_fix, int(rate * seconds) + rate)  # a spare second
            per_tick = rate * TICK_S
            sent_at: dict[str, float] = {}
            lags: list[float] = []
            done = 0.0  # fixes due so far (fractional: any rate)
            fix_i = 0
            conn.send("started")
            start = time.perf_counter()
            next_tick = next_status = start
            while (now := time.perf_counter()) - start < seconds:
                lags.append(now - next_tick)
                done += per_tick
                while fix_i < min(int(done), len(fixes)):
                    topic, payload = fixes[fix_i]
                    c.publish(topic, payload, qos=1)
                    fix_i += 1
                    if fix_i % 100 == 0:  # read the PUBACKs, write what waits
                        c.loop(timeout=0)
                while next_status <= now:
                    order = f"{tag}-{next_order}"
                    body = {"event_id": order, "order_id": order, "status": "dasher_confirmed"}
                    sent_at[order] = time.time()
                    c.publish(f"couriers/s{next_order % 200}/status", json.dumps(body).encode(), 1)
                    next_order += 1
                    next_status += STATUS_EVERY_S
                next_tick += TICK_S
                while (left := next_tick - time.perf_counter()) > 0:
                    c.loop(timeout=left)
            elapsed = time.perf_counter() - start
            acked_in_step = acked[0] - published
            conn.send("ended")
            published += fix_i + len(sent_at)
            next_fix += fix_i
            deadline = time.monotonic() + 60
            while acked[0] < published and time.monotonic() < deadline:
                c.loop(timeout=0.01)
            lags.sort()
            conn.send(
                {
                    "seconds": elapsed,
                    "published": fix_i + len(sent_at),
                    "acked_in_step": acked_in_step,
                    "published_total": published,
                    "statuses_total": next_order,
                    "acked_total": acked[0],
                    "sent_at": sent_at,
                    "lag_p99_ms": lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000,
                }
            )
    finally:
        c.disconnect()


# -- the bare subscriber, in its own process ---------------------------------------------


def bare_main(port: int, client_id: str, conn: Connection) -> None:
    """A persistent QoS 1 session (MQTT 5, Receive Maximum as the bench's other bare
    subscribers) that counts every message and notes when each status arrived. Answers
    "ready" once subscribed; then, to "count", (messages, statuses) so far, and to
    "arrivals", every status's arrival time; None ends it."""
    count = [0]
    arrivals: dict[str, float] = {}

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        count[0] += 1
        if msg.topic.endswith("/status"):
            arrivals[json.loads(msg.payload)["order_id"]] = time.time()

    c = client(port, client_id, session=True)
    c.on_message = on_message
    subscribed = threading.Event()
    c.on_subscribe = lambda *_: subscribed.set()
    c.loop_start()
    c.subscribe([("couriers/#", 1)])
    try:
        if not subscribed.wait(10):
            raise RuntimeError("the bare subscriber was not subscribed")
        conn.send("ready")
        while (request := conn.recv()) is not None:
            conn.send((count[0], len(arrivals)) if request == "count" else dict(arrivals))
    finally:
        c.disconnect()
        c.loop_stop()


# -- the ladder --------------------------------------------------------------------------


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / 100  # USER_HZ, 100 on Linux


class Subject:
    """What the ladder runs against: courierd (with the sandbox) or the bare subscriber."""

    name: str

    def cpu(self) -> dict[str, float]:
        raise NotImplementedError

    def drained(self, published: int, statuses: int) -> bool:
        """Every message published so far is in (`published`), and every status has
        arrived (`statuses`, so far): order ids are never reused within a ladder."""
        raise NotImplementedError

    def arrivals(self, statuses: set[str]) -> dict[str, float]:
        raise NotImplementedError

    def batches(self) -> tuple[float, float]:
        """(messages, batches) committed so far; (0, 0) where there are none."""
        return 0.0, 0.0


class CourierdSubject(Subject):
    name = "courierd"

    def __init__(self, daemon: Courierd, sandbox: SandboxProc) -> None:
        self.daemon, self.sandbox = daemon, sandbox
        self.before = sandbox.count()

    def cpu(self) -> dict[str, float]:
        return self.daemon.cpu_by_process()

    def batches(self) -> tuple[float, float]:
        seen = {"_sum": 0.0, "_count": 0.0}
        for line in (self.daemon.get("/metrics") or "").splitlines():
            name, _, value = line.partition(" ")
            for suffix in seen:
                if name == f"courierd_ingest_batch_messages{suffix}":
                    seen[suffix] = float(value)
        return seen["_sum"], seen["_count"]

    def drained(self, published: int, statuses: int) -> bool:
        if self.daemon.received() < published:
            return False
        return self.sandbox.count() >= self.before + statuses

    def arrivals(self, statuses: set[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.sandbox.requests(self.before):
            if r["order_id"] in statuses:
                out.setdefault(r["order_id"], r["at"])
        return out


class BareSubject(Subject):
    name = "bare"

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process, self.conn = process, conn

    def cpu(self) -> dict[str, float]:
        assert self.process.pid is not None
        return {"bare": process_cpu_s(self.process.pid)}

    def drained(self, published: int, statuses: int) -> bool:
        self.conn.send("count")
        count, arrived = receive(self.conn, 30, "the bare subscriber")
        return bool(count >= published and arrived >= statuses)

    def arrivals(self, statuses: set[str]) -> dict[str, float]:
        self.conn.send("arrivals")
        arrivals = receive(self.conn, 30, "the bare subscriber")
        return {o: at for o, at in arrivals.items() if o in statuses}


def receive(conn: Connection, timeout: float, who: str) -> Any:
    """The next answer from a child process: EOFError if it died (the parent holds no
    copy of the child's end), RuntimeError if it said nothing for `timeout` seconds."""
    if not conn.poll(timeout):
        raise RuntimeError(f"{who}: no answer in {timeout:.0f} s")
    return conn.recv()


def quantile(ordered: list[float], q: float) -> float:
    """Nearest rank; +inf if the list is empty."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("inf")


def run_step(
    subject: Subject,
    conn: Connection,
    others: dict[str, int],
    rate: int,
    seconds: float,
    tag: str,
    backlog_before: bool,
) -> dict[str, Any]:
    """One step of the ladder: publish at `rate` for `seconds`, CPU meanwhile, then wait
    for the backlog to drain; the step's figures."""

    def cpu() -> dict[str, float]:
        used = {name: process_cpu_s(pid) for name, pid in others.items()}
        return {**used, **subject.cpu(), "machine": machine_cpu_s()}

    conn.send((rate, seconds, tag))
    if receive(conn, 120, "the publisher") != "started":
        raise RuntimeError("the publisher did not start its step")
    t0, cpu0, batches0 = time.perf_counter(), cpu(), subject.batches()
    if receive(conn, seconds + 60, "the publisher") != "ended":
        raise RuntimeError("the publisher did not end its step")
    wall, cpu1, batches1 = time.perf_counter() - t0, cpu(), subject.batches()
    ended = time.perf_counter()
    pub = receive(conn, 120, "the publisher")
    statuses = set(pub["sent_at"])
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not (drained := subject.drained(pub["published_total"], pub["statuses_total"])):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    drain_s = time.perf_counter() - ended
    arrivals = subject.arrivals(statuses)
    delays = sorted((arrivals[o] - at) * 1000 for o, at in pub["sent_at"].items() if o in arrivals)
    missing = len(statuses) - len(delays)
    delays += [float("inf")] * missing
    p50, p99 = quantile(delays, 0.5), quantile(delays, 0.99)
    cpu_pct = {k: round((cpu1[k] - cpu0.get(k, 0.0)) / wall * 100, 1) for k in cpu1}
    machine = cpu_pct.pop("machine")
    ours = sum(cpu_pct.values())
    sent = pub["acked_in_step"] / pub["seconds"]
    # CPU µs per message sent: what a message costs each process (batches grow with the
    # rate, so the per-batch costs are shared by more messages as it rises)
    us_per_msg = {k: round(v / 100 / sent * 1e6, 1) for k, v in cpu_pct.items() if sent}
    committed, batches = (b - a for a, b in zip(batches0, batches1, strict=True))
    # CPU µs per committed batch of courierd's processes: with the batch size, what a
    # batch costs beyond its messages (README "Capacity", per-batch costs)
    us_per_batch = {
        k: round(v / 100 * wall / batches * 1e6)
        for k, v in cpu_pct.items()
        if batches and k.startswith("courierd")
    }
    kept_up = drained and drain_s <= KEPT_UP_S
    held = p99 <= P99_GOAL_MS and sent >= SENT_GOAL * rate and missing == 0 and kept_up
    return {
        "rate": rate,
        "sent_per_s": round(sent),
        "sent_ratio": round(sent / rate, 3),
        "statuses": len(statuses),
        "missing": missing,
        "p50_ms": finite(p50),
        "p99_ms": finite(p99),
        "drain_s": round(drain_s, 2),
        "drained": drained,
        "kept_up": kept_up,
        "started_on_backlog": backlog_before,
        "held": held,
        "cpu_pct": cpu_pct,
        "cpu_us_per_msg": us_per_msg,
        "mean_batch": round(committed / batches, 1) if batches else None,
        "cpu_us_per_batch": us_per_batch,
        "machine_cpu_pct": round(machine, 1),
        "other_cpu_pct": round(max(0.0, machine - ours), 1),  # the shared machine's others
        "publisher_lag_p99_ms": round(pub["lag_p99_ms"], 1),
    }


def finite(ms: float) -> float | None:
    """A latency in ms, rounded; None when some status never arrived (JSON has no inf)."""
    return None if ms == float("inf") else round(ms, 2)


def ladder(
    subject: Subject,
    broker: LocalBroker,
    sandbox: SandboxProc,
    rates: tuple[int, ...],
    seconds: float,
    label: str,
) -> list[dict[str, Any]]:
    """The publisher started in its own process, a warm-up, then every step in turn."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    publisher = ctx.Process(target=publisher_main, args=(broker.port, theirs), daemon=True)
    publisher.start()
    theirs.close()  # the child's copy only: its death is then an EOF here, not a hang
    try:
        assert broker.proc is not None and publisher.pid is not None
        others = {
            "mosquitto": broker.proc.pid,
            "publisher": publisher.pid,
            "sandbox": sandbox.proc.pid,
        }
        warm_rate, warm_s = WARM_UP
        warm = run_step(subject, ours, others, warm_rate, min(warm_s, seconds), f"w{label}", False)
        backlog = not warm["drained"]
        steps = []
        for rate in rates:
            step = run_step(subject, ours, others, rate, seconds, f"{label}-{rate}", backlog)
            backlog = not step["drained"]
            say("  " + row(subject.name, step))
            steps.append(step)
        ours.send(None)
        publisher.join(30)
        return steps
    finally:
        if publisher.is_alive():
            publisher.terminate()
            publisher.join(10)


def courierd_ladder(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    rates: tuple[int, ...],
    seconds: float,
    label: str,
) -> list[dict[str, Any]]:
    """courierd at its defaults, on a database with PING_COURIERS geofenced orders."""
    work = root / f"capacity-{label}"
    work.mkdir()
    name = f"bench-courierd-cap{label}"
    geofenced_orders(StoreSettings(path=work / "courierd.db"), PING_COURIERS)
    daemon = Courierd(work, broker, sandbox.url, name)
    daemon.start()
    try:
        steps = ladder(CourierdSubject(daemon, sandbox), broker, sandbox, rates, seconds, label)
        ignored = sum(
            float(line.rsplit(" ", 1)[1])
            for line in (daemon.get("/metrics") or "").splitlines()
            if line.startswith("courierd_fixes_ignored_total")
        )
        if ignored:  # the fixes must all be accepted, or the rules would not all run
            say(f"  courierd ignored {ignored:.0f} fixes")
        return steps
    finally:
        daemon.stop()
        forget_session(broker.port, name)


def bare_ladder(
    broker: LocalBroker,
    sandbox: SandboxProc,
    rates: tuple[int, ...],
    seconds: float,
    label: str,
) -> list[dict[str, Any]]:
    """The same ladder against the bare subscriber in its own process."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    bare_id = f"bench-cap-bare{label}"
    process = ctx.Process(target=bare_main, args=(broker.port, bare_id, theirs), daemon=True)
    process.start()
    theirs.close()
    try:
        if receive(ours, 60, "the bare subscriber") != "ready":
            raise RuntimeError("the bare subscriber did not start")
        steps = ladder(BareSubject(process, ours), broker, sandbox, rates, seconds, label)
        ours.send(None)
        process.join(10)
        return steps
    finally:
        if process.is_alive():
            process.terminate()
            process.join(10)
        forget_session(broker.port, bare_id)


CPU_COLUMNS = (
    "courierd",
    "courierd-ingest",
    "courierd-push",
    "courierd-http",
    "mosquitto",
    "publisher",
    "sandbox",
    "bare",
)
SHORT = {"courierd-ingest": "ingest", "courierd-push": "push", "courierd-http": "http"}


def row(who: str, s: dict[str, Any]) -> str:
    cpu = ", ".join(
        f"{SHORT.get(k, k)} {s['cpu_pct'][k]:.0f}" for k in CPU_COLUMNS if k in s["cpu_pct"]
    )
    p50 = "lost" if s["p50_ms"] is None else f"{s['p50_ms']:.1f}"
    p99 = "lost" if s["p99_ms"] is None else f"{s['p99_ms']:.1f}"
    per_batch = s.get("cpu_us_per_batch") or {}
    batch = f"batch {s['mean_batch']:.0f}" if s.get("mean_batch") else ""
    if batch and per_batch:
        costs = ", ".join(f"{SHORT.get(k, k)} {v:,.0f}" for k, v in per_batch.items())
        batch += f" (CPU µs a batch: {costs})"
    batch += "; " if batch else ""
    return (
        f"{who:8} {s['rate']:>6,}/s: sent {s['sent_per_s']:>6,}/s, p50 {p50} ms, p99 {p99} ms, "
        f"drain {s['drain_s']:.1f} s, {'held' if s['held'] else 'NOT held'}; CPU % {cpu}; "
        f"{batch}machine {s['machine_cpu_pct']:.0f} (others {s['other_cpu_pct']:.0f})"
    )


def table(mine: list[dict[str, Any]], bare: list[dict[str, Any]]) -> list[str]:
    """The median rows as a Markdown table (README "Capacity"): courierd and the bare
    subscriber side by side, CPU in % of one core."""

    def ms(v: float | None) -> str:
        return "lost" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

    def cpu(s: dict[str, Any], names: tuple[str, ...]) -> str:
        return " / ".join(f"{s['cpu_pct'].get(n, 0.0):.0f}" for n in names)

    def held(s: dict[str, Any]) -> str:
        return "✓" if s["held"] else "✗"

    lines = [
        "| rate msg/s | courierd sent/s | p50 ms | p99 ms | held | CPU %: courierd / ingest "
        "/ push / http / broker / publisher | bare sent/s | p50 ms | p99 ms | held | CPU %: "
        "bare / broker / publisher | machine CPU % (others) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mine_cpu = ("courierd", "courierd-ingest", "courierd-push", "courierd-http", "mosquitto")
    for c, b in zip(mine, bare, strict=True):
        lines.append(
            f"| {c['rate']:,} | {c['sent_per_s']:,} | {ms(c['p50_ms'])} | {ms(c['p99_ms'])} "
            f"| {held(c)} | {cpu(c, (*mine_cpu, 'publisher'))} | {b['sent_per_s']:,} "
            f"| {ms(b['p50_ms'])} | {ms(b['p99_ms'])} | {held(b)} "
            f"| {cpu(b, ('bare', 'mosquitto', 'publisher'))} "
            f"| {c['machine_cpu_pct']:.0f} ({c['other_cpu_pct']:.0f}) / "
            f"{b['machine_cpu_pct']:.0f} ({b['other_cpu_pct']:.0f}) |"
        )
    return lines


def median_steps(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per rate, each field's median over the runs (a latency none of whose statuses were
    lost in the median run); held by the medians; and each run's p99 and held."""

    def med(values: list[Any]) -> Any:
        known = sorted(v for v in values if v is not None)
        if len(known) <= len(values) // 2:  # most runs lost statuses
            return None
        # the lost runs count as slower than any: the median of the whole list
        padded = known + [float("inf")] * (len(values) - len(known))
        value = statistics.median_low(padded)
        return None if value == float("inf") else value

    out = []
    for steps in zip(*runs, strict=True):
        names = sorted({k for s in steps for k in s["cpu_pct"]})
        m: dict[str, Any] = {"rate": steps[0]["rate"]}
        for key in ("sent_per_s", "sent_ratio", "p50_ms", "p99_ms", "drain_s", "missing"):
            m[key] = med([s[key] for s in steps])
        m["publisher_lag_p99_ms"] = med([s["publisher_lag_p99_ms"] for s in steps])
        m["machine_cpu_pct"] = med([s["machine_cpu_pct"] for s in steps])
        m["other_cpu_pct"] = med([s["other_cpu_pct"] for s in steps])
        m["cpu_pct"] = {n: med([s["cpu_pct"].get(n, 0.0) for s in steps]) for n in names}
        m["cpu_us_per_msg"] = {
            n: med([s["cpu_us_per_msg"].get(n, 0.0) for s in steps]) for n in names
        }
        m["mean_batch"] = med([s["mean_batch"] for s in steps])
        per_batch = [s.get("cpu_us_per_batch") or {} for s in steps]
        m["cpu_us_per_batch"] = {
            n: med([b.get(n, 0.0) for b in per_batch]) for n in names if n.startswith("courierd")
        }
        m["kept_up_runs"] = sum(s["kept_up"] for s in steps)
        m["drained_runs"] = sum(s["drained"] for s in steps)
        m["started_on_backlog_runs"] = sum(s["started_on_backlog"] for s in steps)
        m["held"] = (
            m["p99_ms"] is not None
            and m["p99_ms"] <= P99_GOAL_MS
            and m["sent_ratio"] >= SENT_GOAL
            and m["kept_up_runs"] * 2 > len(steps)
        )
        m["p99_ms_runs"] = [s["p99_ms"] for s in steps]
        m["held_runs"] = [s["held"] for s in steps]
        out.append(m)
    return out


def reading(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest rate held (every step up to it held) and, at the first step that did
    not hold, what saturated: a process at FULL_PCT of a core or more (the busiest), else
    the machine's cores if they were all busy (the shared machine's other work counts),
    else nothing at its limit (a latency cliff with CPU to spare)."""
    highest = 0
    for s in steps:
        if not s["held"]:
            break
        highest = s["rate"]
    failed = next((s for s in steps if not s["held"]), None)
    at = failed or steps[-1]
    busiest, pct = max(at["cpu_pct"].items(), key=lambda kv: kv[1])
    machine, others = at["machine_cpu_pct"], at["other_cpu_pct"]
    cores = os.cpu_count() or 1
    if pct >= FULL_PCT:
        saturated, what = busiest, f"{busiest} at {pct:.0f}% of a core"
    elif machine >= FULL_PCT * cores:
        saturated = "cores"
        what = (
            f"the {cores} cores ({machine:.0f}%, of which others {others:.0f}%); "
            f"busiest process {busiest} at {pct:.0f}%"
        )
    else:
        saturated, what = None, f"no process nor the cores full; busiest {busiest} at {pct:.0f}%"
    return {
        "highest_held_msgs_per_s": highest,
        "first_not_held_msgs_per_s": failed["rate"] if failed else None,
        "saturated": saturated if failed else None,
        "busiest_process": busiest,
        "busiest_cpu_pct": pct,
        "saturates_first": f"at {at['rate']:,} msg/s: {what}"
        if failed
        else f"every step held; at the top: {what}",
    }


def capacity(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    reps: range,
    quick: bool,
) -> dict[str, Any]:
    rates, seconds = (QUICK_RATES, QUICK_STEP_S) if quick else (RATES, STEP_S)
    say(
        f"capacity: {PING_COURIERS:,} geofenced couriers, fixes at "
        f"{', '.join(f'{r // 1000}k' for r in rates)} msg/s for {seconds:.0f} s each, "
        f"a dasher_confirmed every {STATUS_EVERY_S * 1000:.0f} ms; courierd and a bare "
        "subscriber"
    )
    runs: dict[str, list[list[dict[str, Any]]]] = {"courierd": [], "bare": []}
    for i in reps:
        order = ("courierd", "bare") if i % 2 == 0 else ("bare", "courierd")
        for who in order:
            say(f" run {i + 1}: {who}")
            if who == "courierd":
                runs[who].append(courierd_ladder(broker, sandbox, root, rates, seconds, f"{i}"))
            else:
                runs[who].append(bare_ladder(broker, sandbox, rates, seconds, f"{i}"))
    out: dict[str, Any] = {
        "couriers": PING_COURIERS,
        "rates": list(rates),
        "step_s": seconds,
        "statuses_per_s": round(1 / STATUS_EVERY_S),
        "goal": f"p99 <= {P99_GOAL_MS:.0f} ms, sent >= {SENT_GOAL} of the rate, "
        f"backlog gone within {KEPT_UP_S:.0f} s",
    }
    for who, ladders_run in runs.items():
        steps = median_steps(ladders_run)
        out[who] = {"steps": steps, **reading(steps), "runs": ladders_run}
    out["table_md"] = table(out["courierd"]["steps"], out["bare"]["steps"])
    say(f"capacity, median of {len(reps)} (CPU in % of one core):")
    for line in out["table_md"]:
        say("  " + line)
    for who in runs:
        r = out[who]
        say(
            f"  {who}: highest held {r['highest_held_msgs_per_s']:,} msg/s; "
            f"saturates first: {r['saturates_first']}"
        )
    return out
