"""Phases latency and latency_page: publish → POST for status events while pings flow,
with courierd's stage histograms; and the same beside a client reading the dashboard."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import STATUSES, Courierd, SandboxProc, client, forget_session, p99_of, say
from courierd.devtools.localbroker import LocalBroker

STAGES = ("receive", "commit", "claim", "send", "reply", "record")


def stage_quantiles(metrics: str, q: float) -> dict[str, float]:
    """Per stage, the q-quantile (ms) of courierd_latency_stage_seconds, interpolated
    within its buckets the way Prometheus' histogram_quantile does."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in metrics.splitlines():
        if not line.startswith("courierd_latency_stage_seconds_bucket{"):
            continue
        labels, value = line[line.index("{") + 1 :].split("} ")
        fields = dict(part.split("=", 1) for part in labels.split(","))
        le = float(fields["le"].strip('"'))
        buckets.setdefault(fields["stage"].strip('"'), []).append((le, float(value)))
    out = {}
    for stage, counts in buckets.items():
        counts.sort()
        total = counts[-1][1]
        if not total:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for le, count in counts:
            if count >= rank:
                upper = le if le != float("inf") else lower
                share = (rank - below) / (count - below) if count > below else 0.0
                out[stage] = round((lower + (upper - lower) * share) * 1000, 2)
                break
            lower, below = le, count
    return {stage: out[stage] for stage in STAGES if stage in out}


def latency(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    seconds: float,
    label: str = "",
    rate: int = 2000,
    status_every: int = 20,
    beside: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, Any]:
    """publish → POST for status events while pings flow at `rate` msg/s in all; where
    the time goes, from courierd's own stage histograms; and how far the harness's
    publisher fell behind its schedule (not courierd's: delays start at the publish call).
    `beside(http_port)`, if given, runs around the publishing (a page reader); one
    message in `status_every` is a status event (1: statuses only)."""
    say(
        f"latency: {seconds:.0f} s at {rate} msg/s ({1 - 1 / status_every:.0%} pings), "
        "publish → POST"
    )
    work = root / f"latency{label}"
    work.mkdir()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-latency{label}")
    daemon.start()
    c = client(broker.port, "bench-latency-pub", session=False)
    c.loop_start()
    around = beside(daemon.port) if beside else contextlib.nullcontext()
    around.__enter__()
    sent: dict[tuple[str, str], float] = {}
    lags: list[float] = []
    tick, per_tick = 0.01, rate // 100
    start = time.perf_counter()
    next_tick, i = start, 0
    before = sandbox.count()
    while time.perf_counter() - start < seconds:
        lags.append(time.perf_counter() - next_tick)
        for _ in range(per_tick):
            i += 1
            if i % status_every == 0:  # status events (5 %), each order walking the chain
                o, s = divmod(i // status_every, len(STATUSES))
                order = f"lat{label}-{o}"
                payload = json.dumps(
                    {"event_id": f"lat-{i}", "order_id": order, "status": STATUSES[s]}
                ).encode()
                sent[(order, STATUSES[s])] = time.time()
                c.publish(f"couriers/c{o % 200}/status", payload, qos=1)
            else:
                c.publish(
                    f"couriers/c{i % 200}/location",
                    json.dumps({"ts": "2026-01-01T00:00:00Z", "lat": 40.7, "lng": -74.0}).encode(),
                    qos=1,
                )
        next_tick += tick
        time.sleep(max(0.0, next_tick - time.perf_counter()))
    achieved = i / (time.perf_counter() - start)
    around.__exit__(None, None, None)
    sandbox.wait_for_count(before + len(sent), 30)
    metrics = daemon.get("/metrics") or ""
    daemon.stop()
    forget_session(broker.port, f"bench-courierd-latency{label}")
    c.disconnect()
    c.loop_stop()
    arrivals = [
        ((r["order_id"], json.loads(r["body"])["delivery_status"]), r["at"])
        for r in sandbox.requests(before)
    ]
    delays = sorted((at - sent[key]) * 1000 for key, at in arrivals if key in sent)
    p50 = statistics.median(delays)
    p99 = p99_of(delays)
    lag_p99 = p99_of(sorted(lags)) * 1000
    stages50, stages99 = stage_quantiles(metrics, 0.5), stage_quantiles(metrics, 0.99)
    say(
        f"  {len(delays)} status pushes: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"(offered {achieved:,.0f} msg/s; harness behind schedule p99 {lag_p99:.1f} ms)"
    )
    say("  stages p50/p99 ms: " + ", ".join(f"{k} {stages50[k]}/{v}" for k, v in stages99.items()))
    return {
        "offered_msgs_per_s": round(achieved),
        "samples": len(delays),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "harness_lag_p99_ms": round(lag_p99, 2),
        "stages_p50_ms": stages50,
        "stages_p99_ms": stages99,
    }


class PageReader:
    """What an operator's page and dispatch tools do, harder: GET /v1/dashboard `rate`
    times a second, on a thread, for as long as it is entered."""

    def __init__(self, port: int, rate: float = 20) -> None:
        self.url, self.every = f"http://127.0.0.1:{port}/v1/dashboard", 1 / rate
        self.times: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-reader")

    def __enter__(self) -> PageReader:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        due = time.perf_counter()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.times.append(time.perf_counter() - t0)
            except OSError:
                self.failed += 1
            due += self.every
            self._stop.wait(max(0.0, due - time.perf_counter()))


def latency_beside_page(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, seconds: float, label: str
) -> dict[str, Any]:
    """The latency phase alone, then again while a client reads /v1/dashboard 20 times a
    second: the HTTP process serves it, so ingest and pushes should not notice."""
    alone = latency(broker, sandbox, root, seconds, f"alone{label}")
    readers: list[PageReader] = []

    def reader(port: int) -> PageReader:
        readers.append(PageReader(port))
        return readers[-1]

    read = latency(broker, sandbox, root, seconds, f"page{label}", beside=reader)
    times = sorted(readers[0].times)
    say(
        f"  with the page reader: {len(times)} dashboards, p50 "
        f"{statistics.median(times) * 1000:.1f} ms, {readers[0].failed} failed"
    )
    return {
        "p99_ms_alone": alone["p99_ms"],
        "p99_ms_with_page": read["p99_ms"],
        "p50_ms_alone": alone["p50_ms"],
        "p50_ms_with_page": read["p50_ms"],
        "ratio": round(read["p99_ms"] / alone["p99_ms"], 3),
        "dashboards_read": len(times),
        "dashboard_p50_ms": round(statistics.median(times) * 1000, 2),
        "dashboard_failures": readers[0].failed,
        "goal": "p99 with the page reader within noise of without (ratio near 1)",
    }
