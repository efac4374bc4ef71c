"""CPU per POST of courierd's OneTablet client on each library, alternating in one run:
the client alone (`OneTabletHttp` with the policy, through `onetablet.call` as every
push goes), against `courierd sandbox` in its own process, so that this process's CPU
time is the client's.

Two settings: sequential POSTs to a sandbox that answers at once, and `--in-flight`
POSTs at a time to one that answers after `--latency-ms` (a OneTablet far away). Each
round runs every client in turn (in order, then reversed), after one warm-up round;
the figures are the medians over rounds.

Usage: .venv/bin/python -m bench.client_cpu [--clients aiohttp,httptools] [--rounds 5]
    [--posts 3000] [--in-flight 256] [--latency-ms 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import SandboxProc, say
from bench.phases.pushes import client_posts
from courierd.edges.onetablet_http import CLIENTS


def measure(
    url: str, clients: list[str], rounds: int, posts: int, in_flight: int
) -> dict[str, list[float]]:
    """µs of CPU per POST, per client, one figure a round."""
    for client in clients:  # warm-up: imports, first connections, caches
        client_posts(url, max(posts // 10, 50), in_flight, client)
    got: dict[str, list[float]] = {c: [] for c in clients}
    for r in range(rounds):
        for client in clients if r % 2 == 0 else list(reversed(clients)):
            us = client_posts(url, posts, in_flight, client).cpu_ms * 1000
            got[client].append(round(us, 1))
            say(f"  round {r} {client}: {us:.1f} µs CPU per POST")
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="aiohttp,httptools")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--latency-ms", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clients = args.clients.split(",")
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown clients {sorted(unknown)}; of {', '.join(CLIENTS)}")
    results: dict[str, dict[str, object]] = {}
    settings = [
        ("sequential", (), 1),
        (
            f"{args.in_flight} in flight, {args.latency_ms} ms",
            ("--latency-ms", str(args.latency_ms)),
            args.in_flight,
        ),
    ]
    for name, flags, in_flight in settings:
        say(f"{name}:")
        sandbox = SandboxProc(*flags)
        try:
            got = measure(sandbox.url, clients, args.rounds, args.posts, in_flight)
        finally:
            sandbox.stop()
        medians = {c: statistics.median(v) for c, v in got.items()}
        results[name] = {"rounds": got, "median_us": medians}
        say(f"{name}: medians " + ", ".join(f"{c} {m:.1f} µs" for c, m in medians.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
