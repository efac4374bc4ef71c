"""Pushes that trickle in: the push process's CPU per delivered push under a steady,
low rate of status events, for one or more courierd source trees in one run
(alternating, old and new in turn).

In the bench's 95 %-pings drain statuses reach the dispatcher a few per ingest commit,
not hundreds at once as in a status-only drain, and the push process then spent about
four times the CPU per push. This reproduces that case on its own, without a 20k msg/s
publisher on the same two cores: status events (optionally among pings) published at a
steady `--rate`, each order walking the chain one step per `--orders` statuses (so an
order's next status is never queued behind its previous push), and over a window after
a warm-up:

- CPU µs per delivered push of each process (user + system, /proc/PID/stat), the
  deliveries counted at the sandbox;
- context switches of the push process per push (voluntary: it went to sleep, a
  wake-up each) and the connections the sandbox saw opened.

Usage (from outside the work tree, so `-m courierd` imports the tree named):

    cd /tmp && PYTHONPATH=/work/wt/x /work/wt/x/.venv/bin/python -m bench.push_trickle \
        --tree new=/work/wt/x --tree old=/tmp/x-old [--rate 600] [--seconds 20] \
        [--rounds 3] [--status-every 1] [--spy NAME:out.svg] [--json out.json] \
        [--sandbox-per-tree] [--env NAME:KEY=VALUE]

One tree under two names, with `--env` telling them apart, compares settings (e.g.
`--env aio:COURIERD_ONETABLET__CLIENT=aiohttp`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    STATUSES,
    Courierd,
    SandboxProc,
    ab_arguments,
    alternating_rounds,
    client,
    envs_of,
    forget_session,
    process_cpu_s,
    say,
    trees_of,
)
from courierd.devtools.localbroker import LocalBroker

SYSCALLS = [
    f"syscalls:sys_enter_{name}"
    for name in ("fdatasync", "fsync", "futex", "epoll_wait", "poll", "write", "sendto")
]


def _user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of a process."""
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol += int(line.split()[1])
    return vol, invol


class Publisher:
    """Status events (one in `status_every` messages; the rest pings) at `rate` msg/s,
    on a thread, until stopped. Status k goes to order k % orders of its block, step
    k // orders of the chain: an order's next status comes `orders` statuses later."""

    def __init__(self, port: int, tag: str, rate: int, status_every: int, orders: int) -> None:
        self.c = client(port, f"trickle-pub-{tag}", session=False)
        self.tag, self.rate, self.every, self.orders = tag, rate, status_every, orders
        self.statuses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher")

    def __enter__(self) -> Publisher:
        self.c.loop_start()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.c.disconnect()
        self.c.loop_stop()

    def _run(self) -> None:
        tick = 0.005
        per_tick = self.rate * tick
        owed = 0.0
        due = time.perf_counter()
        i = 0
        block = self.orders * len(STATUSES)
        while not self._stop.is_set():
            owed += per_tick
            while owed >= 1:
                owed -= 1
                i += 1
                if i % self.every == 0:
                    k = self.statuses
                    self.statuses += 1
                    b, j = divmod(k, block)
                    step, o = divmod(j, self.orders)
                    order = f"{self.tag}-{b}-{o}"
                    body = {"event_id": f"{order}-{step}", "order_id": order}
                    body["status"] = STATUSES[step]
                    self.c.publish(f"couriers/c{o % 200}/status", json.dumps(body), qos=1)
                else:
                    ping = {"ts": "2026-01-01T00:00:00Z", "lat": 40.7, "lng": -74.0}
                    self.c.publish(f"couriers/c{i % 200}/location", json.dumps(ping), qos=1)
            due += tick
            self._stop.wait(max(0.0, due - time.perf_counter()))


