"""The push path: delivery statuses to OneTablet, hundreds in flight.

The dispatcher keeps up to `onetablet.max_concurrency` pushes in flight, because
OneTablet is 50-300 ms away and each order's pushes go one at a time. Threads do not
carry that (a blocking call costs several times an async one's CPU: README
"Performance"), so pushes go out on one asyncio loop in a thread of its own. Each push
is `onetablet.call` on `onetablet_http.OneTabletHttp`, the client the order commands
use too: the same bytes, the same policy (no redirects, one origin, one deadline), the
same log line and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial

from courierd.domain.model import value
from courierd.edges.onetablet import (
    Reply,
    answered,
    call,
    delivery_status_request,
    write_line,
)
from courierd.edges.onetablet_http import CLIENTS, Answered, LoopThread, OneTabletHttp
from courierd.errors import OneTabletError, Unavailable
from courierd.logs import batched

log = logging.getLogger(__name__)

Outcome = Reply | OneTabletError  # what a push got: a 2xx reply or the error it maps to


@value
class Push:
    """One delivery-status call to make, and whom to tell how it went.

    `until` is the monotonic time (`time.monotonic()`) after which it must not be sent
    any more (a claim on a shared database that has lapsed; a wall-clock step must not
    make a lapsed claim look live); `done` runs on the pusher's thread.
    """

    order_id: str
    body: str
    idempotency_key: str
    source: str | None
    # With the outcome (None: not sent, its claim lapsed first) and when it was sent.
    done: Callable[[Outcome | None, float], None]
    until: float = float("inf")


class Pusher:
    """An asyncio loop with one OneTablet client; `send` from any thread."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        transport: str = "rest",
        timeout: float = 30.0,
        max_connections: int = 256,
        client: str = CLIENTS[0],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.transport = transport
        self._clock = clock
        self._monotonic = monotonic
        self._thread = LoopThread("pusher", loop_factory)
        self._loop = self._thread.loop

        self._http = OneTabletHttp.open_on(
            self._thread,
            base_url,
            api_key,
            deadline_s=timeout,
            max_connections=max_connections,
            client=client,
        )
        self._on_replies: list[Callable[[], None]] = []
        self._telling = False  # a call of `_tell` is scheduled
        # The calls' log lines of this pass of the loop, written together by `_tell`
        # (`logs.batched`: one write for them, not a write(2) per push at INFO).
        self._lines: list[tuple[int, str, str, int | None, str | None, float]] = []
        # The pushes of this pass that finished, told by `_tell` after those lines: a
        # result recorded (or a daemon gone) before its call's line would lose the line.
        self._finished_pushes: list[tuple[Push, Outcome | None, float]] = []

    def after_replies(self, callback: Callable[[], None]) -> None:
        """Run `callback` (on the pusher's thread) once after each pass of its loop in
        which pushes finished, after their `done`: the dispatcher is woken once for a
        burst of replies, not once per reply (a lock and a notify each, and as many
        wake-ups of its thread)."""
        self._on_replies.append(callback)

    def _finished(self) -> None:
        if not self._telling:
            self._loop.call_soon(self._tell)
            self._telling = True  # once scheduled: a call that failed must not stop every later one

    def _line(
        self,
        level: int,
        endpoint: str,
        order_id: str,
        status: int | None,
        error: str | None,
        ms: float,
    ) -> None:
        """A call's log line, written with the others of this pass by `_tell` (which its
        push's finishing, in the same step of `_deliver`, schedules)."""
        self._lines.append((level, endpoint, order_id, status, error, ms))

    def _tell(self) -> None:
        """The pass's log lines, then each finished push's `done` (so a result is
        recorded only once its call's line is out), then the `after_replies` callbacks."""
        self._telling = False
        lines, self._lines = self._lines, []
        finished, self._finished_pushes = self._finished_pushes, []
        if lines:
            try:
                with batched():
                    for line in lines:
                        write_line(*line)
            except Exception:  # a line lost must not keep the results back too
                log.exception("pusher.lines_failed lines=%d", len(lines))
        for push, outcome, sent_at in finished:
            try:
                push.done(outcome, sent_at)
            except Exception:  # one bad `done` must not keep the others' results back
                log.exception("pusher.done_failed order_id=%s", push.order_id)
        for callback in self._on_replies:
            callback()

    def send(self, pushes: Sequence[Push]) -> None:
        """Start these pushes now (one wake-up of the loop for the lot)."""
        self._loop.call_soon_threadsafe(self._start, list(pushes))

    def _start(self, pushes: list[Push]) -> None:
        # The task made here as `loop.create_task` makes it (this loop has no task
        # factory), without that method's Python frame; named, since an unnamed task
        # has a name formatted for it ("Task-123").
        # Most go without a task (`_send_soon`); a task is made for the others.
        loop = self._loop
        for push in pushes:
            try:
                sent = self._send_soon(push)
            except Exception:  # a bug must not lose this push, nor the rest of the batch
                log.exception("pusher.crash order_id=%s", push.order_id)
                sent = False  # by a task then (if it was sent, its Idempotency-Key holds)
            if not sent:
                asyncio.Task(self._deliver(push), loop=loop, name="push")

    def _send_soon(self, push: Push) -> bool:
        """`_deliver` without a task, where `OneTabletHttp.post_soon` can send at once
        (an idle connection); False, and nothing done, where it cannot."""
        sent_at = self._clock()
        if self._monotonic() >= push.until:
            try:
                self._end(push, None, sent_at)
            except Exception:  # finished all the same: `_start` must not send it by a task too
                log.exception("pusher.crash order_id=%s", push.order_id)
            return True
        try:
            path, _, content, headers = delivery_status_request(
                self.transport, push.order_id, push.body, push.idempotency_key, push.source
            )
        except Exception:  # `_deliver` meets it again, and says so
            return False
        then = partial(self._answered, push, path, sent_at, time.perf_counter())
        return self._http.post_soon(path, content, headers, then)

    def _answered(
        self, push: Push, path: str, sent_at: float, started: float, answer: Answered
    ) -> None:
        """A push sent by `_send_soon` ended: as `_deliver` ends."""
        try:
            outcome: Outcome = answered(
                path, push.order_id, answer, started, self._clock(), self._line
            )
        except OneTabletError as e:
            outcome = e
        except Exception as e:
            outcome = _internal_error(push, e)
        self._end(push, outcome, sent_at)

    async def _deliver(self, push: Push) -> None:
        sent_at = 0.0  # (the clock failing, a bug: the push is retried all the same)
        outcome: Outcome | None
        try:  # (`call` awaited here: a coroutine between them was one more frame a push)
            sent_at = self._clock()
            if self._monotonic() >= push.until:
                outcome = None  # not sent: its claim lapsed first
            else:
                request = delivery_status_request(
                    self.transport, push.order_id, push.body, push.idempotency_key, push.source
                )
                outcome = await call(self._http, *request, self._clock, self._line)
        except OneTabletError as e:
            outcome = e
        except Exception as e:
            outcome = _internal_error(push, e)
        self._end(push, outcome, sent_at)

    def _end(self, push: Push, outcome: Outcome | None, sent_at: float) -> None:
        """A push's one result (None: not sent, its claim lapsed), told with the pass's."""
        self._finished_pushes.append((push, outcome, sent_at))
        self._finished()

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
            self._thread.run(self._http.close(), timeout=2.0)
        self._thread.stop()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _internal_error(push: Push, error: Exception) -> Unavailable:
    """A bug on a push's way: said loudly, and the push retried (never lost)."""
    log.exception("pusher.crash order_id=%s", push.order_id)
    return Unavailable(f"internal error: {error!r}")
