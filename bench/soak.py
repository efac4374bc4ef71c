"""courierd soak: hours of noisy couriers, a flaky OneTablet and crashes, then a check.

Runs its own Mosquitto, a sandbox that fails a share of calls (500s, 429s, latency),
the daemon, and simulated couriers with duplicates, reordering, offline bursts and
junk. Every `--kill-every` seconds the daemon is SIGKILLed and restarted; once in a
while the broker is restarted too. At the end it lets the outbox drain and checks
CONTRACT.md section 4 on what OneTablet received, for every order:

- the statuses delivered are a prefix of the chain, in order, each once (a push sent
  again after a crash must carry the same Idempotency-Key and follow its original);
- the last status delivered is the order's state in the database, and every order
  that reached a status in the database had its pushes delivered.

With `--postgres`, the same against a cluster: `--instances` (default 3) courierd
processes on one PostgreSQL database (a fresh one on the local server, or `--pg-url`,
dropped afterwards); each kill takes a random instance down and starts a new member.

Usage: scripts/soak [--minutes 10] [--couriers 50] [--postgres [--instances 3]].
Exit 0 when every check holds.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time

import psycopg

from bench.common import STATUSES, Courierd, RunFolder, SandboxProc, say, stop_every_daemon
from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker
from courierd.devtools.simulate import Noise, Simulation, mqtt_publisher
from courierd.store import Store, open_store


def check(requests: list[dict[str, object]], store: Store) -> tuple[int, list[str]]:
    """(orders checked, problems) for the delivered delivery-status calls."""
    per_order: dict[str, list[tuple[str, str]]] = {}
    for r in requests:
        if r["status"] == 200 and str(r["path"]).endswith("/delivery-status"):
            body = json.loads(str(r["body"]))
            per_order.setdefault(str(r["order_id"]), []).append(
                (body["delivery_status"], str(r["idempotency_key"]))
            )
    problems = []
    for order_id, pushes in per_order.items():
        keys: dict[str, str] = {}
        seq: list[str] = []
        for status, key in pushes:
            if keys.setdefault(status, key) != key:
                problems.append(f"{order_id}: {status} sent with two Idempotency-Keys")
            if seq and seq[-1] == status:
                continue  # a re-send after a crash, right after its original
            seq.append(status)
        if seq != STATUSES[: len(seq)]:
            problems.append(f"{order_id}: delivered {seq}, not a prefix of the chain")
        order = store.outbox.get_order(order_id)
        if order is None or (order.state != seq[-1] and order.state != "cancelled"):
            problems.append(
                f"{order_id}: delivered up to {seq[-1]}, stored "
                f"{order.state if order else 'nothing'}"
            )
    # And the other way round: every status committed was delivered.
    for order_id, state in store.db.rows("SELECT order_id, state FROM orders"):
        if state in STATUSES and order_id not in per_order:
            problems.append(f"{order_id}: stored {state}, nothing delivered")
    return len(per_order), problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--couriers", type=int, default=50)
    parser.add_argument("--kill-every", type=float, default=20.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--postgres", action="store_true", help="a cluster on PostgreSQL")
    parser.add_argument("--instances", type=int, default=3, help="cluster members")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where a database can be created (its own is made and dropped)",
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C: daemons, sandbox and broker stopped, the database
    # dropped, the working folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.postgres:
        return soak(args, None)
    name = f"courierd_soak_{int(time.time())}"
    admin = psycopg.connect(args.pg_url, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        return soak(args, args.pg_url.rsplit("/", 1)[0] + f"/{name}")
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def soak(args: argparse.Namespace, pg_url: str | None) -> int:
    rng = random.Random(args.seed)
    with RunFolder("courierd-soak-") as work:  # kept, and named, when a check fails
        root = work.path
        broker = work.started(LocalBroker(root / "broker").start())
        sandbox = work.started(
            SandboxProc(
                "--error-rate",
                "0.05",
                "--throttle-rate",
                "0.02",
                "--latency-ms",
                "3",
                "--seed",
                str(args.seed),
            )
        )
        members = 0

        def member() -> Courierd:
            nonlocal members
            members += 1
            folder = root / f"instance-{members}"
            folder.mkdir()
            d = Courierd(folder, broker, sandbox.url, "soak")
            d.env["COURIERD_ONETABLET__RETRY_SCHEDULE_S"] = "[0.2, 1.0, 2.0]"
            if pg_url is not None:
                d.env["COURIERD_STORE__URL"] = pg_url
            else:
                d.env["COURIERD_STORE__PATH"] = str(root / "courierd.db")
            d.start()
            return d

        daemons = [member() for _ in range(args.instances if pg_url else 1)]
        client, publish = mqtt_publisher("127.0.0.1", broker.port, "soak-couriers")
        sim = Simulation(
            publish,
            couriers=args.couriers,
            speed=120,
            seed=args.seed,
            noise=Noise(duplicates=0.05, reorder=0.05, offline=0.02, junk=0.01),
        )
        stop = threading.Event()
        threading.Thread(target=sim.run, args=(stop,), daemon=True).start()
        end = time.monotonic() + args.minutes * 60
        kills = restarts = 0
        next_kill = time.monotonic() + args.kill_every
        try:
            while time.monotonic() < end:
                time.sleep(1)
                left = end - time.monotonic()
                sys.stderr.write(
                    f"\rsoak: {left:5.0f} s left, orders done {sim.orders_done}, "
                    f"sent {sum(sim.sent.values())}, kills {kills}, "
                    f"broker restarts {restarts}   "
                )
                if time.monotonic() >= next_kill:
                    victim = rng.randrange(len(daemons))
                    daemons[victim].stop(kill=True)
                    kills += 1
                    if rng.random() < 0.2:
                        broker.stop()
                        broker.start()
                        restarts += 1
                    daemons[victim] = member()  # alone: the same again; a cluster: a new member
                    next_kill = time.monotonic() + args.kill_every * rng.uniform(0.5, 1.5)
            stop.set()
            say("\nsoak: couriers stopped; waiting for the outbox to drain")
            # Ask the database, not /healthz: its outbox gauge is refreshed once a second and
            # can still say 0 just after a commit; and the last messages may still be in
            # flight, so the outbox must stay empty for a few seconds.
            settings = (
                StoreSettings(url=pg_url) if pg_url else StoreSettings(path=root / "courierd.db")
            )
            store = open_store(settings, instance="soak-check")
            deadline, empty_since = time.monotonic() + 300, None
            while time.monotonic() < deadline:
                if store.outbox.stats()[0] > 0:
                    empty_since = None
                elif empty_since is None:
                    empty_since = time.monotonic()
                elif time.monotonic() - empty_since > 5:
                    break
                time.sleep(0.5)
            for d in daemons:
                d.stop()
            orders, problems = check(sandbox.requests(), store)
            store.close()
        finally:
            stop.set()
            client.loop_stop()
            stop_every_daemon()  # the killed ones' workers too
            sandbox.stop()
            broker.stop()
        for p in problems[:20]:
            say(f"  PROBLEM {p}")
        where = f"a cluster of {args.instances} on PostgreSQL" if pg_url else "SQLite"
        say(
            f"soak ({where}): {orders} orders checked, {kills} kills, {restarts} broker "
            f"restarts, {len(problems)} problems"
        )
        work.failed = bool(problems)  # the daemons' logs, the database: what went wrong
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
