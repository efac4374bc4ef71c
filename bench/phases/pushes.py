"""Phases pushes, pushes_100ms/300ms and end_to_end: courierd's pushes beside bare
httpx and aiohttp POSTs at the same concurrency, and its own OneTablet client on each
library it can run on."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp  # here, not in the raw client: its import is no CPU of a POST
import httpx

from bench.common import (
    CONCURRENCY,
    KEY,
    STATUSES,
    Courierd,
    SandboxProc,
    forget_daemon_sessions,
    forget_session,
    messages,
    publish_all,
    say,
)
from courierd.config import StoreSettings
from courierd.devtools.localbroker import LocalBroker
from courierd.domain.lifecycle import CHAIN, idempotency_key, push_body
from courierd.edges.onetablet import call
from courierd.edges.onetablet_http import CLIENTS, OneTabletHttp
from courierd.store import open_store


def fill_outbox(settings: StoreSettings, orders: int, prefix: str) -> int:
    """Commit `orders` x 5 pending pushes straight into a database, as ingest would."""
    from courierd.domain.model import Status, StatusEvent

    store = open_store(settings)
    events = [
        StatusEvent(f"{prefix}{o}-{s}", f"{prefix}{o}", "c1", Status(STATUSES[s]))
        for s in range(len(STATUSES))
        for o in range(orders)
    ]
    for i in range(0, len(events), 5000):
        store.writer.commit(events[i : i + 5000], now=time.time())
    store.close()
    return len(events)


@dataclass(frozen=True)
class RawPosts:
    """Bare POSTs: how many per second, and the client's CPU ms per POST."""

    per_s: float
    cpu_ms: float


def raw_posts(url: str, n: int, concurrency: int, kind: str) -> RawPosts:
    """Bare delivery-status POSTs at `concurrency`: sync httpx on as many threads, or
    aiohttp on one asyncio loop. The baselines of the push figures, rate and CPU (this
    process does nothing else meanwhile: its CPU time is the client's)."""
    cpu0 = time.process_time()
    rate = _raw_rate(url, n, concurrency, kind)
    return RawPosts(rate, (time.process_time() - cpu0) / n * 1000)


def _raw_rate(url: str, n: int, concurrency: int, kind: str) -> float:
    body = push_body(CHAIN[0], {"full_name": "Bench Courier"})
    tag = uuid.uuid4().hex[:6]
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, limits=limits) as c:

            def post(i: int) -> None:
                key = idempotency_key(f"raw{tag}{i}", CHAIN[0])
                c.post(
                    f"/orders/raw{tag}{i}/delivery-status",
                    content=body,
                    headers={"idempotency-key": key},
                )

            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                list(pool.map(post, range(n)))
            return n / (time.perf_counter() - start)

    async def run() -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(headers={"x-api-key": KEY}, connector=connector) as s:
            gate = asyncio.Semaphore(concurrency)

            async def post(i: int) -> None:
                key = idempotency_key(f"raw{tag}{i}", CHAIN[0])
                async with (
                    gate,
                    s.post(
                        f"{url}/orders/raw{tag}{i}/delivery-status",
                        data=body,
                        headers={"idempotency-key": key, "content-type": "application/json"},
                    ) as r,
                ):
                    await r.read()

            start = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(n)))
            return n / (time.perf_counter() - start)

    return asyncio.run(run())


def client_posts(url: str, n: int, concurrency: int, client: str) -> RawPosts:
    """`n` delivery-status calls through courierd's own client at `concurrency`:
    `OneTabletHttp` (the policy: origin check, whole-request deadline, no redirects) with
    `client` underneath, and the reading of each reply, on one asyncio loop."""
    body = push_body(CHAIN[0], {"full_name": "Bench Courier"}).encode()
    tag = uuid.uuid4().hex[:6]

    async def run() -> float:
        http = OneTabletHttp(url, KEY, deadline_s=30.0, max_connections=concurrency, client=client)
        gate = asyncio.Semaphore(concurrency)

        async def post(i: int) -> None:
            order = f"cl{tag}{i}"
            path = f"/orders/{order}/delivery-status"
            headers = {"idempotency-key": idempotency_key(order, CHAIN[0])}
            async with gate:
                await call(http, path, order, body, headers, time.time)

        try:
            start = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(n)))
            return n / (time.perf_counter() - start)
        finally:
            await http.close()

    cpu0 = time.process_time()
    rate = asyncio.run(run())
    return RawPosts(rate, (time.process_time() - cpu0) / n * 1000)


