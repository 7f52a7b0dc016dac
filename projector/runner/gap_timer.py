"""The gap timer: due gaps get their replay requests, or their give-up policy.

Called from the poll loop; it checks the store once per check interval, and when a gap this
instance opened falls due (at most four times an interval), so that its first request is not
up to an interval late. It never sleeps. The schedule lives
in the store, so a restart keeps every gap's age and next request time, and several instances
send one request per gap per attempt (see ``claim_due_gaps``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable

from projector.config import ProjectionConfig
from projector.core.gaps import Gap, ReplaySchedule, decide
from projector.core.replay_request import ReplayRequest
from projector.faults import crash_point
from projector.replay.channels import ReplayChannel
from projector.runner.batch import BatchApplier, BatchResult
from projector.store.base import Store
from projector.store.errors import transient_retries

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class ProjectionFailed(Exception):
    """The projection must stop (a gap given up on with the ``fail`` policy)."""


def schedule_for(projection: ProjectionConfig) -> ReplaySchedule:
    return ReplaySchedule(
        projection.gap_timeout,
        projection.replay.max_interval,
        projection.give_up_after,
        projection.on_give_up,
    )


class GapTimer:
    def __init__(
        self,
        projection: ProjectionConfig,
        store: Store,
        applier: BatchApplier,
        channel: ReplayChannel | None,
        clock: Clock,
        report: Callable[[str, int, BatchResult | None], None] = lambda *_: None,
    ):
        self.report = report
        self.projection = projection
        self.store = store
        self.applier = applier
        self.channel = channel
        self.clock = clock
        self.schedule = schedule_for(projection)
        # Check often enough that a request is never more than a quarter timeout late.
        self.interval = min(1.0, projection.gap_timeout / 4)
        self.next_check = 0.0
        self._due: list[float] = []  # when gaps this instance opened fall due (a heap)
        # Checks for gaps falling due come at most this often: on a reordered stream every
        # batch opens gaps (most filled a moment later), and a check per batch, a transaction
        # of its own, cost the batches a few per cent. A request is at most this late.
        self.spacing = self.interval / 4
        self._next_due_check = 0.0

    def expect(self, due: float) -> None:
        """A committed batch opened gaps that fall due at ``due``: check then too. (Gaps
        other instances open are found by the interval's checks.)"""
        heapq.heappush(self._due, due)

    def tick(self) -> None:
        now = self.clock()
        due = bool(self._due) and self._due[0] <= now and now >= self._next_due_check
        if now < self.next_check and not due:
            return
        self.next_check = now + self.interval
        self._next_due_check = now + self.spacing
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        decided = self.store.claim_due_gaps(
            self.projection.name, now, 500, lambda g: _decision(g, self.schedule, now)
        )
        requests = [
            ReplayRequest.for_gap(self.projection.name, g, now)
            for a, g in decided
            if a == "request"
        ]
        if requests:
            crash_point("mid-replay-request")
        self._send(requests)
        for action, gap in decided:
            if action == "skip":
                self._skip(gap, now)
            elif action == "fail":
                raise ProjectionFailed(
                    f"projection {self.projection.name}: gap {gap.from_seq}-{gap.to_seq} of stream"
                    f" {gap.stream} is still open after {now - gap.first_seen:.0f}s"
                    f" (give_up_after {self.projection.give_up_after:.0f}s, on_give_up: fail)"
                )

    def _send(self, requests: list[ReplayRequest]) -> None:
        if not requests:
            return
        if self.channel is None:
            for r in requests:
                log.warning(
                    "projection %s: gap %s %d-%d still open (no replay channel configured)",
                    self.projection.name,
                    r.stream,
                    r.from_seq,
                    r.to_seq,
                )
            self.report("no_channel", len(requests), None)
            return
        self.channel.send(requests, self._requested)

    def _requested(self, delivered: int, failed: int) -> None:
        """One send's outcome: on the HTTP channel, from its own threads, once the POSTs end."""
        if failed:
            self.report("failed", failed, None)
        if delivered:
            self.report("sent", delivered, None)
        log.info(
            "projection %s: requested replay of %d gap(s), %d failed",
            self.projection.name,
            delivered + failed,
            failed,
        )

    def _skip(self, gap: Gap, now: float) -> None:
        log.warning(
            "projection %s: skipping gap %d-%d of stream %s after %.0fs (on_give_up: skip)",
            self.projection.name,
            gap.from_seq,
            gap.to_seq,
            gap.stream,
            now - gap.first_seen,
        )
        # Retried here, not by the caller: the gap was claimed (its schedule moved on), so a
        # retry of the whole tick would not find it due again.
        for attempt in transient_retries():
            with attempt:
                result = BatchResult()
                with self.store.batch(self.projection.name, self.projection.schema_name) as tx:
                    self.applier.skip_gap(tx, gap, result)
        self.report("skipped", 0, result)


def _decision(gap: Gap, schedule: ReplaySchedule, now: float) -> tuple[str, Gap]:
    due = decide(gap, schedule, now)
    return due.action, due.gap