def run_one(
    broker: LocalBroker,
    sandbox: SandboxProc,
    work: Path,
    tree: str,
    tag: str,
    args: argparse.Namespace,
    spy: str | None,
    env: dict[str, str],
) -> dict[str, Any]:
    work.mkdir()
    name = f"trickle-{tag}"
    daemon = Courierd(work, broker, sandbox.url, name)
    daemon.env["PYTHONPATH"] = tree
    daemon.env.update(env)
    daemon.start()
    assert broker.proc is not None
    others = {"mosquitto": broker.proc.pid, "sandbox": sandbox.proc.pid}
    pids = {Path(f"/proc/{p}/comm").read_text().strip(): p for p in daemon.tree()}
    push_pid = pids["courierd-push"]

    def cpu() -> Counter[str]:
        used: Counter[str] = Counter({k: process_cpu_s(p) for k, p in others.items()})
        used.update(daemon.cpu_by_process())
        return used

    with Publisher(broker.port, tag, args.rate, args.status_every, args.orders) as pub:
        time.sleep(args.warm)
        n0, c0, s0 = sandbox.count(), cpu(), _switches(push_pid)
        us0 = _user_sys(push_pid)
        conns0 = sandbox_connections(sandbox)
        profiler = None
        if spy:
            profiler = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(push_pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    "250",
                    "--threads",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    spy,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        counting = None
        if args.syscalls:  # how often the push process syncs, waits and wakes others
            counting = subprocess.Popen(
                ["perf", "stat", "-x", ",", "-e", ",".join(SYSCALLS), "-p", str(push_pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        t0 = time.perf_counter()
        time.sleep(args.seconds)
        n1, c1, s1 = sandbox.count(), cpu(), _switches(push_pid)
        us1 = _user_sys(push_pid)
        t1 = time.perf_counter()
        conns1 = sandbox_connections(sandbox)
        published = pub.statuses
        syscalls: dict[str, float] = {}
        if counting is not None:
            counting.send_signal(signal.SIGINT)
            _, err = counting.communicate(timeout=30)
            for line in err.splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[0].isdigit():
                    syscalls[fields[2].rsplit("_", 1)[-1]] = int(fields[0])
    if profiler is not None:
        profiler.wait(60)
    metrics = daemon.get("/metrics") or ""
    daemon.stop()
    forget_session(broker.port, name)
    pushes = n1 - n0
    used = c1.copy()
    used.subtract(c0)
    return {
        "pushes": pushes,
        "pushes_per_s": round(pushes / (t1 - t0)),
        "statuses_published": published,
        "cpu_us_per_push": {k: round(v / pushes * 1e6, 1) for k, v in sorted(used.items())},
        "push_user_sys_us": [round((us1[i] - us0[i]) / pushes * 1e6, 1) for i in (0, 1)],
        "push_switches_per_push": [round((s1[i] - s0[i]) / pushes, 2) for i in (0, 1)],
        "sandbox_threads_delta": conns1 - conns0,
        "push_syscalls_per_push": {k: round(v / pushes, 2) for k, v in syscalls.items()},
        "retried_or_failed": sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("courierd_pushes_total") and 'outcome="delivered"' not in line
        ),
    }


def sandbox_connections(sandbox: SandboxProc) -> int:
    """Threads of the sandbox: one per connection it serves (ThreadingHTTPServer), so a
    rise over the window counts connections opened and still open."""
    return len(list(Path(f"/proc/{sandbox.proc.pid}/task").iterdir()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ab_arguments(ap, rounds=3)
    ap.add_argument("--rate", type=int, default=600, help="messages/s published")
    ap.add_argument("--status-every", type=int, default=1, help="1: statuses only")
    ap.add_argument("--orders", type=int, default=500, help="orders walked side by side")
    ap.add_argument("--seconds", type=float, default=20.0, help="the measured window")
    ap.add_argument("--warm", type=float, default=4.0, help="seconds before the window")
    ap.add_argument("--spy", action="append", default=[], help="NAME:FILE (py-spy, raw)")
    ap.add_argument("--syscalls", action="store_true", help="count them (perf stat)")
    args = ap.parse_args()
    trees = trees_of(args)
    spies = dict(s.split(":", 1) for s in args.spy)
    envs = envs_of(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def one(broker: LocalBroker, sandbox: SandboxProc, root: Path, name: str, r: int) -> Any:
        spy = spies.get(name)
        if spy and args.rounds > 1:
            spy = f"{spy}.{r}"
        work, tag = root / f"{name}{r}", f"{name}{r}"
        return run_one(broker, sandbox, work, trees[name], tag, args, spy, envs[name])

    results = alternating_rounds(
        "courierd-push-trickle-", trees, args.rounds, args.sandbox_per_tree, one
    )
    say("medians (CPU µs per push):")
    summary = {}
    for name, runs in results.items():
        med = {
            proc: statistics.median(run["cpu_us_per_push"].get(proc, 0) for run in runs)
            for proc in runs[0]["cpu_us_per_push"]
        }
        push = [run["cpu_us_per_push"].get("courierd-push") for run in runs]
        summary[name] = {"median": med, "runs": runs}
        say(f"  {name}: {json.dumps(med)} (push process per run: {push})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, **summary}, indent=1))
    os._exit(0)  # paho's threads


if __name__ == "__main__":
    main()
