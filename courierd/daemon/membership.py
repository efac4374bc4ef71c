"""A cluster member's slot manager, a thread of the dispatch process (CONTRACT.md 10).

Every ROUND_S it runs one round of `Slots.rebalance` (store/cluster.py): a heartbeat,
which renews this instance's hold on its slots, takeovers of slots whose holder went
silent, and the slots beyond a fair share. It grants the MQTT process the slots to
hold until the lease runs out (`Grant`, ipc.py: the lease measured from before the
round, by the monotonic clock, less a margin, so it ends here before it can end in the
database). A share handed over is disconnected first (the MQTT process says when),
then freed in the database, and its next holder connects the next round.

Any error in a round is handled the same way: nothing is given up, the last grant
stands (and runs out by itself), and health says why. A clean stop (`leave`) frees
every slot at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from courierd.daemon.ipc import Grant
from courierd.errors import StoreError, StoreUnavailable
from courierd.store.cluster import Slots

log = logging.getLogger(__name__)

ROUND_S = 1.0  # heartbeat, takeovers, hand-overs: a freed slot waits at most this long
MARGIN_S = 1.0  # a grant ends this long before the lease it stands for
HANDOVER_WAIT_S = 5.0  # for the MQTT process to disconnect what is handed over


class SlotManager:
    """`run(stop)` on its own thread; `holding()` is what the MQTT process answers."""

    def __init__(
        self,
        slots: Slots,
        send: Callable[[Grant], None],
        *,
        http: str = "",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.send = send
        self.http = http
        self.monotonic = monotonic
        self._joined = False
        self._granted = Grant({}, 0.0)
        self._holding: queue.SimpleQueue[dict[int, int]] = queue.SimpleQueue()
        self._failing_since: float | None = None

    def holding(self, slots: dict[int, int]) -> None:
        """The MQTT process holds these sessions now (its answer to each grant)."""
        self._holding.put(slots)

    def run(self, stop: threading.Event) -> None:
        """Rounds until `stop`, then leave; raises StoreError if the cluster refuses us
        (another slot count), which is fatal."""
        while not stop.is_set():
            self.turn()
            stop.wait(ROUND_S)
        try:
            self.slots.leave()
            log.info("cluster.left (slots handed over)")
        except Exception as e:  # they are taken over once the lease runs out instead
            log.warning("cluster.leave_failed error=%s", e)

    def turn(self) -> None:
        """One round; never raises but for a refusal to join."""
        started = self.monotonic()
        try:
            if not self._joined:
                self.slots.join(self.http)
                self._joined = True
            result = self.slots.rebalance()
        except StoreUnavailable as e:
            self._failed(e)
            return
        except StoreError:
            raise
        except Exception as e:  # the driver's: a statement timeout, privileges, a bug
            self._failed(e)
            return
        if self._failing_since is not None:
            log.warning("cluster.recovered after=%.0fs", self.monotonic() - self._failing_since)
            self._failing_since = None
        valid_until = started + self.slots.lease_s - MARGIN_S
        if result.held != self._granted.slots or result.handover:
            log.info(
                "cluster.slots holding=%s handing_over=%s",
                sorted(result.held),
                sorted(result.handover),
            )
        self._grant(Grant(result.held, valid_until, unheld=self.slots.unheld))
        if result.handover:
            self._hand_over(result.handover)

    def _grant(self, grant: Grant) -> None:
        while not self._holding.empty():  # answers to earlier grants
            self._holding.get_nowait()
        self._granted = grant
        self.send(grant)

    def _hand_over(self, handover: dict[int, int]) -> None:
        """Free these slots once the MQTT process has disconnected their sessions (or
        has not answered in time: a session it still holds is then kicked by the next
        holder, and is not connected again, its grant being over)."""
        deadline = self.monotonic() + HANDOVER_WAIT_S
        while (left := deadline - self.monotonic()) > 0:
            try:
                holding = self._holding.get(timeout=left)
            except queue.Empty:
                break
            if not set(holding) & set(handover):
                break
        try:
            self.slots.release(handover)
        except Exception as e:  # still ours in the database: handed over next round
            self._failed(e)

    def _failed(self, error: Exception) -> None:
        """Keep the slots we have until the last grant runs out, and say why."""
        now = self.monotonic()
        what = f"{type(error).__name__}: {error}".strip()
        if self._failing_since is None:
            self._failing_since = now
            level = logging.WARNING if isinstance(error, StoreUnavailable) else logging.ERROR
            log.log(
                level,
                "cluster.round_failed error=%s (keeping slots %s until their lease runs out)",
                what,
                sorted(self._granted.slots),
            )
        problem = f"bookkeeping failing for {now - self._failing_since:.0f}s ({what[:200]})"
        self._granted = self._granted._replace(problem=problem, unheld=None)
        self.send(self._granted)
