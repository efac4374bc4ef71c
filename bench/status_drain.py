"""Status-only backlog drain: durable ingest and the last push, with CPU per status of
each process, for one or more courierd source trees in one run (alternating).

Not the bench (`scripts/bench --only ingest_status` runs the same backlog for the ratio to the
bare subscriber); this follows the drain on to its end, the last push of the backlog at
the sandbox, which is what a priority between ingest and push changes:

- `ingest`: status/s durably ingested (counted after commit, from the first tenth on),
  and CPU µs per status of each process over that window (as the bench phase does);
- `last push`: seconds from the first commit to the backlog's last push at the sandbox,
  and CPU µs per status of each process over the whole drain (ingest and pushes).

Each status is a transition (orders walk the chain step by step), so n statuses make
n pushes. Usage (from outside the work tree, so `-m courierd` imports the tree named):

    cd /tmp && PYTHONPATH=/work/wt/x .venv/bin/python -m bench.status_drain \
        --tree new=/work/wt/x --tree old=/tmp/x-old [--messages N] [--rounds R] \
        [--env name:KEY=VALUE] [--sandbox-per-tree]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    Courierd,
    SandboxProc,
    ab_arguments,
    alternating_rounds,
    envs_of,
    forget_session,
    messages,
    name_key_values,
    process_cpu_s,
    publish_all,
    say,
    trees_of,
)
from courierd.devtools.localbroker import LocalBroker

WARM_UP = 0.1
PIDS_FILE = os.environ.get("STATUS_DRAIN_PIDS")  # where to write the drain's pids


def _pids(daemon: Courierd) -> dict[str, int]:
    return {Path(f"/proc/{p}/comm").read_text().strip(): p for p in daemon.tree()}


def drain(
    broker: LocalBroker,
    sandbox: SandboxProc,
    work: Path,
    tree: str,
    n: int,
    tag: str,
    env: dict[str, str],
    nice: dict[str, int],
) -> dict[str, Any]:
    work.mkdir()
    name = f"drain-{tag}"
    daemon = Courierd(work, broker, sandbox.url, name)
    daemon.env["PYTHONPATH"] = tree
    daemon.env.update(env)
    daemon.start()  # registers its persistent session
    daemon.stop()
    before = sandbox.count()
    publish_all(broker.port, messages(n, 0.0, tag))
    assert broker.proc is not None
    others = {"mosquitto": broker.proc.pid, "sandbox": sandbox.proc.pid}

    def cpu() -> Counter[str]:
        used: Counter[str] = Counter({k: process_cpu_s(p) for k, p in others.items()})
        used.update(daemon.cpu_by_process())
        return used

    daemon.start()
    for proc, pid in _pids(daemon).items():  # every thread: Linux nice is per thread
        for task in Path(f"/proc/{pid}/task").iterdir():
            if nice.get(proc):
                os.setpriority(os.PRIO_PROCESS, int(task.name), nice[proc])
    if PIDS_FILE:  # for an outside profiler (perf record -p)
        Path(PIDS_FILE).write_text(json.dumps(_pids(daemon)))
    t_first = t_warm = t_ingested = t_pushed = 0.0
    warm_n = 0.0
    cpu_warm: Counter[str] = Counter()
    cpu_ingested: Counter[str] = Counter()
    deadline = time.monotonic() + 600
    while True:
        got = daemon.received()
        pushed = sandbox.count() - before
        now = time.perf_counter()
        if got > 0 and not t_first:
            t_first = now
        if got >= WARM_UP * n and not t_warm:
            t_warm, warm_n, cpu_warm = now, got, cpu()
        if got >= n and not t_ingested:
            t_ingested, cpu_ingested = now, cpu()
        if pushed >= n:
            t_pushed = now
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag}: ingested {got}, pushed {pushed} of {n}")
        time.sleep(0.05)
    cpu_end = cpu()
    rss, pss = daemon.memory_mb()
    metrics = daemon.get("/metrics") or ""
    daemon.stop()
    forget_session(broker.port, name)
    ingest_cpu = cpu_ingested.copy()
    ingest_cpu.subtract(cpu_warm)
    whole = cpu_end.copy()
    whole.subtract(cpu_warm)
    counted = n - warm_n
    return {
        "ingest_per_s": round(counted / (t_ingested - t_warm)),
        "ingest_cpu_us": {k: round(v / counted * 1e6) for k, v in sorted(ingest_cpu.items())},
        "first_to_last_push_s": round(t_pushed - t_first, 2),
        "ingest_end_to_last_push_s": round(t_pushed - t_ingested, 2),
        "whole_cpu_us": {k: round(v / counted * 1e6) for k, v in sorted(whole.items())},
        "daemon_rss_pss_mb": [round(rss, 1), round(pss, 1)],  # its processes, at the end
        "pushes_failed_or_retried": sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("courierd_pushes_total") and 'outcome="delivered"' not in line
        ),
    }


def steady(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    tree: str,
    tag: str,
    seconds: float,
    rate: int,
    status_every: int,
) -> dict[str, Any]:
    """bench/phases/latency.py's phase (publish → POST of statuses among pings at a
    steady `rate`), with the daemon from `tree`."""
    from bench.phases import latency as phase

    class FromTree(Courierd):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.env["PYTHONPATH"] = tree

    phase.Courierd = FromTree  # type: ignore[attr-defined]
    return phase.latency(broker, sandbox, root, seconds, f"-{tag}", rate, status_every)


def main() -> None:
    ap = argparse.ArgumentParser()
    ab_arguments(ap, rounds=2)
    ap.add_argument("--nice", action="append", default=[], help="NAME:PROCESS=N (renice)")
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument(
        "--latency",
        type=float,
        metavar="SECONDS",
        help="instead of a drain: bench/phases/latency.py's steady load for SECONDS",
    )
    ap.add_argument("--rate", type=int, default=2000, help="--latency: msg/s")
    ap.add_argument("--status-every", type=int, default=20, help="--latency: 1 = statuses only")
    args = ap.parse_args()
    trees = trees_of(args)
    envs = envs_of(args)
    nices = {
        who: {process: int(n) for process, n in values.items()}
        for who, values in name_key_values(args.nice, trees).items()
    }

    def one(broker: LocalBroker, sandbox: SandboxProc, root: Path, name: str, r: int) -> Any:
        tag = f"{name}{r}"
        if args.latency:
            return steady(
                broker, sandbox, root, trees[name], tag, args.latency, args.rate, args.status_every
            )
        return drain(
            broker, sandbox, root / tag, trees[name], args.messages, tag, envs[name], nices[name]
        )

    results = alternating_rounds(
        "courierd-status-drain-", trees, args.rounds, args.sandbox_per_tree, one
    )
    say("medians:")
    summary = {}
    if args.latency:
        for name, runs in results.items():
            mid = {k: statistics.median(r[k] for r in runs) for k in ("p50_ms", "p99_ms")}
            summary[name] = {"median": mid, "runs": runs}
            say(f"  {name}: {json.dumps(mid)} (p99s {[r['p99_ms'] for r in runs]})")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
        return
    for name, runs in results.items():
        med: dict[str, Any] = {}
        for key in ("ingest_per_s", "first_to_last_push_s", "ingest_end_to_last_push_s"):
            med[key] = statistics.median(r[key] for r in runs)
        for key in ("ingest_cpu_us", "whole_cpu_us"):
            med[key] = {
                proc: statistics.median(r[key].get(proc, 0) for r in runs) for proc in runs[0][key]
            }
        summary[name] = {"median": med, "runs": runs}
        say(f"  {name}: {json.dumps(med)}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
