"""Phase ingest: bare paho subscribers (the ceiling) versus courierd's durable ingest,
all draining the same queued backlog from persistent sessions."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    PROTOCOLS,
    Courierd,
    SandboxProc,
    drain_bare,
    forget_daemon_sessions,
    forget_session,
    geofenced_orders,
    messages,
    process_cpu_s,
    publish_all,
    register_bare,
    say,
    wait_for_shares,
)
from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker

WARM_UP = 0.1  # the first tenth of a backlog overlaps the daemon's start: not counted


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
) -> dict[str, Any]:
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
    ceiling, ceiling_cpu = max(bare.values())
    # courierd's own processes, against what the ceiling's subscriber spends: the broker
    # serves both alike, and the stand-in OneTablet is another machine in production.
    own_cpu = sum(v for k, v in cpu_us.items() if k not in others)
    bares = ", ".join(f"MQTT {p} {r:,.0f} ({c:.0f} µs CPU)" for p, (r, c) in bare.items())
    say(f"  bare paho {bares} msg/s; courierd {rate:,.0f} msg/s ({rate / ceiling:.2f}x)")
    say("  CPU µs per message: " + ", ".join(f"{k} {v}" for k, v in sorted(cpu_us.items())))
    say(f"  courierd's own CPU per message: {own_cpu / ceiling_cpu:.1f}x the ceiling's")
    return {
        "messages": n,
        "publish_rate": round(publish_rate),
        **{f"bare_mqtt{_short(p)}_msgs_per_s": round(r) for p, (r, _) in bare.items()},
        **{f"bare_mqtt{_short(p)}_cpu_us_per_msg": round(c, 1) for p, (_, c) in bare.items()},
        "ceiling_msgs_per_s": round(ceiling),
        "courierd_msgs_per_s": round(rate),
        "cpu_us_per_msg": cpu_us,
        "ratio": round(rate / ceiling, 3),
        "own_cpu_ratio": round(own_cpu / ceiling_cpu, 2),
    }


def _short(protocol: str) -> str:
    return protocol.replace(".", "")
