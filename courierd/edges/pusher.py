"""The push path's HTTP client: delivery statuses to OneTablet, hundreds in flight.

The dispatcher keeps up to `onetablet.max_concurrency` pushes in flight, because
OneTablet is 50-300 ms away and each order's pushes go one at a time. Threads do not
carry that: a blocking httpx call costs about 1.9 ms of CPU on the push path's
machine, httpx's async client 3.3 ms, aiohttp 0.4 ms (README "Performance", measured
against the sandbox at the same concurrency). So pushes go over aiohttp, on one
asyncio loop in a thread of its own; the order commands keep httpx (`onetablet.py`).
The request and the reading of the reply are `onetablet.py`'s, so both clients send
the same bytes, log the same line and raise the same errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from courierd.edges.onetablet import Answer, Reply, delivery_status_request, interpret, no_reply
from courierd.errors import OneTabletError, Unavailable

log = logging.getLogger(__name__)

Outcome = Reply | OneTabletError  # what a push got: a 2xx reply or the error it maps to


@dataclass(frozen=True, slots=True)
class Push:
    """One delivery-status call to make, and whom to tell how it went.

    `until` is the wall-clock time after which it must not be sent any more (a claim
    on a shared database that has lapsed); `done` runs on the pusher's thread.
    """

    order_id: str
    body: str
    idempotency_key: str
    source: str | None
    # With the outcome (None: not sent, its claim lapsed first) and when it was sent.
    done: Callable[[Outcome | None, float], None]
    until: float = float("inf")


class Pusher:
    """An asyncio loop with one aiohttp session; `send` from any thread."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: str = "rest",
        timeout: float = 30.0,
        max_connections: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.transport = transport
        self._clock = clock
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pusher", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession = self._wait(
            self._open(api_key, timeout, max_connections)
        )

    async def _open(self, api_key: str, timeout: float, limit: int) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            headers={"x-api-key": api_key, "content-type": "application/json"},
            # All pushes go to one host: the limit is the connections OneTablet sees.
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
            timeout=aiohttp.ClientTimeout(total=timeout),
            cookie_jar=aiohttp.DummyCookieJar(),  # OneTablet's cookies mean nothing here
            auto_decompress=False,
        )

    def send(self, pushes: Sequence[Push]) -> None:
        """Start these pushes now (one wake-up of the loop for the lot)."""
        self._loop.call_soon_threadsafe(self._start, list(pushes))

    def _start(self, pushes: list[Push]) -> None:
        for push in pushes:
            self._loop.create_task(self._deliver(push))

    async def _deliver(self, push: Push) -> None:
        sent_at = self._clock()
        if sent_at >= push.until:
            push.done(None, sent_at)
            return
        try:
            outcome: Outcome = await self._call(push)
        except OneTabletError as e:
            outcome = e
        except Exception as e:  # a bug must not lose the push: it is retried, loudly
            log.exception("pusher.crash order_id=%s", push.order_id)
            outcome = Unavailable(f"internal error: {e!r}")
        push.done(outcome, sent_at)

    async def _call(self, push: Push) -> Reply:
        path, order_id, content, headers = delivery_status_request(
            self.transport, push.order_id, push.body, push.idempotency_key, push.source
        )
        endpoint = f"POST {path}"
        started = time.perf_counter()
        # `encoded`: the order id is already escaped in the path, exactly once.
        url = URL(self.base_url + path, encoded=True)
        try:
            async with self._session.post(url, data=content, headers=headers) as response:
                answer = Answer(response.status, response.reason or "", await response.read())
                retry_after = response.headers.get("retry-after")
        except TimeoutError:
            raise no_reply(endpoint, order_id, started, None) from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise no_reply(endpoint, order_id, started, e) from None
        return interpret(endpoint, order_id, answer, retry_after, started, self._clock())

    def delivery_status(
        self, order_id: str, body: str, idempotency_key: str, source: str | None = None
    ) -> Reply:
        """One push, waiting for its reply: `onetablet.OneTabletClient`'s call, here."""
        result: Future[Outcome | None] = Future()
        self.send(
            [Push(order_id, body, idempotency_key, source, lambda o, _: result.set_result(o))]
        )
        outcome = result.result()
        if isinstance(outcome, OneTabletError):
            raise outcome
        assert outcome is not None
        return outcome

    def close(self) -> None:
        """Close the connections and stop the loop (pushes still in flight are dropped:
        they are pending in the outbox and sent again on the next start)."""
        if not self._loop.is_running():
            return
        with contextlib.suppress(Exception):  # best effort: the connections are ending
            self._wait(self._session.close(), timeout=2.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)
