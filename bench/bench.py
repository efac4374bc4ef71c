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
   and the bytes each accepted fix takes on disk;
9. capacity: 10k couriers with geofenced orders, a publisher in its own process sending
   fixes at 2k .. 10k msg/s (and a fresh order's dasher_confirmed every 20 ms): per step,
   sent, p50/p99 publish → POST, each process's CPU; beside each step, a bare paho
   subscriber in its own process; the highest rate held and what saturates first.

Each phase lives in bench/phases/ (one module each, or a closely related group); what
they share (the broker's clients, the sandbox and the daemon as subprocesses, the
workloads, the statistics) is in bench/common.py. This file is the command line.

Each ratio (and the latency p99) is the median of --repeats runs (3).
Usage: scripts/bench [--quick] [--only PHASES] [--repeats N] [--out FILE].
Figures go to stdout and to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    PING_COURIERS,
    RunFolder,
    SandboxProc,
    median_run,
    say,
    stop_every_daemon,
)
from bench.phases.capacity import capacity
from bench.phases.cluster import cluster_phase
from bench.phases.ingest import ingest
from bench.phases.latency import latency, latency_beside_page
from bench.phases.lifecycle import lifecycle_cost
from bench.phases.memory import memory_and_start
from bench.phases.postgres import postgres_phases
from bench.phases.pushes import pushes, remote_pushes, together
from bench.phases.replay import replay_cost
from courierd.devtools.localbroker import LocalBroker

# The phases, in the order a full run takes them (`phases` in main: one entry each).
PHASES = (
    "lifecycle",
    "ingest_pings",
    "ingest_places",
    "ingest_status",
    "ingest_pings_311",
    "ingest_status_311",
    "pushes",
    "pushes_100ms",
    "pushes_300ms",
    "end_to_end",
    "postgres",
    "cluster",
    "latency",
    "replay",
    "latency_page",
    "memory",
    "capacity",
)


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
        "--only", help=f"comma-separated phases to run (default all): {', '.join(PHASES)}"
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like an error, so every process the bench started is ended.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = 0.1 if args.quick else 1.0
    with RunFolder("courierd-bench-") as work:
        root = work.path
        broker = work.started(LocalBroker(root / "broker", persistence=True).start())
        sandbox = work.started(SandboxProc())
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
                [
                    ingest(broker, sandbox, root, ping_n, 0.95, f"pv3{i}", protocol="3.1.1")
                    for i in reps
                ]
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
            "capacity": lambda: capacity(broker, sandbox, root, reps, args.quick),
        }
        assert tuple(phases) == PHASES, "PHASES names every phase, in order"
        failed: list[str] = []
        try:  # from here on, whatever ends the run stops the broker and the sandbox
            chosen = args.only.split(",") if args.only else list(phases)
            if args.no_postgres:
                chosen = [name for name in chosen if name not in ("postgres", "cluster")]
            unknown = set(chosen) - set(phases)
            if unknown:
                parser.error(f"unknown phases {sorted(unknown)}; known: {', '.join(phases)}")
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
                    "ratio_with_places_over_without": round(
                        with_places["ratio"] / without["ratio"], 3
                    ),
                    "rate_with_places_over_without": round(
                        with_places["courierd_msgs_per_s"] / without["courierd_msgs_per_s"], 3
                    ),
                    "goal": ">= 0.9",
                }
        finally:
            stop_every_daemon()
            sandbox.stop()
            broker.stop()
        work.failed = bool(failed)  # kept: the daemons' and the broker's logs say what went wrong
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