def transports(url: str, n: int, raw_aio: RawPosts) -> dict[str, dict[str, float]]:
    """courierd's client on each library it can run on (`onetablet_http.CLIENTS`), set
    against raw aiohttp measured in the same run: the figures behind the default.
    httpx's own transport is slow enough that a tenth of the calls tells its cost."""
    out: dict[str, dict[str, float]] = {}
    for client in CLIENTS:
        got = client_posts(url, max(n // 10, 50) if client == "httpx" else n, CONCURRENCY, client)
        over = got.cpu_ms / raw_aio.cpu_ms
        say(
            f"  client {client}: {got.per_s:,.0f}/s, {got.cpu_ms:.2f} ms CPU per call "
            f"({over:.2f}x raw aiohttp's {raw_aio.cpu_ms:.2f} ms)"
        )
        out[client] = {
            "per_s": round(got.per_s),
            "cpu_ms_per_call": round(got.cpu_ms, 3),
            "cpu_over_raw_aiohttp": round(over, 3),
        }
    return out


def deliver_backlog(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    n: int,
    label: str,
    pg_url: str | None = None,
) -> tuple[float, float]:
    """A daemon started on an outbox of `n` pending pushes (a burst of orders, five
    statuses each): (pushes/s from its first to its last call, the dispatch process's
    CPU ms per delivered push)."""
    work = root / f"pushes-{label}"
    work.mkdir()
    settings = StoreSettings(url=pg_url) if pg_url else StoreSettings(path=work / "courierd.db")
    total = fill_outbox(settings, n // len(STATUSES), label)
    before = sandbox.count()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-{label}", pg_url)
    daemon.start()
    cpu0 = daemon.cpu_s("courierd-push")
    if not sandbox.wait_for_count(before + total, 600):
        raise RuntimeError("courierd did not deliver every push")
    cpu = daemon.cpu_s("courierd-push") - cpu0
    daemon.stop()
    forget_daemon_sessions(broker, f"bench-courierd-{label}", pg_url)
    times = [r["at"] for r in sandbox.requests(before)]
    return (len(times) - 1) / (max(times) - min(times)), cpu / total * 1000


def pushes(
    broker: LocalBroker,
    sandbox: SandboxProc,
    root: Path,
    n: int,
    label: str,
    pg_url: str | None = None,
) -> dict[str, Any]:
    """A backlog of pushes against the local sandbox, next to bare POSTs at the same
    concurrency (sync httpx, the goal's baseline; aiohttp, the push path's client)."""
    where = "" if pg_url is None else ", PostgreSQL"
    say(f"pushes: {n} delivery-status calls, concurrency {CONCURRENCY}{where}")
    raw = raw_posts(sandbox.url, n, CONCURRENCY, "httpx")
    raw_aio = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
    clients = transports(sandbox.url, n, raw_aio) if pg_url is None else {}
    rate, cpu_ms = deliver_backlog(broker, sandbox, root, n, label, pg_url)
    return {"pushes": n, **against_bare_clients(rate, cpu_ms, raw, raw_aio), "clients": clients}


def against_bare_clients(
    rate: float, cpu_ms: float, raw: RawPosts, raw_aio: RawPosts
) -> dict[str, float]:
    """courierd's pushes/s and its dispatch process's CPU per push, set against bare
    httpx and aiohttp POSTs in the same run (the CPU goal, 0.5 ms, was set where raw
    httpx cost 1 ms; an absolute time moves with the shared machine's load, a ratio holds)."""
    say(
        f"  raw httpx {raw.per_s:,.0f}/s, raw aiohttp {raw_aio.per_s:,.0f}/s, "
        f"courierd {rate:,.0f}/s ({rate / raw.per_s:.2f}x httpx, "
        f"{rate / raw_aio.per_s:.2f}x aiohttp)"
    )
    say(
        f"  dispatch CPU {cpu_ms:.2f} ms/push; bare clients' CPU per POST: httpx "
        f"{raw.cpu_ms:.2f} ms, aiohttp {raw_aio.cpu_ms:.2f} ms "
        f"(dispatch = {cpu_ms / raw.cpu_ms:.2f}x httpx, {cpu_ms / raw_aio.cpu_ms:.2f}x aiohttp)"
    )
    return {
        "raw_httpx_per_s": round(raw.per_s),
        "raw_aiohttp_per_s": round(raw_aio.per_s),
        "courierd_per_s": round(rate),
        "ratio": round(rate / raw.per_s, 3),
        "ratio_to_aiohttp": round(rate / raw_aio.per_s, 3),
        "dispatch_cpu_ms_per_push": round(cpu_ms, 3),
        "raw_httpx_cpu_ms_per_post": round(raw.cpu_ms, 3),
        "raw_aiohttp_cpu_ms_per_post": round(raw_aio.cpu_ms, 3),
        "dispatch_cpu_over_httpx": round(cpu_ms / raw.cpu_ms, 3),
        "dispatch_cpu_over_aiohttp": round(cpu_ms / raw_aio.cpu_ms, 3),
    }


def remote_pushes(
    broker: LocalBroker, root: Path, n: int, latency_ms: int, label: str
) -> dict[str, Any]:
    """A burst of orders against a OneTablet `latency_ms` away (`courierd sandbox
    --latency-ms`), next to bare aiohttp POSTs at the same concurrency, and the bound
    that concurrency sets (places in flight / latency)."""
    say(f"pushes to a OneTablet {latency_ms} ms away: {n} calls, concurrency {CONCURRENCY}")
    sandbox = SandboxProc("--latency-ms", str(latency_ms))
    try:
        raw = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
        clients = transports(sandbox.url, n // 4, raw)
        rate, cpu_ms = deliver_backlog(broker, sandbox, root, n, label)
    finally:
        sandbox.stop()
    bound = CONCURRENCY / (latency_ms / 1000)
    say(
        f"  bound {bound:,.0f}/s, raw aiohttp {raw.per_s:,.0f}/s, courierd {rate:,.0f}/s "
        f"({rate / raw.per_s:.2f}x); dispatch CPU {cpu_ms:.2f} ms/push "
        f"({cpu_ms / raw.cpu_ms:.2f}x raw aiohttp's {raw.cpu_ms:.2f} ms per POST)"
    )
    return {
        "pushes": n,
        "latency_ms": latency_ms,
        "bound_per_s": round(bound),
        "raw_aiohttp_per_s": round(raw.per_s),
        "courierd_per_s": round(rate),
        "ratio": round(rate / raw.per_s, 3),
        "dispatch_cpu_ms_per_push": round(cpu_ms, 3),
        "raw_aiohttp_cpu_ms_per_post": round(raw.cpu_ms, 3),
        "dispatch_cpu_over_aiohttp": round(cpu_ms / raw.cpu_ms, 3),
        "clients": clients,
    }


def together(
    broker: LocalBroker, sandbox: SandboxProc, root: Path, n: int, label: str
) -> dict[str, Any]:
    """Ingest and pushes at once: `n` status events (orders walking the chain) published
    as fast as the broker takes them to a running daemon, until every push is made;
    next to bare POSTs of as many calls at the same concurrency."""
    say(f"end to end: {n} status events published, ingested and pushed")
    raw = raw_posts(sandbox.url, n, CONCURRENCY, "httpx")
    raw_aio = raw_posts(sandbox.url, n, CONCURRENCY, "aiohttp")
    work = root / f"together-{label}"
    work.mkdir()
    daemon = Courierd(work, broker, sandbox.url, f"bench-courierd-{label}")
    daemon.start()
    msgs = messages(n, 0.0, label)
    before = sandbox.count()
    cpu0 = daemon.cpu_s("courierd-push")
    start = time.time()
    publish_all(broker.port, msgs)
    if not sandbox.wait_for_count(before + n, 600):
        raise RuntimeError("courierd did not push every status")
    cpu = daemon.cpu_s("courierd-push") - cpu0
    daemon.stop()
    forget_session(broker.port, f"bench-courierd-{label}")
    rate = n / (max(r["at"] for r in sandbox.requests(before)) - start)
    return {"statuses": n, **against_bare_clients(rate, cpu / n * 1000, raw, raw_aio)}
