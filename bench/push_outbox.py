"""The push process's own work per push, alone: a filled outbox delivered by the
dispatcher and the pusher (`Dispatcher` + `Pusher`, as `dispatch_main` runs them) in
this process, to `courierd sandbox` in another, so that this process's CPU time (or,
under valgrind, its instructions) is the push path's: claims, the HTTP client, the
reply's reading, the results' commits and the hand-overs between the two threads.

No broker, no ingest, no MQTT process: what `bench/status_drain.py` measures around it
moves with them. Each round fills a fresh SQLite outbox (`--orders` orders, five
statuses each, committed by the ingest writer as ingest would, in this process), then
delivers it in a child process of the tree's own. Figures: CPU µs per delivered push
(user + system of the child while it delivers), and of it the dispatcher thread's in
claims and in recording results (commits included).

Usage (from outside the work tree, so `courierd` is the tree named):

    cd /tmp && PYTHONPATH=/work/wt/x /work/wt/x/.venv/bin/python -m bench.push_outbox \
        --tree new=/work/wt/x --tree old=/tmp/x-old [--orders 2000] [--rounds 5] \
        [--profile NAME:out.txt] [--json out.json]

The trees run alternating (in order, then reversed); one sandbox (from this process's
tree) serves all. `--profile` records the first round of that tree with py-spy (`--gil`,
raw format). For instructions, fill once and run one child under valgrind:
`python -m bench.push_outbox --child --fill --db PATH --orders N`, then
`valgrind --tool=cachegrind python -m bench.push_outbox --child --url URL --db PATH`
on copies of it, for two sizes: the difference over the difference in pushes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import KEY, STATUSES, SandboxProc, say

HERE = Path(__file__).resolve().parent.parent  # bench's own tree


def fill(db: Path, orders: int) -> int:
    """A fresh outbox at `db`: `orders` x 5 pending pushes, committed by the ingest
    writer as ingest would (in batches of 5,000)."""
    from courierd.config import StoreSettings
    from courierd.domain.model import Status, StatusEvent
    from courierd.store import open_store

    events = [
        StatusEvent(f"e{o}-{s}", f"o{o}", "c1", Status(STATUSES[s]))
        for s in range(len(STATUSES))
        for o in range(orders)
    ]
    store = open_store(StoreSettings(path=db))
    for i in range(0, len(events), 5000):
        store.writer.commit(events[i : i + 5000], now=time.time())
    store.close()
    return len(events)


def child(url: str, db: Path, profile: str | None) -> dict[str, Any]:
    """Deliver every pending push of the outbox at `db`; CPU per push."""
    import logging

    from courierd.config import StoreSettings
    from courierd.daemon.dispatch import Dispatcher
    from courierd.daemon.ipc import quick_thread_handovers, settle_gc
    from courierd.edges.pusher import Pusher
    from courierd.store import open_store

    logging.basicConfig(level=logging.WARNING)  # as the bench's daemon
    quick_thread_handovers()
    settings = StoreSettings(path=db)
    store = open_store(settings)
    total = store.outbox.stats()[0]
    spent = {"claims": 0, "claim_cpu_s": 0.0, "records": 0, "record_cpu_s": 0.0}

    def timed(name: str, method: Any) -> Any:  # the dispatcher thread's CPU in each
        def wrapped(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return method(*a, **k)
            finally:
                spent[f"{name}_cpu_s"] += time.thread_time() - t
                spent[f"{name}s"] += 1

        return wrapped

    store.outbox.claim_due = timed("claim", store.outbox.claim_due)  # type: ignore[method-assign]
    store.outbox.record_results = timed("record", store.outbox.record_results)  # type: ignore[method-assign]
    pusher = Pusher(url, KEY, max_connections=256)
    dispatcher = Dispatcher(store.outbox, pusher, concurrency=256)
    stop = threading.Event()
    settle_gc()
    spy = None
    if profile:  # py-spy on this process while it delivers (both threads)
        spy_cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking"]
        spy_cmd += ["-r", "500", "-f", "raw", "-t", "--gil", "-p", str(os.getpid()), "-o", profile]
        spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches

    def run() -> None:
        dispatcher.run(stop, grace_s=5.0)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    worker = threading.Thread(target=run, name="dispatch")
    worker.start()
    deadline = time.monotonic() + 600
    while dispatcher.stats.outcomes["delivered"] < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"delivered {dispatcher.stats.outcomes} of {total}")
        time.sleep(0.1)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    stop.set()
    dispatcher.wake()
    worker.join()
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    pusher.close()
    outcomes = dict(dispatcher.stats.outcomes)
    store.close()
    return {
        "pushes": total,
        "cpu_us_per_push": round(cpu / total * 1e6, 1),
        "per_s": round(total / wall),
        "outcomes": outcomes,
        "claims": spent["claims"],
        "claim_cpu_us_per_push": round(spent["claim_cpu_s"] / total * 1e6, 1),
        "records": spent["records"],
        "record_cpu_us_per_push": round(spent["record_cpu_s"] / total * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--orders", type=int, default=2000)
    ap.add_argument("--fill", action="store_true", help="with --db: only fill the outbox")
    ap.add_argument("--profile", action="append", default=[], help="NAME:FILE (py-spy, raw)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--url")
    ap.add_argument("--db", type=Path)
    args = ap.parse_args()
    if args.child:
        prof = args.profile[0] if args.profile else None
        if args.fill:
            fill(args.db, args.orders)
            return
        got = child(args.url, args.db, prof)
        print(json.dumps(got), flush=True)
        return
    trees = dict(t.split("=", 1) for t in args.tree)
    profiles = dict(p.split(":", 1) for p in args.profile)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    sandbox = SandboxProc()
    try:
        with tempfile.TemporaryDirectory(prefix="courierd-push-outbox-") as tmp:
            for r in range(args.rounds):
                for name in list(trees) if r % 2 == 0 else list(reversed(trees)):
                    db = Path(tmp) / f"{name}{r}.db"
                    fill(db, args.orders)
                    cmd = [sys.executable, "-m", "bench.push_outbox", "--child"]
                    cmd += ["--url", sandbox.url, "--db", str(db)]
                    if name in profiles and r == 0:
                        cmd += ["--profile", profiles[name]]
                    env = os.environ | {"PYTHONPATH": f"{trees[name]}:{HERE}"}
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if out.returncode:
                        raise RuntimeError(f"{name}: {out.stderr[-2000:]}")
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    say(f"{name} round {r}: {json.dumps(got)}")
                    results[name].append(got)
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{db}{suffix}").unlink(missing_ok=True)
    finally:
        sandbox.stop()
    say("medians (CPU µs per push):")
    for name, runs in results.items():
        us = [r["cpu_us_per_push"] for r in runs]
        say(f"  {name}: {statistics.median(us)} {us}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
